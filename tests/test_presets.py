"""Presets are overlays of params.yaml: `ctsynth preset` merges one into params.yaml (comments kept),
rejects unknown keys all at once, validates the result, and the expanded paper preset passes DVC's
own check that every stage's params exist (`dvc repro` refuses a stage whose params are missing)."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ctsynth.core.config import Params, load_params, to_dict
from ctsynth.core.errors import ConfigError
from ctsynth.tools.presets import apply_preset, expand, preset_path

STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


# ------------------------------------------------------------------ DVC's own params check

def dvc_workspace(root: Path, params_text: str) -> Path:
    """A scratch git + DVC repo with the pipeline's dvc.yaml, stage scripts and package, the given
    params.yaml and a placeholder for every output and templated input, so `dvc repro --dry`
    walks every stage (running none) and checks each stage's params like a real repro does."""
    root.mkdir(parents=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "src" / "ctsynth", root / "src" / "ctsynth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "reviews", root / "reviews")                  # git-tracked input of the share stage
    (root / "studies" / "utility").mkdir(parents=True)                   # git-tracked input of the report stage
    shutil.copy2(REPO / "studies" / "utility" / "published.json", root / "studies" / "utility" / "published.json")
    shutil.copy2(REPO / "studies" / "utility" / "dvc.lock", root / "studies" / "utility" / "dvc.lock")
    (root / "params.yaml").write_text(params_text)
    params = yaml.safe_load(params_text)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        paths = [next(iter(o)) if isinstance(o, dict) else o
                 for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
        paths += [d for d in stage["deps"] if "${" in d]             # ${data.raw_dir}
        for path in paths:
            for key in re.findall(r"\$\{([^}]+)\}", path):
                value = params
                for part in key.split("."):
                    value = (value or {}).get(part)
                path = path.replace("${" + key + "}", str(value))
            target = root / path
            if target.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("placeholder\n")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / "placeholder").write_text("placeholder\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q", check=True)
    return root


def dvc(root: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env=env, timeout=120, check=check)


def test_the_expanded_paper_preset_passes_dvcs_params_check_for_every_stage(tmp_path):
    root = dvc_workspace(tmp_path / "paper", expand("paper", REPO / "params.yaml").text)
    out = dvc(root, "repro", "--dry")
    shown = out.stdout + out.stderr
    assert out.returncode == 0 and "missing" not in shown, shown[-3000:]
    ran = [ln.split("'")[1] for ln in out.stdout.splitlines() if ln.startswith("Running stage '")]
    assert ran == STAGES, ran


def test_dvcs_params_check_fails_when_a_listed_section_is_missing(tmp_path):
    """The check above can fail: without `synthesize` (what copying the old params/paper.yaml over
    params.yaml did) the same command stops at that stage."""
    raw = yaml.safe_load(expand("paper", REPO / "params.yaml").text)
    del raw["synthesize"]
    root = dvc_workspace(tmp_path / "broken", yaml.safe_dump(raw, sort_keys=False))
    out = dvc(root, "repro", "--dry")
    assert out.returncode != 0
    assert "Parameters 'synthesize' are missing from 'params.yaml'" in out.stderr, out.stderr[-3000:]


# --------------------------------------------------------------------------- merging

def _comments(text: str) -> list[str]:
    return [m.group(0).rstrip() for line in text.splitlines() for m in [re.search(r"#.*$", line)] if m]


def test_an_empty_overlay_leaves_params_yaml_byte_for_byte(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert expand(tmp_path / "empty.yaml", REPO / "params.yaml").text == (REPO / "params.yaml").read_text()


def test_the_paper_preset_sets_its_keys_keeps_the_rest_and_every_comment(tmp_path):
    base = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", base)
    out = tmp_path / "merged.yaml"
    expanded = apply_preset("paper", base, out)
    text = out.read_text()
    assert text == expanded.text and base.read_text() == (REPO / "params.yaml").read_text()
    assert _comments(text) == _comments(base.read_text())          # every comment, in order
    merged, overlay = load_params(out), yaml.safe_load(preset_path("paper").read_text())
    default = to_dict(load_params(base))
    for section, values in to_dict(merged).items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            want = (overlay.get(section) or {}).get(key, default[section][key]) \
                if key is not None else overlay.get(section, default[section])
            assert value == want, (section, key, value, want)
    assert (merged.preprocess.image_size, merged.model.gen_depth, merged.model.encoding) == (256, 7, "index")
    assert (merged.train.iterations, merged.train.lr_g, merged.train.lr_d) == (100000, 1.3e-4, 1.5e-4)
    assert merged.model.skip_connections is False and merged.train.augment == "none"
    assert (merged.split.train, merged.split.val, merged.split.test) == (0.75, 0.1, 0.15)
    assert (merged.data.source, merged.data.raw_dir, merged.train.nproc) == ("nifti", "data/mmwhs", 2)
    assert (merged.train_run.checkpoint_every, merged.segmenter.iterations, merged.segmenter.width) == (1000, 3000, 32)
    assert "train.iterations" in expanded.changed and "synthesize.cases" not in expanded.changed
    assert apply_preset("paper", out, out).changed == {}                 # idempotent


def test_unknown_overlay_keys_are_one_error_naming_all_of_them_and_nothing_is_written(tmp_path):
    base = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", base)
    bad = tmp_path / "typos.yaml"
    bad.write_text("nonsense: 1\ntrain:\n  lr_g: 0.0001\n  itertions: 5\ntrain_run:\n  log_evry: 3\n"
                   "model: {ngf: 8, gen_dpth: 3}\n")
    with pytest.raises(ConfigError) as e:
        apply_preset(bad, base, base)
    assert len(e.value.problems) == 1, e.value.problems
    msg = e.value.problems[0]
    assert str(bad) in msg
    for key in ("nonsense", "train.itertions", "train_run.log_evry", "model.gen_dpth"):
        assert key in msg, key
    assert "train.lr_g" not in msg and "model.ngf" not in msg
    assert base.read_text() == (REPO / "params.yaml").read_text()


def test_the_merged_params_are_validated_before_writing(tmp_path):
    base = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", base)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_g: -1\npreprocess:\n  image_size: 100\nsplit: 3\n")
    with pytest.raises(ConfigError) as e:
        apply_preset(bad, base, base)
    assert any("split: must be a mapping" in p for p in e.value.problems), e.value.problems
    bad.write_text("train:\n  lr_g: -1\npreprocess:\n  image_size: 100\n")
    with pytest.raises(ConfigError) as e:
        apply_preset(bad, base, base)
    text = "\n".join(e.value.problems)
    assert "train.lr_g: must be > 0" in text and "preprocess.image_size: 100" in text
    assert base.read_text() == (REPO / "params.yaml").read_text()


def test_preset_names_and_files(tmp_path):
    assert preset_path("paper") == REPO / "params" / "paper.yaml"
    with pytest.raises(ConfigError, match="named presets: paper"):
        preset_path("papre")
    with pytest.raises(ConfigError, match="not found"):
        preset_path(tmp_path / "missing.yaml")


def test_cli_preset_writes_the_merged_file(tmp_path, capsys):
    from ctsynth.cli import main as cli_main

    base, out = tmp_path / "params.yaml", tmp_path / "out.yaml"
    shutil.copy2(REPO / "params.yaml", base)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["preset", "paper", "--params", str(base), "--out", str(out)])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "values changed" in shown and "train.iterations: 1250 -> 100000" in shown
    assert to_dict(load_params(out)) == to_dict(expand("paper", base).params)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["preset", "nope", "--params", str(base), "--out", str(out)])
    assert exit_info.value.code != 0


def test_the_bench_expands_the_paper_preset_the_same_way():
    from ctsynth.tools.bench.training import paper_preset

    model, hp = paper_preset()
    paper = expand("paper", REPO / "params.yaml").params
    assert model == to_dict(paper.model)
    assert hp["lr_g"] == paper.train.lr_g and hp["lr_d"] == paper.train.lr_d


# --------------------------------------------------------------------- params.yaml = dataclasses

def test_every_key_of_params_yaml_is_a_dataclass_field_and_vice_versa():
    """Both ways: the loader rejects unknown keys, and params.yaml spells out every field (a key
    missing from it would be missing from the file DVC hashes, and from what presets merge into)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    hints = typing.get_type_hints(Params)
    assert set(raw) == {f.name for f in dataclasses.fields(Params)}
    for f in dataclasses.fields(Params):
        if dataclasses.is_dataclass(hints[f.name]):
            assert set(raw[f.name]) == {g.name for g in dataclasses.fields(hints[f.name])}, f.name
