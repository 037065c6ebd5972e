"""dvc.yaml's dependencies are correct by construction: each stage's code deps are exactly the
package files its script imports (transitively, function-level imports included; a complete
folder as the folder: ctsynth.tools.deps computes them, `python -m ctsynth.tools.deps --write`
writes them), and the train stage's params are exactly the keys that change its outputs. A new
import without a dep would let `dvc status` call a stale result up to date; these tests fail first."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ctsynth.core.config import Params, TrainCfg, fingerprint_exempt, to_dict
from ctsynth.core.imports import closure, imports_of, script_closure
from ctsynth.tools.deps import code_deps, rewrite

PKG = REPO / "src" / "ctsynth"


def import_closure(script: Path) -> set[str]:
    """``src/ctsynth/...`` files that running ``script`` may import."""
    return {f"src/ctsynth/{m}" for m in script_closure(script)}


def test_no_import_circle_in_the_package():
    graph = {p.relative_to(PKG).as_posix(): imports_of(p) for p in PKG.rglob("*.py")}
    for start in graph:
        todo, seen = [m for m in graph[start] if not m.endswith("__init__.py")], set()
        while todo:
            mod = todo.pop()
            assert mod != start, f"import circle through {start}"
            if mod not in seen:
                seen.add(mod)
                todo += [m for m in graph[mod] if not m.endswith("__init__.py")]


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("src/ctsynth")}


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_code_deps_are_exactly_what_its_script_imports(name):
    """Every module the script may import is a listed file or inside a listed folder (else `dvc
    status` could call a stale result up to date), and nothing else is listed (else an unrelated
    edit, e.g. of the report or a tool, would rerun it -- for train: retrain)."""
    stage = _stages()[name]
    script = REPO / "stages" / f"{name}.py"
    assert f"stages/{name}.py" in stage["deps"]
    want, have = code_deps(script), sorted(_code_deps(stage))
    assert have == want, (f"dvc.yaml stage {name!r}: add deps {sorted(set(want) - set(have))}, remove deps "
                          f"{sorted(set(have) - set(want))} (python -m ctsynth.tools.deps --write)")
    covered = {p for p in import_closure(script) if any(p == d or p.startswith(d + "/") for d in have)}
    assert covered == import_closure(script)
    listed_files = {p for d in have for p in ([d] if d.endswith(".py") else
                                              [f"src/ctsynth/{m.relative_to(PKG).as_posix()}"
                                               for m in (REPO / d).rglob("*.py")])}
    assert listed_files == import_closure(script)


def test_no_stage_runs_a_tool_and_a_report_edit_never_retrains():
    """compare, presets, bench, review and the studies' runners (ctsynth.tools) are imported by no
    stage: editing them leaves `dvc status` clean."""
    for name, stage in _stages().items():
        tools = [d for d in _code_deps(stage) if d.startswith("src/ctsynth/tools") or d == "src/ctsynth/cli.py"]
        assert not tools, name
    deps = _code_deps(_stages()["train"])
    assert not [d for d in deps if d.startswith(("src/ctsynth/report", "src/ctsynth/evaluate"))], deps


def test_the_deps_writer_replaces_only_the_code_deps():
    text = ("stages:\n  a:\n    cmd: x\n    deps:\n      - stages/a.py\n      - src/ctsynth/core\n"
            "      - data/in   # keep\n    outs:\n      - out\n  b:\n    deps:\n      - stages/b.py\n"
            "      - src/ctsynth/old.py\n")
    new = rewrite(text, {"a": ["src/ctsynth/__init__.py", "src/ctsynth/core/io.py"], "b": ["src/ctsynth/data"]})
    assert new == ("stages:\n  a:\n    cmd: x\n    deps:\n      - stages/a.py\n      - src/ctsynth/__init__.py\n"
                   "      - src/ctsynth/core/io.py\n      - data/in   # keep\n    outs:\n      - out\n  b:\n"
                   "    deps:\n      - stages/b.py\n      - src/ctsynth/data\n")


def test_stages_run_the_code_of_their_own_checkout():
    """`dvc exp run --queue/--temp` runs stages in a temporary copy, while the venv's editable
    install points at the workspace's src/: without PYTHONPATH=src a queued experiment would run
    whatever the workspace holds when it starts, not the code DVC hashed into its dvc.lock."""
    for name, stage in _stages().items():
        assert stage["cmd"].startswith(f"PYTHONPATH=src python stages/{name}.py "), name


def test_the_closure_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import added inside a function widens the closure by the imported
    module and everything it imports (so the test above fails until dvc.yaml lists it)."""
    base = import_closure(REPO / "stages" / "split.py")
    assert "src/ctsynth/data/split.py" in base and "src/ctsynth/__init__.py" in base
    assert "src/ctsynth/evaluate/nearest.py" not in base
    script = tmp_path / "split.py"
    script.write_text((REPO / "stages" / "split.py").read_text()
                      + "\n\ndef later():\n    from ctsynth.evaluate import nearest\n")
    wider = import_closure(script)
    assert "src/ctsynth/evaluate/nearest.py" in wider and "src/ctsynth/evaluate/__init__.py" in wider
    assert "src/ctsynth/evaluate/nearest.py" in set(code_deps(script)) - set(code_deps(REPO / "stages" / "split.py"))
    assert closure({"evaluate/nearest.py"}) >= {"core/errors.py", "core/__init__.py"}


def test_train_params_are_exactly_the_keys_that_change_its_outputs():
    """Train reruns for seed, model.* and train.* -- whole sections, so a new train key needs no
    dvc.yaml edit; never for train_run.* (how a run is steered: log cadence, checkpoints, resume,
    workers, rendezvous) or tracking.*, which no computing stage lists (the report lists
    train_run: its configuration table shows it). The checkpoint fingerprint hashes every train
    key but exactly those declared with `not_in_fingerprint` next to their fields."""
    import dataclasses

    import torch

    from ctsynth.train import checkpoint

    stages = _stages()
    assert stages["train"]["params"] == ["seed", "model", "train"]
    for name, stage in stages.items():
        sections = {key.split(".")[0] for key in stage.get("params", [])}
        assert "tracking" not in sections, name
        assert "train_run" not in sections or name == "report", name

    marked = {f.name for f in dataclasses.fields(TrainCfg) if f.metadata.get("fingerprint") is False}
    assert marked == fingerprint_exempt(TrainCfg) == checkpoint.NOT_IN_FINGERPRINT
    assert marked == {"nproc", "nnodes", "device", "snapshot_at", "snapshot_count"}

    def fingerprint(p):
        return checkpoint.run_fingerprint(p, "data", 1, torch.device("cpu"), "fp32")

    base = Params()
    base.train.lr_decay_start = 0.5           # with decay, iterations shape the trajectory too
    ref = fingerprint(base)
    for section, keys in (("train", to_dict(base.train)), ("train_run", to_dict(base.train_run))):
        for key in keys:
            changed = Params(train=dataclasses.replace(base.train), train_run=dataclasses.replace(base.train_run))
            setattr(getattr(changed, section), key, "<changed>")
            hashed = section == "train" and key not in marked
            assert (fingerprint(changed) != ref) == hashed, f"{section}.{key}"
    longer = Params(train=dataclasses.replace(base.train, lr_decay_start=None))
    assert fingerprint(longer) == fingerprint(Params(train=dataclasses.replace(longer.train, iterations=10**6)))


def test_every_params_key_in_dvc_yaml_exists():
    valid = set()
    for section, values in to_dict(Params()).items():
        valid.add(section)
        if isinstance(values, dict):
            valid |= {f"{section}.{k}" for k in values}
    for name, stage in _stages().items():
        for key in stage.get("params", []):
            assert key in valid, f"stage {name}: unknown params key {key}"


def test_training_code_enters_the_checkpoint_fingerprint(tmp_path, monkeypatch):
    """Editing code that training imports changes ctsynth.core.imports.source_hash("train") (so DVC's
    rerun of train starts afresh instead of resuming the old code's finished run); editing a
    module training does not import leaves it alone."""
    import shutil

    from ctsynth.core import imports
    copy = tmp_path / "ctsynth"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(imports, "PKG", copy)
    before = imports.source_hash("train/train.py")
    assert "train/gan.py" in imports.closure({"train/train.py"})
    assert "evaluate/nearest.py" not in imports.closure({"train/train.py"})
    privacy, gan = copy / "evaluate" / "nearest.py", copy / "train" / "gan.py"
    privacy.write_text(privacy.read_text() + "\n# unrelated edit\n")
    assert imports.source_hash("train/train.py") == before
    gan.write_text(gan.read_text() + "\n# a change to the GAN step\n")
    assert imports.source_hash("train/train.py") != before


def test_study_cells_list_the_generator_config_they_train():
    """A utility-study cell with n <= study.own_generator_max_n trains a generator of the
    pipeline's config (`_train_own_generator` -> train.train.run): every params section the train
    stage lists must be a params dep of the cell too, else editing model.* or train.* would leave
    those cells called up to date with another generator's results."""
    study = yaml.safe_load((REPO / "studies" / "utility" / "dvc.yaml").read_text())["stages"]["cell"]
    listed = set()
    for entry in study["params"]:
        if isinstance(entry, dict):
            listed |= {key.split(".")[0] for key in entry.get("../../params.yaml", [])}
    assert set(_stages()["train"]["params"]) <= listed, sorted(set(_stages()["train"]["params"]) - listed)


def test_every_pipeline_file_lists_exact_code_deps():
    """dvc.yaml and the on-demand studies' pipelines hold what ctsynth.tools.deps computes (the study
    cells: the closure of their runner, never compare, presets or bench)."""
    from ctsynth.tools.deps import expected

    for path, text in expected().items():
        assert path.read_text() == text, f"{path}: code deps differ; python -m ctsynth.tools.deps --write"
    study = yaml.safe_load((REPO / "studies" / "utility" / "dvc.yaml").read_text())["stages"]["cell"]["deps"]
    assert not [d for d in study if d.endswith(("tools/compare.py", "tools/presets.py")) or "tools/bench" in d]
