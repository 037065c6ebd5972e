"""One description per param (ctsynth.tools.params_doc): each key's meaning is written once, beside
its typed field in ctsynth.core.config, and params.yaml's comments are generated from it."""
from __future__ import annotations

import dataclasses
import re

import yaml

from conftest import REPO
from ctsynth.core.config import Params
from ctsynth.tools.params_doc import descriptions, problems, render

PARAMS = REPO / "params.yaml"
MEASURED = re.compile(r"grid \d|-> ?[-+]?\d|→|\(was |\d+ seeds|\bAUC\b|\d+(\.\d+)? HU [-+]")


def _keys(obj, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        out += _keys(value, key + ".") if dataclasses.is_dataclass(value) else [key]
    return out


def test_every_key_has_one_description_beside_its_field():
    docs = descriptions()
    keys = _keys(Params())
    missing = [k for k in keys if not docs.get(k)]
    assert not missing, f"no description beside the field of {missing} (src/ctsynth/core/config.py)"
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    assert not [s for s in sections if not docs.get(s)], "every section's dataclass has a docstring"
    assert set(docs) == set(keys) | sections


def test_params_yaml_comments_are_the_descriptions():
    text = PARAMS.read_text()
    assert render(text, descriptions()) == text, "params.yaml is stale: python -m ctsynth.tools.params_doc --write"
    assert problems(text, descriptions()) == []
    comments = [line.partition(" # ")[2] for line in text.splitlines() if not line.startswith("#")]
    measured = [c for c in comments if MEASURED.search(c)]
    assert not measured, f"params.yaml comments hold run results (docs/experiments/defaults.md): {measured}"


def test_render_sets_each_comment_and_keeps_everything_else():
    text = ("# header kept\n\ntrain:                        # old section text\n"
            "  lr_g: 0.0004                # old: 4e-4 (was 2e-4)\n"
            "                              # grid 21, a stale continuation\n"
            "  unknown: 3                  # not a field: kept\n"
            "data:\n  label_map:\n    205: Myo\n")
    docs = {"train": "What training computes.", "train.lr_g": "Adam step size of G", "data.label_map": "value -> name"}
    assert render(text, docs) == ("# header kept\n\ntrain:                        # What training computes.\n"
                                  "  lr_g: 0.0004                # Adam step size of G\n"
                                  "  unknown: 3                  # not a field: kept\n"
                                  "data:\n  label_map:                  # value -> name\n    205: Myo\n")
    assert yaml.safe_load(render(text, docs)) == yaml.safe_load(text)              # values untouched


def test_descriptions_read_the_same_line_and_the_lines_above(tmp_path):
    source = tmp_path / "config.py"
    source.write_text('''
from dataclasses import dataclass, field

@dataclass
class TrainCfg:
    """What training computes. More text."""
    lr: float = 1e-3                                 # step size
    #: a long description that did not fit
    #: on the field's own line
    steps: int = 5


@dataclass
class Params:
    seed: int = 1                                    # the seed
    train: TrainCfg = field(default_factory=TrainCfg)
''')
    assert descriptions(source) == {"seed": "the seed", "train": "What training computes.", "train.lr": "step size",
                                    "train.steps": "a long description that did not fit on the field's own line"}
