"""evaluate stage end to end on a tiny store with a fake ``data/generated`` folder."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, make_store, standin_inception_weights, tiny_params
from ctsynth.core.errors import InputError, ModelFileError
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate import evaluate
from ctsynth.segmenter.segmenter import run as train_segmenter

SPLIT = {"seed": 0, "train": ["c1", "c2", "c3"], "val": ["c4"], "test": ["c5", "c6"]}
RAW = {"preprocess": {"image_size": 32}, "model": {"gen_depth": 5, "disc_layers": 2},
       "segmenter": {"iterations": 8, "batch_size": 4, "width": 4},
       "evaluate": {"batch_size": 5, "kid_subset_size": 4},
       "realism": {"c2st_steps": 10, "c2st_width": 4}}      # the classifier's known answers: tests/test_realism.py
OUTPUTS = ("metrics.json", "metrics_ci.json", "validation.json", "metrics_notes.json", "per_case.csv",
           "per_structure.csv", "privacy.csv", "shareable.json", "plots/per_slice.csv", "plots/privacy_hist.csv",
           "plots/dice.csv")


def _params(**sections):
    raw = json.loads(json.dumps(RAW))
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return tiny_params(**raw)


def write_generated(root, store_dir, noise: float, seed: int = 0, cases=("c5", "c6"), val=("c4",),
                    val_noise=None):
    """A generate-stage folder: real slices + noise for ``cases`` (and in ``val/`` for ``val``)."""
    store = ProcessedStore(store_dir)
    for folder, these, sigma in ((root, cases, noise), (root / "val", val, noise if val_noise is None else val_noise)):
        if not these:
            continue
        index = store.rows_for_cases(these)
        real = np.asarray(store.images[index], np.float32)
        fake = np.clip(real + sigma * np.random.default_rng(seed).standard_normal(real.shape), -1, 1)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "fake.npy", fake.astype(np.float16))
        np.save(folder / "index.npy", index.astype(np.int64))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = make_store(root / "processed", cases=("c1", "c2", "c3", "c4", "c5", "c6"), slices_per_case=6)
    (root / "split.json").write_text(json.dumps(SPLIT))
    train_segmenter(_params(), store, root / "split.json", root / "segmenter.pt")
    write_generated(root / "generated", store, noise=0.1)
    return root


def _run(root, out, generated="generated", **sections):
    return evaluate.run(_params(**sections), root / "processed", root / "split.json", root / generated,
                        root / "segmenter.pt", out)


def test_stage_writes_every_output_without_nan(setup, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(RAW))
    out = tmp_path / "reports"
    cmd = [sys.executable, str(REPO / "stages" / "evaluate.py"), "--params", str(tmp_path / "params.yaml"),
           "--processed", str(setup / "processed"), "--split", str(setup / "split.json"),
           "--generated", str(setup / "generated"), "--segmenter", str(setup / "segmenter.pt"),
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    notes = json.loads((out / "metrics_notes.json").read_text())
    for key in ("mse", "psnr", "ssim", "mae_hu", "mae_hu_background", "mae_hu_LV", "fd_seg", "kid_seg",
                "dice_generated_LV", "dice_real_LV", "dice_generated_mean", "dice_real_mean",
                "privacy_generated_share_above", "privacy_real_share_above", "privacy_n_shareable",
                "n_test_slices", "fid_inception", "kid_inception", "zcons_ssim_ratio", "zgrad_ratio",
                "zcons_ssim_ratio_LV", "fd_tri_rand_axial", "fd_tri_rand_coronal", "fd_tri_rand_sagittal",
                "fd_tri_rand_mean", "fid_tri_inception_mean", "flicker_ratio", "c2st_auc", "c2st_p",
                "c2st_auc_blur", "c2st_p_blur", "c2st_p_min",
                "texture_std_ratio", "texture_nps_ratio_band4", "contrast_bias_hu_LV", "contrast_spread_ratio"):
        assert key in metrics, key
    assert metrics["n_test_slices"] == 12 and metrics["n_test_cases"] == 2
    for key, value in metrics.items():
        if key in ("fid_inception", "kid_inception") or key.startswith("fid_tri_inception_"):
            assert value is None and "inception_weights" in notes["null_metrics"][key]
        elif value is None and key.startswith("zcons_ssim_ratio_"):   # random blobs: real neighbours unrelated
            assert "real sum <= 0" in notes["null_metrics"][key]
        elif value is None and key.startswith("texture_std_ratio_"):    # tiny slices: no lung
            assert "absent from every scored slice" in notes["null_metrics"][key]
        elif value is None and key.startswith("contrast_spread_ratio"):  # fixture: every case alike, Myo in 1
            assert "fewer than 2 patients" in notes["null_metrics"][key]
        elif value is None and key.startswith("heart_only_"):           # fixture generator: no heart-only draws
            assert "heart-only" in notes["null_metrics"][key]
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value), key
        assert notes["definitions"][key], key
    assert "not computed" in notes["fid_inception"]
    runtime = notes["runtime"]                       # test fixtures have no model.json: said, not invented
    assert runtime["evaluated_on"]["torch_threads"] >= 1 and runtime["generator_trained_on"] is None
    assert "not recorded: generator_trained_on, generated_on" in runtime["about"]
    assert 0 <= notes["fd_seg_numerical_floor"] < metrics["fd_seg"]
    assert 0 < metrics["ssim"] < 1 and metrics["mse"] > 0 and metrics["fd_seg"] > 0

    per_case = pd.read_csv(out / "per_case.csv", dtype={"case": str})
    assert sorted(per_case["case"]) == ["c5", "c6"] and (per_case["n_slices"] == 6).all()
    assert per_case[["zcons_ssim_ratio", "zgrad_ratio"]].notna().all().all()
    ci = json.loads((out / "metrics_ci.json").read_text())
    assert ci["zgrad_ratio_ci95"]["lo"] <= metrics["zgrad_ratio"] <= ci["zgrad_ratio_ci95"]["hi"]
    assert "random CNN" in notes["throughplane"] and "axial slices only" in notes["throughplane"]
    per_struct = pd.read_csv(out / "per_structure.csv")
    assert list(per_struct["structure"]) == ["background", "Myo", "LA", "LV", "RA", "RV", "Ao", "PA"]
    privacy = pd.read_csv(out / "privacy.csv", dtype={"case": str, "nn_case": str})
    assert len(privacy) == 12 and set(privacy["nn_case"]) <= set(SPLIT["train"])
    assert list(privacy.columns) == ["case", "z", "nn_case", "nn_z", "similarity", "real_similarity", "shareable"]
    shareable = json.loads((out / "shareable.json").read_text())
    assert shareable["n_shareable"] == len(shareable["slices"]) == privacy["shareable"].sum()
    assert len(pd.read_csv(out / "plots" / "per_slice.csv")) == 12


def test_bad_input_fails_cleanly_and_keeps_previous_outputs(setup, tmp_path):
    out = tmp_path / "reports"
    _run(setup, out)
    before = {n: (out / n).read_bytes() for n in OUTPUTS}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(RAW))
    cmd = [sys.executable, str(REPO / "stages" / "evaluate.py"), "--params", str(tmp_path / "params.yaml"),
           "--processed", str(setup / "processed"), "--split", str(setup / "split.json"),
           "--generated", str(tmp_path / "nothing"), "--segmenter", str(setup / "segmenter.pt"),
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "ctsynth evaluate: input error" in done.stderr and "fake.npy" in done.stderr
    assert "Traceback" not in done.stderr
    assert {n: (out / n).read_bytes() for n in OUTPUTS} == before
    assert not [p for p in out.rglob("*.tmp")]


def test_metrics_are_repeatable_and_batch_size_invariant(setup, tmp_path):
    a = _run(setup, tmp_path / "a")
    _run(setup, tmp_path / "b")
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    c = _run(setup, tmp_path / "c", evaluate={"batch_size": 64})
    assert a.keys() == c.keys()
    for k in a:
        if a[k] is not None:
            assert c[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_perfect_generator_scores_perfectly(setup, tmp_path):
    write_generated(tmp_path / "perfect", setup / "processed", noise=0.0)
    m = evaluate.run(_params(), setup / "processed", setup / "split.json", tmp_path / "perfect",
                     setup / "segmenter.pt", tmp_path / "out")
    assert m["mse"] == 0 and m["mae_hu"] == 0 and m["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert m["fd_seg"] < 1e-3 and abs(m["kid_seg"]) < 0.05
    structures = ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"]
    assert all(m[f"dice_generated_{s}"] == m[f"dice_real_{s}"] for s in structures)


def test_worse_generator_scores_worse(setup, tmp_path):
    runs = []
    for noise in (0.05, 0.3):
        write_generated(tmp_path / f"g{noise}", setup / "processed", noise=noise)
        runs.append(evaluate.run(_params(), setup / "processed", setup / "split.json", tmp_path / f"g{noise}",
                                 setup / "segmenter.pt", tmp_path / f"o{noise}"))
    good, bad = runs
    assert bad["mse"] > good["mse"] and bad["mae_hu"] > good["mae_hu"]
    assert bad["psnr"] < good["psnr"] and bad["ssim"] < good["ssim"]
    assert bad["fd_seg"] > good["fd_seg"]


def test_generated_inputs_are_validated(setup, tmp_path):
    store = ProcessedStore(setup / "processed")
    gen = write_generated(tmp_path / "train_rows", setup / "processed", 0.1, cases=("c1",))
    with pytest.raises(InputError, match="non-test case"):
        evaluate.load_generated(gen, store, SPLIT["test"])
    gen = write_generated(tmp_path / "short", setup / "processed", 0.1)
    np.save(gen / "index.npy", np.load(gen / "index.npy")[:-1])
    with pytest.raises(InputError, match="index.npy has 11 rows"):
        evaluate.load_generated(gen, store, SPLIT["test"])
    gen = write_generated(tmp_path / "nan", setup / "processed", 0.1)
    fake = np.load(gen / "fake.npy")
    fake[3, 0, 0] = np.nan
    np.save(gen / "fake.npy", fake)
    with pytest.raises(InputError, match="NaN"):
        evaluate.run(_params(), setup / "processed", setup / "split.json", gen, setup / "segmenter.pt",
                     tmp_path / "out")
    with pytest.raises(ModelFileError):
        evaluate.run(_params(), setup / "processed", setup / "split.json", setup / "generated",
                     tmp_path / "missing.pt", tmp_path / "out")


HEADLINE = ("mse", "psnr", "ssim", "mae_hu", "mae_hu_LV", "mae_hu_background", "fd_seg", "kid_seg",
            "dice_generated_mean", "dice_generated_Ao", "fd_seg_floor", "kid_seg_floor", "fd_seg_vs_val")


def test_intervals_contain_the_point_estimates(setup, tmp_path):
    m = _run(setup, tmp_path / "out", evaluate={"bootstrap": 300, "interval_method": "bootstrap"})
    ci = json.loads((tmp_path / "out" / "metrics_ci.json").read_text())
    assert set(f"{k}_ci95" for k in HEADLINE) <= set(ci)
    for key, iv in ci.items():
        assert iv["lo"] <= m[key[:-5]] <= iv["hi"], (key, m[key[:-5]], iv)
    for key in ("mse", "ssim", "mae_hu", "fd_seg", "fd_seg_floor"):
        assert ci[f"{key}_ci95"]["hi"] > ci[f"{key}_ci95"]["lo"], key          # a real spread
    assert m["n_val_cases"] == 1 and m["n_val_slices"] == 6
    notes = json.loads((tmp_path / "out" / "metrics_notes.json").read_text())
    assert "300 patient-level bootstrap resamples" in notes["intervals"]
    per_case = pd.read_csv(tmp_path / "out" / "per_case.csv", dtype={"case": str})
    cols = list(per_case.columns)
    assert cols[cols.index("ssim") + 1:cols.index("ssim") + 3] == ["ssim_ci95_lo", "ssim_ci95_hi"]
    for key in ("mse", "psnr", "ssim", "mae_hu"):
        assert ((per_case[f"{key}_ci95_lo"] <= per_case[key]) & (per_case[key] <= per_case[f"{key}_ci95_hi"])).all()
    # seeded: a second run writes the same intervals byte for byte
    _run(setup, tmp_path / "again", evaluate={"bootstrap": 300, "interval_method": "bootstrap"})
    assert (tmp_path / "again" / "metrics_ci.json").read_bytes() == (tmp_path / "out" / "metrics_ci.json").read_bytes()


def test_jackknife_intervals_need_two_patients_per_set(setup, tmp_path):
    """The default method: delete-one-patient jackknife-t. The 2 test patients give intervals (t with
    1 degree of freedom: wide); floors and gaps need >= 2 validation patients and this split has 1."""
    m = _run(setup, tmp_path / "out")
    ci = json.loads((tmp_path / "out" / "metrics_ci.json").read_text())
    for key in ("mse", "ssim", "mae_hu", "fd_seg", "kid_seg", "dice_generated_mean"):
        assert ci[f"{key}_ci95"]["lo"] < m[key] < ci[f"{key}_ci95"]["hi"], key
    assert not {"fd_seg_floor_ci95", "fd_seg_vs_val_ci95", "fd_seg_gap_ci95"} & set(ci)
    assert m["fd_seg_gap"] == pytest.approx(m["fd_seg_vs_val"] - m["fd_seg_floor"])
    notes = json.loads((tmp_path / "out" / "metrics_notes.json").read_text())
    assert "Delete-one-patient jackknife" in notes["intervals"] and "not training noise" in notes["intervals"]


def test_identical_sets_give_a_zero_width_fd_interval_and_the_floor(setup, tmp_path):
    write_generated(tmp_path / "perfect", setup / "processed", noise=0.0)
    m = _run(setup, tmp_path / "out", generated=tmp_path / "perfect",
             evaluate={"bootstrap": 200, "interval_method": "bootstrap"})
    ci = json.loads((tmp_path / "out" / "metrics_ci.json").read_text())
    floor = m["fd_seg_floor"]
    assert floor > 0
    lo, hi = ci["fd_seg_ci95"]["lo"], ci["fd_seg_ci95"]["hi"]
    assert 0 <= lo <= hi < 1e-6 * floor                       # zero width, at the arithmetic's floor
    notes = json.loads((tmp_path / "out" / "metrics_notes.json").read_text())
    assert notes["fd_seg_numerical_floor"] < 1e-6 * floor
    # generated == real: the generated slices sit exactly at the noise floor, interval included
    assert m["fd_seg_vs_val"] == floor and m["kid_seg_vs_val"] == m["kid_seg_floor"]
    assert ci["fd_seg_vs_val_ci95"] == ci["fd_seg_floor_ci95"]
    assert ci["mse_ci95"] == {"lo": 0, "hi": 0} and ci["ssim_ci95"]["lo"] == pytest.approx(1.0, abs=1e-5)


def test_floors_are_null_with_a_reason_without_validation_cases(setup, tmp_path):
    split = dict(SPLIT, val=[])
    (tmp_path / "split.json").write_text(json.dumps(split))
    m = evaluate.run(_params(evaluate={"bootstrap": 50}), setup / "processed", tmp_path / "split.json",
                     setup / "generated", setup / "segmenter.pt", tmp_path / "out")
    notes = json.loads((tmp_path / "out" / "metrics_notes.json").read_text())
    for key in ("fd_seg_floor", "kid_seg_floor", "fd_seg_vs_val", "kid_seg_vs_val"):
        assert m[key] is None and "split.val is empty" in notes["null_metrics"][key]
    assert "n_val_slices" not in m and m["fd_seg"] > 0
    ci = json.loads((tmp_path / "out" / "metrics_ci.json").read_text())
    assert "fd_seg_ci95" in ci and "fd_seg_floor_ci95" not in ci


INCEPTION_KEYS = ("fid_inception", "kid_inception", "fid_inception_floor", "kid_inception_floor",
                  "fid_inception_vs_val", "kid_inception_vs_val")


def test_fid_inception_is_a_number_with_a_local_stand_in_weights_file(setup, tmp_path):
    weights = standin_inception_weights(tmp_path / "inception.pth")
    m = _run(setup, tmp_path / "out", evaluate={"inception_weights": str(weights), "bootstrap": 100})
    notes = json.loads((tmp_path / "out" / "metrics_notes.json").read_text())
    ci = json.loads((tmp_path / "out" / "metrics_ci.json").read_text())
    for key in INCEPTION_KEYS:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
        assert notes["definitions"][key], key
    assert m["fid_inception"] > 0 and "fid_inception" not in notes["null_metrics"]
    assert "local file" in notes["fid_inception"] and str(weights) in notes["fid_inception"]
    assert ci["fid_inception_ci95"]["lo"] <= m["fid_inception"] <= ci["fid_inception_ci95"]["hi"]
    assert notes["feature_dims"]["inception"] == 2048
    for plane in ("axial", "coronal", "sagittal", "mean"):                     # tri-planar FID with the weights
        assert isinstance(m[f"fid_tri_inception_{plane}"], float) and m[f"fid_tri_inception_{plane}"] > 0, plane


def test_auto_fid_inception_from_the_hub_cache_and_null_when_the_download_fails(setup, tmp_path, monkeypatch):
    from piq.feature_extractors import fid_inception

    from ctsynth.evaluate.inception import standard_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "online"))
    standin_inception_weights(standard_weights_path())
    m = _run(setup, tmp_path / "cached", evaluate={"inception_weights": "auto", "bootstrap": 20})
    assert isinstance(m["fid_inception"], float) and m["fid_inception"] > 0
    notes = json.loads((tmp_path / "cached" / "metrics_notes.json").read_text())
    assert "standard FID weights, torch hub" in notes["fid_inception"]

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "offline"))          # empty cache, download forced to fail
    monkeypatch.delenv("CTSYNTH_OFFLINE")
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_URL", "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")
    m = _run(setup, tmp_path / "failed", evaluate={"inception_weights": "auto", "bootstrap": 20})
    notes = json.loads((tmp_path / "failed" / "metrics_notes.json").read_text())
    assert m["fid_inception"] is None and m["kid_inception"] is None
    assert "fid_inception_floor" not in m                                  # no null floors for a missing space
    assert "download failed" in notes["null_metrics"]["fid_inception"]
    assert json.loads((tmp_path / "failed" / "metrics.json").read_text())["ssim"] == m["ssim"]   # the run went on


def test_validation_patients_are_scored_apart_from_the_test_patients(setup, tmp_path):
    """validation.json scores the generated *validation* slices only (what defaults are chosen on):
    perfect validation slices give ssim 1 / mse 0 whatever the test slices are."""
    write_generated(tmp_path / "gen", setup / "processed", noise=0.2, val_noise=0.0)
    out = tmp_path / "reports"
    metrics = _run(setup, out, generated=tmp_path / "gen")
    val = json.loads((out / "validation.json").read_text())
    assert val["val_n_cases"] == 1 and val["val_n_slices"] == 6
    assert val["val_ssim"] == pytest.approx(1.0) and val["val_mse"] == 0 and val["val_mae_hu"] == 0
    assert val["val_dice_generated_mean"] == pytest.approx(val["val_dice_real_mean"])
    assert val["val_fd_seg"] < 1e-6 * max(1.0, metrics["fd_seg"])
    assert val["val_zcons_ssim_ratio"] == pytest.approx(1.0) and val["val_zgrad_ratio"] == pytest.approx(1.0)
    assert metrics["ssim"] < 0.99 and metrics["mse"] > 0                  # the test slices were noisy


def test_validation_slices_are_checked(setup, tmp_path):
    store = ProcessedStore(setup / "processed")
    gen = write_generated(tmp_path / "noval", setup / "processed", 0.1, val=())
    with pytest.raises(InputError, match=r"val/fake.npy: missing \(run `dvc repro generate`\)"):
        evaluate.load_generated(gen / "val", store, ["c4"], "validation", exact=True)
    gen = write_generated(tmp_path / "wrong", setup / "processed", 0.1, val=("c5",))
    with pytest.raises(InputError, match=r"slices of cases \['c5'\], the split's validation cases are \['c4'\]"):
        evaluate.load_generated(gen / "val", store, ["c4"], "validation", exact=True)
    values, reasons = evaluate.validation.empty()
    assert values["val_n_slices"] == 0 and values["val_ssim"] is None and "split.val is empty" in reasons["val_ssim"]
