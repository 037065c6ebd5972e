"""utility: Dice of three segmenters on real test slices, paired intervals, and the stage end to end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_params
from ctsynth.core.errors import InputError
from ctsynth.evaluate import segmenter, utility
from ctsynth.evaluate.results import Results
from ctsynth.evaluate.stage import merge_utility
from ctsynth.synth import synthesize
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
    metrics, ci, table = utility.summarise(counts, cases, LABELS, n_boot=200, seed=0)
    assert metrics["utility_ratio_synthetic"] == pytest.approx(1.0)
    assert ci["utility_ratio_synthetic_ci95"] == {"lo": pytest.approx(1.0), "hi": pytest.approx(1.0)}  # paired
    assert metrics["utility_gain_mixed"] == pytest.approx(0.05, abs=0.01)
    assert ci["utility_gain_mixed_ci95"]["lo"] > 0                                     # resolved gain
    for key in ("utility_dice_real", "utility_dice_real_Myo", "utility_dice_mixed_LV"):
        assert ci[f"{key}_ci95"]["lo"] <= metrics[key] <= ci[f"{key}_ci95"]["hi"]
    assert list(table.columns) == ["model", "structure", "dice", "lo", "hi"]
    assert len(table) == 3 * (len(LABELS) + 1) and set(table.model) == {"real", "synthetic", "mixed"}


def test_summarise_without_bootstrap_has_no_intervals():
    metrics, ci, table = utility.summarise({"real": _counts(6, 0.8)}, np.array(list("aabbcc")), LABELS, 0, 0)
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
                          root / "utility.json", root / "utility.csv")
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
                    root / "u.json", root / "u.csv")
    assert not (root / "u.json").exists()


def test_merge_names_a_bad_utility_file(tmp_path):
    (tmp_path / "u.json").write_text(json.dumps({"no": "metrics"}))
    with pytest.raises(InputError, match="u.json: not a utility stage result"):
        merge_utility(tmp_path / "u.json", Results(), {})
    with pytest.raises(InputError, match="missing.json: not found"):
        merge_utility(tmp_path / "missing.json", Results(), {})
