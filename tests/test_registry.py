"""The metric registry (one declaration per metric) and the one result type (ctsynth.evaluate.results):
every metrics file, MLflow name, report table and doc derives from them."""
from __future__ import annotations

import json

import pytest

from conftest import REPO
from ctsynth.core.labels import STRUCTURES
from ctsynth.evaluate.registry import GROUPS, METRICS, SUFFIX, definition, docs_markdown, lookup, table_rows
from ctsynth.evaluate.results import Interval, Results


def test_docs_metrics_md_is_the_registry():
    """docs/metrics.md is generated: `python -m ctsynth.evaluate.registry > docs/metrics.md`."""
    assert (REPO / "docs" / "metrics.md").read_text() == docs_markdown()


def test_declarations_are_complete_and_unique():
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    assert all(m.group in GROUPS and m.definition for m in METRICS)
    assert 5 <= sum(m.headline for m in METRICS) <= 15           # what `dvc exp show` fits on a screen
    for m in table_rows():                                       # report rows name a direction and a real floor
        assert m.better in ("higher", "lower", "≈ 1", "≈ 0.5") and (not m.floor or lookup(m.floor) is not None)


def test_structure_templates_resolve():
    assert lookup("dice_generated_LV").key == "dice_generated_<S>"
    assert lookup("zcons_ssim_ratio_Ao").key == "zcons_ssim_ratio_<S>"
    assert definition("mae_hu_PA") == "mean absolute HU error over the pixels of structure PA's mask"
    assert lookup("dice_generated_Aorta") is None and definition("no_such_metric") == ""
    assert all(lookup(f"utility_dice_mixed_{s}") for s in STRUCTURES)


def test_results_write_and_read_back(tmp_path):
    res = Results()
    res.update({"n_test_cases": 4, "ssim": 0.812345678, "fid_inception": None, "mae_hu_LV": float("nan")},
               {"fid_inception": "offline"})
    res.explain_nulls("undefined")
    res.set_interval("ssim", Interval(0.7, 0.9))
    res.set_interval("not_a_value", Interval(1.0, 2.0))               # an interval alone adds no metric
    notes = {"data_range": "x"}
    res.write(tmp_path, notes)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {"n_test_cases": 4, "ssim": 0.812346, "fid_inception": None, "mae_hu_LV": None}
    assert json.loads((tmp_path / "metrics_ci.json").read_text()) == {
        f"ssim{SUFFIX}": {"lo": 0.7, "hi": 0.9}, f"not_a_value{SUFFIX}": {"lo": 1.0, "hi": 2.0}}
    assert json.loads((tmp_path / "headline.json").read_text()) == {"n_test_cases": 4, "ssim": 0.812346,
                                                                    "fid_inception": None}
    saved = json.loads((tmp_path / "metrics_notes.json").read_text())
    assert saved["null_metrics"] == {"fid_inception": "offline", "mae_hu_LV": "undefined"}
    back = Results.read(tmp_path)
    assert back.metrics() == metrics and back["ssim"].interval == Interval(0.7, 0.9)
    assert back["fid_inception"].null_reason == "offline"
    assert back.shown("ssim") == "0.8123 [0.7, 0.9]" and back.shown("fid_inception") == "—"
    assert Results.read(tmp_path / "nowhere") is None


def test_a_corrupt_metrics_file_is_named(tmp_path):
    from ctsynth.core.errors import InputError

    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(InputError, match="metrics.json: not valid JSON"):
        Results.read(tmp_path)
