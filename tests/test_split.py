"""split: patient-level, seeded, explicit lists, no test slice in training."""
from __future__ import annotations

import json
import re

import pytest

from conftest import make_store
from ctsynth.core.config import params_from_dict
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.data import split

CASES = [f"c{i}" for i in range(10)]


def test_fractions_partition_cases_and_seeded(tmp_path):
    store = make_store(tmp_path / "p", cases=CASES, slices_per_case=2)
    a = split.run(params_from_dict({"seed": 1}), store, tmp_path / "a.json")
    b = split.run(params_from_dict({"seed": 1}), store, tmp_path / "b.json")
    assert a == b
    c = split.run(params_from_dict({"seed": 2}), store, tmp_path / "c.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a["test"] != c["test"] or a["val"] != c["val"]
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (4, 3, 3)      # 0.375 / 0.3125 / 0.3125 of 10
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(CASES)
    assert a["slices"] == {"train": 8, "val": 6, "test": 6}
    assert json.loads((tmp_path / "a.json").read_text())["seed"] == 1


def test_explicit_lists(tmp_path):
    store = make_store(tmp_path / "p", cases=CASES[:4], slices_per_case=2)
    params = params_from_dict({"split": {"cases": {"train": ["c0", "c1"], "val": [], "test": ["c3"]}}})
    out = split.run(params, store, tmp_path / "s.json")
    assert out["train"] == ["c0", "c1"] and out["test"] == ["c3"] and out["slices"]["test"] == 2


def test_explicit_lists_rejected(tmp_path):
    store = make_store(tmp_path / "p", cases=CASES[:4], slices_per_case=2)
    params = params_from_dict({"split": {"cases": {"train": ["c0", "zz"], "test": ["c0"]}}})
    with pytest.raises(ConfigError) as e:
        split.run(params, store, tmp_path / "s.json")
    text = "\n".join(e.value.problems)
    assert "zz" in text and "both train and test" in text
    assert not (tmp_path / "s.json").exists()


def test_too_few_cases(tmp_path):
    store = make_store(tmp_path / "p", cases=["a", "b"], slices_per_case=2)
    with pytest.raises(InputError, match="at least one training case"):
        split.run(params_from_dict({}), store, tmp_path / "s.json")


@pytest.mark.parametrize("content, message", [
    (None, "split file not found"),
    ("{not json", "not a readable split file"),
    ("[1, 2]", "not a split file"),
    ('{"train": [], "test": ["c1"]}', "needs non-empty 'train' case lists"),
    ('{"train": ["c1", "c2"], "test": ["c2"]}', "cases ['c2'] are in both train and test"),
])
def test_load_split_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "split.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        split.load_split(path, need=("train",))
    assert str(path) in str(err.value)


def test_load_split_reads_what_run_writes(tmp_path):
    store = make_store(tmp_path / "p", cases=CASES, slices_per_case=2)
    written = split.run(params_from_dict({"seed": 3}), store, tmp_path / "s.json")
    assert split.load_split(tmp_path / "s.json", need=("train", "val", "test")) == written


def test_load_split_reports_every_overlapping_pair_at_once(tmp_path):
    """train/val, train/test and val/test are all checked (only train/test was), each named with
    its cases, in one error."""
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["c1", "c2", "c3"], "val": ["c2", "c4"], "test": ["c3", "c4", "c5"]}))
    with pytest.raises(InputError) as err:
        split.load_split(path, need=("train", "test"))
    assert err.value.problems == [f"{path}: cases ['c2'] are in both train and val",
                                  f"{path}: cases ['c3'] are in both train and test",
                                  f"{path}: cases ['c4'] are in both val and test"]
    path.write_text(json.dumps({"train": ["c1"], "val": ["c1"], "test": ["c2"]}))
    with pytest.raises(InputError, match=re.escape("cases ['c1'] are in both train and val")):
        split.load_split(path)
