"""params validation: every problem reported at once, with the key path and allowed values."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from ctsynth.core.config import flatten, load_params, params_from_dict, to_dict
from ctsynth.core.errors import ConfigError
from ctsynth.core.labels import MMWHS_LABEL_MAP, encode_condition


def problems_of(raw) -> str:
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    return "\n".join(e.value.problems)


def test_repo_params_and_paper_preset_are_valid():
    default = load_params(REPO / "params.yaml")
    paper = load_params(REPO / "params" / "paper.yaml")
    assert default.preprocess.image_size % 2 ** default.model.gen_depth == 0
    assert (paper.preprocess.image_size, paper.train.batch_size, paper.train.iterations) == (256, 8, 100000)
    assert (paper.train.lr_g, paper.train.lr_d, paper.train.lambda_l1) == (1.3e-4, 1.5e-4, 100.0)
    assert (paper.model.gen_depth, paper.model.ngf, paper.model.disc_layers) == (7, 64, 4)
    assert paper.model.skip_connections is False and paper.model.encoding == "index"


def test_all_problems_at_once():
    text = problems_of({"train": {"lr_g": -1, "batch_size": "8", "bogus": 1, "precision": "fp16",
                                  "channels_last": "yes"},
                        "preprocess": {"image_size": 100, "structures": ["LV", "Heart"]},
                        "split": {"test": 0.0, "train": 0.8, "val": 0.2},
                        "model": {"encoding": "rgb"}, "nonsense": {}})
    for fragment in ("train.bogus: unknown key", "train.batch_size: got '8'; expected an integer",
                     "model.encoding: got 'rgb'; expected one of 'onehot', 'index'", "nonsense: unknown key",
                     "train.precision: got 'fp16'; expected one of 'auto', 'fp32', 'bf16'",
                     "train.channels_last: got 'yes'; expected one of 'auto', True, False"):
        assert fragment in text, fragment


def test_range_problems_at_once():
    text = problems_of({"train": {"lr_g": -1.0},
                        "preprocess": {"image_size": 100, "structures": ["LV", "Heart"], "partial_volume": 0},
                        "split": {"test": 0.0, "train": 0.8, "val": 0.2},
                        "model": {"output_blur": -0.5, "head_layers": 5}})
    assert "train.lr_g: must be > 0" in text
    assert "preprocess.partial_volume: sub-pixels per side, 1 (nearest classes) to 8" in text
    assert "model.output_blur: a Gaussian sigma in px, 0 (off) to 4" in text
    assert "model.head_layers: 3x3 convs at full resolution, 0 (pix2pix) to 4" in text
    assert "preprocess.image_size: 100 must be >= 16 and divisible by 2^model.gen_depth" in text
    assert "preprocess.structures" in text and "Heart" in text
    assert "split: train/val/test fractions" in text


def test_structures_must_exist_in_label_map():
    text = problems_of({"data": {"label_map": {1: "Ao"}}, "preprocess": {"structures": ["Ao", "LV"]}})
    assert "['LV'] not in data.label_map" in text


def test_label_map_validation():
    text = problems_of({"data": {"label_map": {"x": "Ao", 0: "LV", 3: "Liver"}}})
    assert "'x' is not an integer" in text and "value 0 is background" in text and "'Liver'" in text


def test_label_map_presets_resolve_and_unknown_names_are_listed():
    assert params_from_dict({"data": {"label_map": "mmwhs"}}).data.label_map == MMWHS_LABEL_MAP
    ts = params_from_dict({"data": {"label_map": "totalsegmentator-heartchambers"}}).data.label_map
    assert ts == {1: "Myo", 2: "LA", 3: "LV", 4: "RA", 5: "RV", 6: "Ao", 7: "PA"}
    text = problems_of({"data": {"label_map": "totalseg"}})
    assert "'totalseg' is not a label-set preset" in text and "totalsegmentator-heartchambers" in text
    assert "expected a mapping or a string" in problems_of({"data": {"label_map": 3}})


def test_paths_cannot_escape_repo_unless_absolute(tmp_path):
    assert "escapes the repository" in problems_of({"data": {"raw_dir": "../../etc"}})
    params_from_dict({"data": {"raw_dir": str(tmp_path)}})   # absolute: deliberate, allowed


def test_overrides_and_flatten(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"iterations": 3}}))
    p = load_params(f, ["train.lr_g=0.001", "model.skip_connections=false"])
    assert p.train.iterations == 3 and p.train.lr_g == 0.001 and p.model.skip_connections is False
    flat = flatten(to_dict(p))
    assert flat["train.lr_g"] == 0.001 and "data.label_map.205" in flat


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cli_check_params_reports_cleanly(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr_d": -2}, "model": {"ngf": 0}}))
    out = subprocess.run([sys.executable, "-m", "ctsynth.cli", "check-params", "--params", str(f)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "train.lr_d: must be > 0" in out.stderr and "model.ngf/model.ndf" in out.stderr


def test_condition_encodings():
    import numpy as np

    mask = np.array([[0, 3], [6, 1]], np.uint8)          # LV=3, Ao=6, Myo=1
    onehot = encode_condition(mask, ["LV", "Ao"], "onehot")
    assert onehot.shape == (2, 2, 2) and onehot[0, 0, 1] == 1 and onehot[1, 1, 0] == 1 and onehot.sum() == 2
    index = encode_condition(mask, ["LV", "Ao", "Myo"], "index")
    np.testing.assert_allclose(index[0], [[0, 3 / 7], [6 / 7, 1 / 7]])
    wh = encode_condition(mask, ["WH"], "onehot")
    np.testing.assert_array_equal(wh[0], [[0, 1], [1, 1]])


def test_code_defaults_are_params_yaml():
    """One source of truth: every dataclass default equals params.yaml's value, so code that
    builds Params() (tests, the CLI's defaults, library callers) runs the documented default."""
    from ctsynth.core.config import Params, flatten, load_params, to_dict

    in_file, in_code = flatten(to_dict(load_params(REPO / "params.yaml"))), flatten(to_dict(Params()))
    differ = {k: (in_file.get(k), in_code.get(k)) for k in in_file.keys() | in_code.keys()
              if in_file.get(k) != in_code.get(k)}
    assert not differ, f"params.yaml vs dataclass defaults: {differ}"


def test_phantom_cli_defaults_follow_params(capsys):
    from ctsynth.cli import build_parser
    from ctsynth.core.config import load_params

    p = load_params(REPO / "params.yaml")
    args = build_parser().parse_args(["phantom", "--out", "x"])
    assert (args.cases, args.shape, args.spacing, args.seed) == (
        p.phantom.cases, list(p.phantom.shape), list(p.phantom.spacing), p.seed)


def test_default_run_has_at_least_four_test_patients_and_defaults_match_params_yaml():
    import dataclasses

    from ctsynth.core.config import Params
    from ctsynth.data.split import assign

    params = load_params(REPO / "params.yaml")
    cases = [f"ct_train_{1001 + i}" for i in range(params.phantom.cases)]
    parts = assign(cases, params)
    assert len(parts["test"]) >= 4 and len(parts["val"]) >= 2 and len(parts["train"]) >= 8
    defaults = Params()
    for section in ("phantom", "split", "evaluate"):
        assert dataclasses.asdict(getattr(defaults, section)) == dataclasses.asdict(getattr(params, section)), section


# ------------------------------------------------------------------- training seeds

def test_training_seeds_default_to_the_top_level_seed_and_are_validated():
    from ctsynth.core.config import with_training_seeds

    p = params_from_dict({"seed": 5})
    assert p.train.seed is None and p.segmenter.seed is None           # params.yaml: null, the old behaviour
    resolved = with_training_seeds(p)
    assert (resolved.train.seed, resolved.segmenter.seed, p.train.seed) == (5, 5, None)   # a copy
    own = with_training_seeds(params_from_dict({"seed": 5, "train": {"seed": 7}, "segmenter": {"seed": 0}}))
    assert (own.seed, own.train.seed, own.segmenter.seed) == (5, 7, 0)
    text = problems_of({"seed": -1, "train": {"seed": -2}, "segmenter": {"seed": -3}})
    assert "seed: must be >= 0, got -1" in text and "train.seed: must be >= 0 or null" in text
    assert "segmenter.seed: must be >= 0 or null (null: the top-level seed), got -3" in text
    assert "segmenter.seed: got 'x'; expected an integer or null" in problems_of({"segmenter": {"seed": "x"}})


def test_a_null_training_seed_resumes_the_run_of_its_value_and_another_seed_does_not():
    """The checkpoint fingerprint sees the resolved seed: train.seed null and its value are one
    run; another train.seed is another run (on the same split: the split reads the top-level seed)."""
    import torch

    from ctsynth.core.config import with_training_seeds
    from ctsynth.data.split import assign
    from ctsynth.train.checkpoint import run_fingerprint

    def fingerprint(raw):
        return run_fingerprint(with_training_seeds(params_from_dict(raw)), "data", 1, torch.device("cpu"), "fp32")

    assert fingerprint({"seed": 42}) == fingerprint({"seed": 42, "train": {"seed": 42}})
    assert fingerprint({"seed": 42}) != fingerprint({"seed": 42, "train": {"seed": 7}})
    cases = [f"c{i}" for i in range(20)]
    assert assign(cases, params_from_dict({"train": {"seed": 7}})) == assign(cases, params_from_dict({}))


def test_training_draws_from_train_seed_and_the_segmenter_from_segmenter_seed(tmp_path, monkeypatch):
    """Init (torch's global seed) and batch order (the sampler's seed) of the generator follow
    train.seed, the segmenter stage's training and its recorded seed follow segmenter.seed; a
    null one is the top-level seed. (Stops the training before its first step: fast.)"""
    import json

    import torch

    from conftest import make_store, tiny_params
    from ctsynth.segmenter import segmenter
    from ctsynth.segmenter.segmenter import SegUNet
    from ctsynth.train import train

    make_store(tmp_path / "processed")
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}))
    seen = []

    class Stop(Exception):
        pass

    def sampler(*args, seed, **kw):
        seen.append((seed, torch.initial_seed()))
        raise Stop

    def fake_train_segmenter(cfg, seed, pools, desc="segmenter"):
        seen.append(seed)
        return SegUNet(width=cfg.width), 0.0

    monkeypatch.setattr(train, "DistributedSampler", sampler)
    monkeypatch.setattr(segmenter, "train_segmenter", fake_train_segmenter)
    for top, own in ((42, 7), (42, None)):
        p = tiny_params(train={"seed": own}, segmenter={"seed": own}, tracking={"enabled": False})
        p.seed = top
        out = tmp_path / f"{top}-{own}"
        with pytest.raises(Stop):
            train.run(p, tmp_path / "processed", tmp_path / "split.json", out / "g.pt", out / "ckpt", out / "rep",
                     run_file=out / "run.json")
        summary = segmenter.run(p, tmp_path / "processed", tmp_path / "split.json", out / "seg.pt")
        assert summary["seed"] == (own if own is not None else top)
    assert seen == [(7, 7), 7, (42, 42), 42]
