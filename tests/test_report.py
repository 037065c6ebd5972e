"""report: a self-contained HTML page from small fake inputs, and from almost nothing."""
from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import tiny_params
from ctsynth.core.errors import InputError
from ctsynth.core.labels import STRUCTURES
from ctsynth.evaluate.results import Interval, Results, fmt
from ctsynth.report.figures import fig_condition_subsets, fig_losses
from ctsynth.report.report import read_condition_subsets
from ctsynth.report.report import run as build_report
from ctsynth.synth import synthesize
from ctsynth.synth.generate import run as generate_test_set
from test_generate import make_world

SECTIONS = ("summary", "metrics", "structures", "cases", "samples", "orthogonal", "subsets", "synthetic", "utility",
            "training", "privacy", "data", "config")


def _png(path: Path, shade: int) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 48), shade, np.uint8)).save(path)
    return path


def fake_inputs(root: Path) -> dict:
    """What the earlier stages leave behind, small: a world, generated/, reports/, reports/train/."""
    w = make_world(root)
    generate_test_set(tiny_params(generate={"grid_slices": 2}), w["model"], w["processed"], w["split"],
                      w["interim"], w["out"])
    reports, train = root / "reports", root / "reports" / "train"
    train.mkdir(parents=True)
    (reports / "metrics.json").write_text(json.dumps({
        "n_test_slices": 10, "mse": 0.0123, "psnr": 24.5, "ssim": 0.81, "mae_hu": 61.2, "mae_hu_Ao": 40.5,
        "fid_inception": None, "kid_inception": None, "fd_seg": 3.25, "dice_generated_Ao": 0.7, "extra_score": 1.5,
        "utility_dice_real": 0.9, "utility_dice_synthetic": 0.812, "utility_dice_mixed": 0.88,
        "utility_ratio_synthetic": 0.902, "utility_gain_mixed": -0.02, "utility_n_synthetic_cases": 1}))
    (reports / "metrics_ci.json").write_text(json.dumps({"utility_dice_synthetic_ci95": {"lo": 0.7, "hi": 0.9}}))
    pd.DataFrame({"model": ["real", "real", "synthetic", "synthetic"], "structure": ["Ao", "mean"] * 2,
                  "dice": [0.9, 0.9, 0.812, 0.812], "lo": [0.85, 0.85, 0.7, 0.7],
                  "hi": [0.95, 0.95, 0.9, 0.9]}).to_csv(reports / "utility.csv", index=False)
    (reports / "utility.json").write_text(json.dumps({"notes": {"utility": "rests on ONE training per model"}}))
    synthesize.run(tiny_params(synthesize={"cases": 1}), w["model"], w["interim"], w["split"], root / "synthetic")
    (reports / "metrics_notes.json").write_text(json.dumps({
        "data_range": "PSNR/SSIM on images mapped to [0,1]",
        "null_metrics": {"fid_inception": "no local InceptionV3 weights (evaluate.inception_weights unset)",
                         "kid_inception": "no local InceptionV3 weights"},
        "definitions": {"extra_score": "a score defined only in the notes"}}))
    pd.DataFrame({"structure": ["background", "Ao"], "label": [0, 6], "n_pixels": [900, 100],
                  "mae_hu": [70.0, 40.5]}).to_csv(reports / "per_structure.csv", index=False)
    pd.DataFrame({"case": ["p1", "p2"], "n_slices": [5, 5], "ssim": [0.8, 0.82]}).to_csv(
        reports / "per_case.csv", index=False)
    rng = np.random.default_rng(0)
    sims = rng.uniform(0.3, 0.9, 10)
    pd.DataFrame({"case": ["p1"] * 10, "z": range(10), "nn_case": ["p3"] * 10, "nn_z": range(10),
                  "similarity": sims, "real_similarity": sims * 0.9, "shareable": sims <= 0.95}).to_csv(
        reports / "privacy.csv", index=False)
    steps = np.arange(0, 100, 5)
    pd.DataFrame({"step": steps, "g_adv": 1 / (1 + steps), "g_l1": 0.5 - steps / 400, "d_real": 0.25,
                  "d_fake": 0.2, "d_acc_real": np.linspace(0.5, 0.9, len(steps)),
                  "d_acc_fake": np.linspace(0.5, 0.7, len(steps))}).to_csv(train / "losses.csv", index=False)
    for step in (0, 50, 100):
        _png(train / "snapshots" / f"step_{step:07d}.png", 40 + step)
    return {**w, "reports": reports, "train": train, "synthetic": root / "synthetic"}


def build(inp: dict, root: Path, **kw) -> tuple[list[Path], str]:
    out = root / "reports" / "report.html"
    files = build_report(tiny_params(train={"iterations": 100}), inp["reports"], inp["out"], inp["processed"],
                         inp["train"], out, figures_dir=root / "reports" / "figures", split_path=inp["split"],
                         manifest_path=inp["interim"] / "manifest.csv", **kw)
    return files, out.read_text()


def test_full_report(tmp_path):
    inp = fake_inputs(tmp_path)
    files, page = build(inp, tmp_path, synthetic_dir=inp["synthetic"])
    for key in SECTIONS:
        assert f"id='{key}'" in page
    images = re.findall(r"src='data:image/png;base64,", page)
    # 2 sample grids + one orthogonal view per test case + subsets + losses + D accuracy + 3 snapshots
    # + privacy histogram + the synthetic case + the utility chart
    test_cases = json.loads(inp["split"].read_text())["test"]
    assert len(images) == 11 + len(test_cases)
    synthetic = page[page.index("id='synthetic'"):page.index("id='utility'")]
    assert "synthetic case synth_0001" in synthetic and "warped from p3" in synthetic
    row = pd.read_csv(inp["synthetic"] / "manifest.csv").iloc[0]                  # drawn at 16², grid finer
    assert f"draws each axial slice at {row.model_size}² (resized to the label grid)" in synthetic
    assert f"in-plane detail is {fmt(row.effective_spacing_x_mm)} × " in synthetic and "looks soft" in synthetic
    utility = page[page.index("id='utility'"):page.index("id='training'")]
    assert "0.812 [0.7, 0.9]" in utility and "synthetic only ÷ real only" in utility
    assert "rests on ONE training per model" in utility                  # how many trainings it rests on
    ortho = page[page.index("id='orthogonal'"):page.index("id='subsets'")]
    assert ortho.count("data:image/png;base64,") == len(test_cases) and "coronal (top) and sagittal" in ortho
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page)
    assert "<script" not in page and "<link" not in page
    assert "not computed — no local InceptionV3 weights" in page
    assert "a score defined only in the notes" in page                       # definition from notes
    assert "Dice of the segmenter&#x27;s prediction on generated slices" in page  # from ctsynth.evaluate.metrics
    assert "p1" in page and "test" in page and "32²" in page                  # data summary
    names = sorted(p.name for p in files[1:])
    assert files[0].name == "report.html"
    assert {"losses.png", "d_accuracy.png", "privacy_hist.png", "condition_subsets.png", "utility.png",
            "synthetic_synth_0001.png", "sample_p1.png", "evolution_step_0000050.png"} \
        | {f"orthogonal_{c}.png" for c in test_cases} <= set(names)
    assert all(p.exists() for p in files)


def test_report_without_optional_inputs(tmp_path):
    empty = {"reports": tmp_path / "r", "out": tmp_path / "g", "processed": tmp_path / "p",
             "train": tmp_path / "t", "split": tmp_path / "split.json", "interim": tmp_path / "i"}
    files, page = build(empty, tmp_path)
    for key in SECTIONS:
        assert f"id='{key}'" in page
    assert page.count("not available") >= 10
    assert files == [tmp_path / "reports" / "report.html"]
    assert "lambda_l1" in page                                               # the config table


def test_report_keeps_previous_output_on_corrupt_input(tmp_path):
    inp = fake_inputs(tmp_path)
    build(inp, tmp_path)
    before = (tmp_path / "reports" / "report.html").read_bytes()
    (inp["reports"] / "metrics.json").write_text("{not json")
    with pytest.raises(InputError, match="metrics.json"):
        build(inp, tmp_path)
    assert (tmp_path / "reports" / "report.html").read_bytes() == before
    assert (tmp_path / "reports" / "figures" / "losses.png").exists()


def test_condition_subsets_figure(tmp_path):
    """generate writes the panels (one model run); the report reads and draws them."""
    inp = fake_inputs(tmp_path)
    out = tmp_path / "subsets.png"
    subsets, panels, titles = read_condition_subsets(inp["out"] / "condition_subsets.npz")
    assert fig_condition_subsets(panels, titles, out) == out and len(panels) == len(subsets) + 1
    assert subsets[0] == list(STRUCTURES)
    assert subsets[1:] == [["Myo"], ["LV"], ["Ao"]]                           # the structures present
    assert out.stat().st_size > 1000


def test_report_stage_script(tmp_path, monkeypatch):
    inp = fake_inputs(tmp_path)
    (tmp_path / "params.yaml").write_text("preprocess: {image_size: 32}\n"
                                          "model: {gen_depth: 5, ngf: 8, ndf: 8, disc_layers: 2}\n")
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"run_id": None, "tracking_uri": None, "experiment": None}))
    monkeypatch.chdir(tmp_path)
    script = Path(__file__).resolve().parents[1] / "stages" / "report.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--reports", str(inp["reports"]),
                                      "--generated", str(inp["out"]), "--processed", str(inp["processed"]),
                                      "--split", str(inp["split"]), "--train-reports", str(inp["train"]),
                                      "--manifest", str(inp["interim"] / "manifest.csv"),
                                      "--run-file", str(run_file),
                                      "--out", "out/report.html", "--figures", "out/figures"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


RICH = {"n_test_slices": 160, "n_test_cases": 4, "mse": 0.0123, "psnr": 24.5, "ssim": 0.81, "mae_hu": 61.2,
        "mae_hu_LV": 80.0, "mae_hu_Ao": 40.5, "fid_inception": None, "kid_inception": None,
        "fd_seg": 0.69, "kid_seg": 0.01, "fd_seg_floor": 0.40, "kid_seg_floor": 0.004, "fd_seg_vs_val": 1.10,
        "fd_seg_gap": 0.70,
        "kid_seg_vs_val": 0.02, "dice_generated_LV": 0.60, "dice_real_LV": 0.90, "dice_generated_Ao": 0.80,
        "dice_real_Ao": 0.85, "dice_generated_mean": 0.70, "dice_real_mean": 0.875, "privacy_threshold": 0.95,
        "privacy_generated_similarity_mean": 0.71, "privacy_real_similarity_mean": 0.70,
        "privacy_generated_share_above": 0.0, "privacy_real_share_above": 0.0}
RICH_CI = {"ssim_ci95": {"lo": 0.79, "hi": 0.83}, "mae_hu_ci95": {"lo": 55.0, "hi": 68.0},
           "fd_seg_ci95": {"lo": 0.55, "hi": 0.83}, "fd_seg_floor_ci95": {"lo": 0.30, "hi": 0.50},
           "fd_seg_vs_val_ci95": {"lo": 0.90, "hi": 1.30},
           "fd_seg_gap_ci95": {"lo": 0.45, "hi": 0.95}, "mae_hu_LV_ci95": {"lo": 70.0, "hi": 90.0},
           "dice_generated_LV_ci95": {"lo": 0.5, "hi": 0.7}, "mae_hu_Ao_ci95": {"lo": 35.0, "hi": 46.0}}


def test_report_leads_with_the_answer_and_ends_with_the_configuration(tmp_path):
    inp = fake_inputs(tmp_path)
    (inp["reports"] / "metrics.json").write_text(json.dumps(RICH))
    (inp["reports"] / "metrics_ci.json").write_text(json.dumps(RICH_CI))
    pd.DataFrame({"case": ["p1"], "n_slices": [5], "ssim": [0.8], "ssim_ci95_lo": [0.78], "ssim_ci95_hi": [0.82]}
                 ).to_csv(inp["reports"] / "per_case.csv", index=False)
    _, page = build(inp, tmp_path)
    order = re.findall(r"<h2 id='(\w+)'>", page)
    assert order[0] == "summary" and order[-2:] == ["data", "config"]
    summary = page[page.index("id='summary'"):page.index("id='metrics'")]
    assert "SSIM 0.81 [0.79, 0.83]" in summary and "61.2 [55, 68] HU" in summary
    assert "further than real slices: the gap 0.7 [0.45, 0.95] excludes 0" in summary
    assert "0.4 [0.3, 0.5]" in summary and "same comparison, real test slices" in summary
    assert "weakest structure is <b>LV</b>" in summary               # 0.60 / 0.90 < 0.80 / 0.85
    assert "about as close to the training set as unseen real patients" in summary
    assert summary.count("data:image/png;base64,") == 1              # one sample grid
    assert "not computed — no local InceptionV3 weights" in summary
    assert "0.8 [0.78, 0.82]" in page[page.index("id='cases'"):]     # per-case row with its interval
    assert "40.5 [35, 46]" in page[page.index("id='structures'"):page.index("id='cases'")]   # per structure
    assert "Utility study: not run in this checkout" in summary      # no studies/utility/published.json


def test_the_summary_leads_with_the_utility_studys_sentence(tmp_path):
    inp = fake_inputs(tmp_path)
    sentence = "At 1 real patient(s), synthetic data (synthetic@0.5, chosen on validation) adds +0.047 Dice"
    study = {"sentence": sentence, "measured_on": "test patients; share chosen on the validation patients",
             "details": "docs/experiments/utility-study.md",
             "curve": [{"n": n, "arm": arm, "dice": d, "lo": d - .05, "hi": d + .05}
                       for n, arm, d in [(1, "classic", .736), (1, "synthetic@0.5", .783), (12, "classic", .913)]],
             "contrasts": [{"n": 1, "arm": "synthetic@0.5", "minus": "classic", "gain": .047, "lo": -.002, "hi": .109}]}
    (tmp_path / "published.json").write_text(json.dumps(study))
    _, page = build(inp, tmp_path, study_path=tmp_path / "published.json")
    summary = page[page.index("id='summary'"):page.index("id='metrics'")]
    assert summary.index(sentence) < summary.index("class='summary'")          # before evaluate's reading
    assert "validation patients" in summary
    utility = page[page.index("id='utility'"):page.index("id='training'")]
    assert "0.783 [0.733, 0.833]" in utility and "+0.047 [-0.002, +0.109]" in utility
    assert "<td class='num'>12</td>" in utility                                 # one row per number of patients


def results(metrics: dict, ci: dict | None = None, reasons: dict | None = None) -> Results:
    """A Results as evaluate leaves it: values, ``<key>_ci95`` intervals, null reasons."""
    res = Results()
    res.update(metrics, reasons)
    for key, iv in (ci or {}).items():
        res.set_interval(key.removesuffix("_ci95"), Interval(iv["lo"], iv["hi"]))
    return res


def test_floor_reading_and_weakest_structure():
    from ctsynth.report.summary import floor_reading, weakest_structure

    # the verdict is the paired gap's interval, never two overlapping intervals: here the vs_val and floor
    # intervals overlap, yet the gap excludes 0 (the shared validation patients cancel)
    overlapping = dict(RICH_CI, fd_seg_vs_val_ci95={"lo": 0.45, "hi": 0.9}, fd_seg_gap_ci95={"lo": 0.05, "hi": 0.35})
    assert "further than real slices: the gap 0.2 [0.05, 0.35] excludes 0" in floor_reading(
        results(dict(RICH, fd_seg_vs_val=0.6, fd_seg_gap=0.2), overlapping))
    unresolved = dict(RICH_CI, fd_seg_gap_ci95={"lo": -0.1, "hi": 0.3})
    assert ("includes 0: with 4 test and ? validation patients the difference from real slices is not resolved"
            in floor_reading(results(dict(RICH, fd_seg_gap=0.1), unresolved)))
    closer = dict(RICH_CI, fd_seg_gap_ci95={"lo": -0.3, "hi": -0.05})
    assert "closer than real slices" in floor_reading(results(dict(RICH, fd_seg_gap=-0.2), closer))
    assert "no interval for their difference" in floor_reading(results(RICH, {}))
    assert "no noise floor was computed" in floor_reading(results({"fd_seg": 0.5}))
    assert weakest_structure(results({"dice_generated_Ao": 0.2, "dice_real_Ao": 0.9, "dice_generated_LV": 0.5,
                                      "dice_real_LV": 0.6})).startswith("The weakest structure is <b>Ao</b>")
    assert weakest_structure(results({"dice_generated_LV": 0.5})) is None


def test_mlflow_names_group_the_details_under_prefixes(tmp_path):
    """MLflow's run page groups charts by the prefix before '/' and orders the sections by code
    unit: the headline goes under Headline/ (first, above every lower-case group), the rest under
    their registry group; intervals are no charts (metrics_ci.json is an artifact)."""
    names = results({"ssim": 0.8, "mae_hu_LV": 80.0, "fid_inception": None, "zgrad_ratio": 1.1},
                    {"ssim_ci95": {"lo": 0.7, "hi": 0.9}}).mlflow()
    assert names == {"Headline/ssim": 0.8, "paired/mae_hu_LV": 80.0, "throughplane/zgrad_ratio": 1.1}
    sections = sorted({k.split("/")[0] for k in names} | {"counts", "distribution", "privacy", "share"})
    assert sections[0] == "Headline"


def test_headline_text_for_the_log():
    text = results(RICH, RICH_CI, {"fid_inception": "offline: the download failed"}).headline_text()
    lines = {ln.split()[0]: ln for ln in text.splitlines()}
    assert "0.81" in lines["ssim"] and "[0.79, 0.83]" in lines["ssim"]
    assert "0.69" in lines["fd_seg"] and "[0.55, 0.83]" in lines["fd_seg"] and "[0.3, 0.5]" not in lines["fd_seg"]
    vs_val = lines["fd_seg_vs_val"].split()                                          # like with like: floor beside it
    assert vs_val[1:4] == ["1.1", "[0.9,", "1.3]"] and lines["fd_seg_vs_val"].endswith("0.4 [0.3, 0.5]")
    assert lines["fd_seg_gap"].split()[1:4] == ["0.7", "[0.45,", "0.95]"]
    assert "null" in lines["fid_inception"] and "download failed" in lines["fid_inception"]


def test_absent_structures_show_as_a_dash_or_absent_never_nan(tmp_path, monkeypatch):
    """A structure absent from the test ground truth (Dice null with its reason, blank CSV cells) is
    shown as '—' in the tables and left out of the text, and as '<S> (absent)' under the utility
    chart: never 'nan', never a crash."""
    from ctsynth.report import figures, report
    from ctsynth.report.summary import plain_reading

    why = "LV absent from the ground truth of every scored slice (Σ|T| = 0): Dice cannot be scored"
    res = results({"n_test_cases": 2, "n_test_slices": 4, "ssim": 0.8, "mae_hu": 50.0, "dice_generated_LV": None,
                   "dice_real_LV": None, "dice_generated_Ao": 0.8, "dice_real_Ao": 0.9, "dice_generated_mean": 0.8,
                   "dice_real_mean": 0.9, "utility_dice_real": 0.9, "utility_dice_synthetic": 0.7,
                   "utility_dice_mixed": 0.92, "utility_ratio_synthetic": 0.778, "utility_gain_mixed": 0.02,
                   "utility_dice_real_LV": None},
                  {"dice_generated_Ao_ci95": {"lo": 0.7, "hi": 0.85}}, {"dice_generated_LV": why, "dice_real_LV": why})
    pd.DataFrame({"structure": ["background", "LV", "Ao"], "label": [0, 3, 6], "n_pixels": [900, 0, 100],
                  "mae_hu": [70.0, np.nan, 40.5], "dice_generated": [np.nan, np.nan, 0.8],
                  "dice_real": [np.nan, np.nan, 0.9]}).to_csv(tmp_path / "per_structure.csv", index=False)
    pd.DataFrame({"case": ["p1", "p2"], "n_slices": [2, 2], "dice_real_Ao": [0.9, np.nan]}).to_csv(
        tmp_path / "per_case.csv", index=False)
    pd.DataFrame({"model": ["real"] * 3 + ["synthetic"] * 3, "structure": ["LV", "Ao", "mean"] * 2,
                  "dice": [np.nan, 0.9, 0.9, np.nan, 0.7, 0.7], "lo": [np.nan, 0.8, 0.8, np.nan, 0.6, 0.6],
                  "hi": [np.nan, 0.95, 0.95, np.nan, 0.8, 0.8]}).to_csv(tmp_path / "utility.csv", index=False)
    ticks = []

    def save(fig, path, **_):                   # the tick labels, without the cost of rendering
        ticks.extend(t.get_text() for t in fig.axes[0].get_xticklabels())
        figures._plt().close(fig)
        path.write_bytes(b"png")
        return path
    monkeypatch.setattr(figures, "_save", save)
    (tmp_path / "figures").mkdir()
    parts = {"structures": report.section_per_structure(tmp_path, res), "cases": report.section_per_case(tmp_path),
             "utility": report.section_utility(tmp_path, res, tmp_path / "figures"), "summary": plain_reading(res)}
    for name, text in parts.items():
        assert not re.search(r"\bnan\b", text, re.IGNORECASE), name
    lv_row = re.search(r"<tr><td>LV</td>.*?</tr>", parts["structures"]).group(0)
    assert lv_row.count("—") == 3 and "0.8 [0.7, 0.85]" in parts["structures"]     # mae, both Dice: dashes
    assert "—" in parts["cases"] and "LV" not in parts["summary"]
    assert ticks == ["LV\n(absent)", "Ao", "mean"]


def test_report_says_where_each_step_was_computed():
    from ctsynth.report.report import runtime_lines

    rec = {"cpu": "Test CPU @ 1GHz", "torch_threads": 3, "torch": "9.9", "device": "cpu"}
    html = runtime_lines({"generator_trained_on": rec, "generated_on": None, "about": "repeat only where these match"})
    assert "generator trained on: Test CPU @ 1GHz, 3 threads, torch 9.9, cpu" in html
    assert "test slices generated on: not recorded" in html and "repeat only where these match" in html
    assert runtime_lines(None) == ""                       # reports written before this was recorded


def test_loss_figure_draws_feature_matching_only_when_it_was_on(tmp_path):
    steps = np.arange(10, 110, 10)
    base = pd.DataFrame({"step": steps, "g_adv": np.linspace(0.8, 0.5, 10), "g_l1": np.linspace(0.6, 0.1, 10),
                         "d_real": np.full(10, 0.2), "d_fake": np.full(10, 0.15)})
    plain = fig_losses(base, tmp_path / "plain.png").read_bytes()
    off = fig_losses(base.assign(g_fm=0.0), tmp_path / "off.png").read_bytes()
    on = fig_losses(base.assign(g_fm=np.linspace(0.3, 0.1, 10)), tmp_path / "on.png").read_bytes()
    assert off == plain and on != plain


def test_study_staleness_compares_the_generator_the_study_used(tmp_path):
    import hashlib

    from ctsynth.report.report import study_staleness
    generator = tmp_path / "generator.pt"
    generator.write_bytes(b"weights")
    study = tmp_path / "study"
    study.mkdir()
    lock = {"schema": "2.0", "stages": {"cell": {"deps": [{"path": "../../models/generator.pt",
                                                           "md5": hashlib.md5(b"weights").hexdigest()}]}}}
    (study / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert study_staleness(study / "dvc.lock", generator) is None
    generator.write_bytes(b"retrained")
    assert "Stale" in study_staleness(study / "dvc.lock", generator)
    assert study_staleness(None, generator) is None                              # no lock given
    (study / "dvc.lock").unlink()
    assert study_staleness(study / "dvc.lock", generator) is None                # nothing to compare
