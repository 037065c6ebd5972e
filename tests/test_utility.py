"""utility: Dice of three segmenters on real test slices, paired intervals, and the stage end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_store, tiny_params
from ctsynth.core.errors import InputError
from ctsynth.evaluate.evaluate import merge_utility
from ctsynth.evaluate.results import Results
from ctsynth.segmenter import segmenter
from ctsynth.synth import synthesize
from ctsynth.utility import utility
from test_generate import make_world

LABELS = {1: "Myo", 3: "LV"}


def _counts(n_slices: int, hit: float, seed: int = 0) -> np.ndarray:
    """Per-slice |P∩T|, |P|, |T| (N, 3, 8): each prediction overlaps its target by ``hit``."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n_slices, 3, 8))
    target = rng.integers(20, 40, (n_slices, 8)).astype(float)
    c[:, 2], c[:, 1], c[:, 0] = target, target, np.round(hit * target)
    return c


def test_summarise_contrasts_and_intervals():
    cases = np.repeat(["a", "b", "c", "d"], 5)
    real = _counts(20, 0.9)
    counts = {"real": real, "synthetic": real.copy(), "mixed": _counts(20, 0.95)}
    metrics, ci, table, reasons = utility.summarise(counts, cases, LABELS, n_boot=200, seed=0)
    assert metrics["utility_ratio_synthetic"] == pytest.approx(1.0)
    assert ci["utility_ratio_synthetic_ci95"] == {"lo": pytest.approx(1.0), "hi": pytest.approx(1.0)}  # paired
    assert metrics["utility_gain_mixed"] == pytest.approx(0.05, abs=0.01)
    assert ci["utility_gain_mixed_ci95"]["lo"] > 0                                     # resolved gain
    for key in ("utility_dice_real", "utility_dice_real_Myo", "utility_dice_mixed_LV"):
        assert ci[f"{key}_ci95"]["lo"] <= metrics[key] <= ci[f"{key}_ci95"]["hi"]
    assert list(table.columns) == ["model", "structure", "dice", "lo", "hi"]
    assert len(table) == 3 * (len(LABELS) + 1) and set(table.model) == {"real", "synthetic", "mixed"}
    assert reasons == {}


def test_summarise_leaves_a_structure_absent_from_the_test_truth_out():
    """LV absent from every real test slice (stray predictions of it in the synthetic model): its
    Dice is null with the reason, every mean and contrast is over Myo only, replicates too."""
    cases = np.repeat(["a", "b", "c", "d"], 5)
    real, synthetic = _counts(20, 0.9), _counts(20, 0.6)
    for c in (real, synthetic):
        c[:, 0, 3] = c[:, 2, 3] = 0                  # no LV in the truth, so none found
    real[:, 1, 3], synthetic[:, 1, 3] = 0, 5         # predicted LV pixels: real none (Dice was 1), synthetic some (0)
    metrics, ci, table, reasons = utility.summarise({"real": real, "synthetic": synthetic}, cases, LABELS, 100, 0)
    for kind in ("real", "synthetic"):
        assert metrics[f"utility_dice_{kind}_LV"] is None and f"utility_dice_{kind}_LV_ci95" not in ci
        assert "LV absent from the ground truth" in reasons[f"utility_dice_{kind}_LV"]
        assert metrics[f"utility_dice_{kind}"] == metrics[f"utility_dice_{kind}_Myo"]    # the mean of Myo alone
        lo, hi = ci[f"utility_dice_{kind}_ci95"].values()
        assert ci[f"utility_dice_{kind}_Myo_ci95"] == {"lo": lo, "hi": hi}               # replicates skip LV too
    assert metrics["utility_ratio_synthetic"] == pytest.approx(
        metrics["utility_dice_synthetic_Myo"] / metrics["utility_dice_real_Myo"], rel=1e-5)
    assert np.isnan(table.set_index(["model", "structure"]).dice.loc[("real", "LV")])      # a blank CSV cell
    assert set(reasons) == {"utility_dice_real_LV", "utility_dice_synthetic_LV"}


def test_summarise_without_bootstrap_has_no_intervals():
    metrics, ci, table, _ = utility.summarise({"real": _counts(6, 0.8)}, np.array(list("aabbcc")), LABELS, 0, 0)
    assert ci == {} and metrics["utility_dice_real"] == pytest.approx(0.8, abs=0.02)
    assert table.lo.isna().all()


def test_pools_train_on_their_union(tiny_store):
    """Two pools draw exactly like one pool of their rows together, and unlike either alone."""
    from ctsynth.data.store import ProcessedStore

    store = ProcessedStore(tiny_store)
    cfg = tiny_params().segmenter
    c1, c2 = store.rows_for_cases(["c1"]), store.rows_for_cases(["c2"])
    pooled, _ = segmenter.train_segmenter(cfg, 0, [(store, c1), (store, c2)])
    union, _ = segmenter.train_segmenter(cfg, 0, [(store, np.concatenate([c1, c2]))])
    alone, _ = segmenter.train_segmenter(cfg, 0, [(store, c1)])
    a, b, c = pooled.state_dict(), union.state_dict(), alone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.fixture
def pipeline(tmp_path):
    """A tiny world with a synthetic folder and a real-only segmenter, as the pipeline has them."""
    w = make_world(tmp_path)
    params = tiny_params(synthesize={"cases": 2}, evaluate={"bootstrap": 50})
    synthesize.run(params, w["model"], w["interim"], w["split"], tmp_path / "synthetic")
    segmenter.run(params, w["processed"], w["split"], tmp_path / "segmenter.pt")
    return w, params, tmp_path


def test_stage_scores_three_segmenters_on_real_test_slices(pipeline):
    w, params, root = pipeline
    metrics = utility.run(params, root / "synthetic", w["processed"], w["split"], root / "segmenter.pt",
                          root / "utility.json", out_csv=root / "utility.csv")
    for kind in utility.KINDS:
        assert 0 <= metrics[f"utility_dice_{kind}"] <= 1
    assert metrics["utility_n_synthetic_cases"] == 2 and metrics["utility_n_synthetic_slices"] > 0
    assert metrics["utility_ratio_synthetic"] == pytest.approx(
        metrics["utility_dice_synthetic"] / metrics["utility_dice_real"], rel=1e-4)
    table = pd.read_csv(root / "utility.csv")
    assert set(table.model) == set(utility.KINDS) and "mean" in set(table.structure)
    merged, notes = Results(), {}
    merged.set("ssim", 0.5)
    merge_utility(root / "utility.json", merged, notes)
    assert merged.value("utility_dice_mixed") == metrics["utility_dice_mixed"] and merged.value("ssim") == 0.5
    assert "utility_dice_real_ci95" in merged.intervals() and "utility" in notes


def test_stage_refuses_synthetic_data_at_another_size(pipeline):
    w, params, root = pipeline
    params.preprocess.image_size = 16
    with pytest.raises(InputError, match="preprocessed to 16"):
        utility.run(params, root / "synthetic", w["processed"], w["split"], root / "segmenter.pt",
                    root / "u.json", out_csv=root / "u.csv")
    assert not (root / "u.json").exists()


def test_merge_names_a_bad_utility_file(tmp_path):
    (tmp_path / "u.json").write_text(json.dumps({"no": "metrics"}))
    with pytest.raises(InputError, match="u.json: not a utility stage result"):
        merge_utility(tmp_path / "u.json", Results(), {})
    with pytest.raises(InputError, match="missing.json: not found"):
        merge_utility(tmp_path / "missing.json", Results(), {})


def _constant(width: int, label: int) -> segmenter.SegUNet:
    """A SegUNet that predicts ``label`` everywhere: its Dice tells which model was scored where."""
    model = segmenter.SegUNet(width=width)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        model.head.bias[label] = 10.0
    return model


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """The utility stage on a real store (train c1 c2, val c3, test c4 c5, PA absent from the test
    cases) and a synthetic one, with the reused segmenter predicting LV everywhere; train_segmenter
    records its calls and returns a model predicting Myo (synthetic pool) or Ao (mixed pool);
    dice_accumulator records what it scores. No ingest and no training: fast."""
    from ctsynth.data.store import ProcessedStore

    params = tiny_params(evaluate={"bootstrap": 10})
    real_dir = make_store(tmp_path / "processed", cases=("c1", "c2", "c3", "c4", "c5"), slices_per_case=2)
    masks = np.load(real_dir / "masks.npy")
    masks[6:][masks[6:] == 7] = 0                                                      # no PA in c4, c5
    np.save(real_dir / "masks.npy", masks)
    synth_dir = make_store(tmp_path / "synth", cases=("s1", "s2"), slices_per_case=3, seed=1)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"], "test": ["c4", "c5"]}))
    cfg = params.segmenter
    summary = {"iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": params.seed,
               "train_cases": ["c1", "c2"]}
    segmenter.save_segmenter(_constant(cfg.width, 3), segmenter.segmenter_config(cfg, ProcessedStore(real_dir)),
                             summary, tmp_path / "seg.pt")
    calls = {"train": [], "scored": []}

    def train(cfg, seed, pools, desc="segmenter"):
        model = _constant(cfg.width, 1 if len(pools) == 1 else 6)
        calls["train"].append({"cfg": cfg, "seed": seed, "pools": pools, "model": model})
        return model, 0.0

    def scored(model, store, rows, batch=64):
        calls["scored"].append((model, store.root, np.asarray(rows).copy()))
        return dice_accumulator(model, store, rows, batch)

    dice_accumulator = segmenter.dice_accumulator
    monkeypatch.setattr(utility, "train_segmenter", train)
    monkeypatch.setattr(utility, "dice_accumulator", scored)
    monkeypatch.setattr(utility, "synthetic_store", lambda *_: ProcessedStore(synth_dir))

    def run(p=params):
        return utility.run(p, tmp_path / "synthetic", real_dir, tmp_path / "split.json", tmp_path / "seg.pt",
                           tmp_path / "u.json", out_csv=tmp_path / "u.csv")
    return run, params, calls, ProcessedStore(real_dir), ProcessedStore(synth_dir)


def test_stage_trains_on_the_right_pools_with_the_seed_and_scores_the_real_test_rows(recorded):
    run, params, calls, real, synth = recorded
    metrics = run()
    synthetic_rows, train_rows = np.arange(len(synth.slices)), real.rows_for_cases(["c1", "c2"])
    pools = [[(store.root, rows.tolist()) for store, rows in t["pools"]] for t in calls["train"]]
    assert pools == [[(synth.root, synthetic_rows.tolist())],                                  # synthetic only
                     [(real.root, train_rows.tolist()), (synth.root, synthetic_rows.tolist())]]  # real train + synth
    assert all(t["seed"] == params.seed and t["cfg"] == params.segmenter for t in calls["train"])
    assert [root for _, root, _ in calls["scored"]] == [real.root] * 3
    test_rows = real.rows_for_cases(["c4", "c5"])
    assert all(np.array_equal(rows, test_rows) for _, _, rows in calls["scored"])           # the real test rows only
    reused, *retrained = [model for model, _, _ in calls["scored"]]
    assert isinstance(reused, segmenter.Segmenter) and all(m is t["model"] for m, t in zip(retrained, calls["train"]))
    # each model's Dice is reported under its own name: the reused file predicts LV, the others Myo / Ao
    for kind, label in (("real", "LV"), ("synthetic", "Myo"), ("mixed", "Ao")):
        assert metrics[f"utility_dice_{kind}_{label}"] > 0, kind
        assert all(metrics[f"utility_dice_{kind}_{s}"] == 0 for s in ("Myo", "LV", "Ao") if s != label), kind
    assert metrics["utility_n_synthetic_slices"] == 6 and metrics["utility_n_real_train_slices"] == 4
    blob = json.loads((real.root.parent / "u.json").read_text())                   # PA: null, with the reason
    assert all(metrics[f"utility_dice_{k}_PA"] is None for k in utility.KINDS)
    assert blob["null_reasons"]["utility_dice_mixed_PA"].startswith("PA absent from the ground truth")
    assert "PA" in blob["notes"]["utility_absent"]
    present = [metrics[f"utility_dice_real_{s}"] for s in ("Myo", "LA", "LV", "RA", "RV", "Ao")]
    assert metrics["utility_dice_real"] == pytest.approx(np.mean(present), abs=1e-6)   # the mean skips PA


def test_stage_refuses_a_segmenter_trained_with_other_params(recorded):
    run, params, calls, _, _ = recorded
    other = tiny_params(evaluate={"bootstrap": 10}, segmenter={"iterations": params.segmenter.iterations + 1})
    with pytest.raises(InputError, match=r"segmenter.iterations = 5, the params want 6(.|\n)*dvc repro segmenter"):
        run(other)
    assert calls["train"] == []
