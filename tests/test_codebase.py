"""The codebase stays readable: functions fit on a screen, the training loop's module stays
small, the subpackages follow the architecture (each imports only the layers below it), and
library modules never import the stage glue."""
from __future__ import annotations

import ast

from conftest import REPO
from ctsynth.core.imports import PKG, imports_of

SRC = REPO / "src" / "ctsynth"
LONG_ON_PURPOSE = {("phantom.py", "make_case")}     # the anatomy builder: one recipe, top to bottom

# Which subpackages each subpackage may import (besides itself). Foundations first, stage rooms
# above them; report renders files and never loads or runs a model (no synth, no train). tools/
# (compare, presets, bench, review, the studies) and cli.py are entry points: they may use anything,
# and no stage imports them.
LAYERS = {
    "core": set(),
    "data": {"core"},
    "train": {"core", "data"},
    "evaluate": {"core", "data", "segmenter"},              # FD/KID features and Dice of the segmenter
    "segmenter": {"core", "data", "evaluate/__init__.py", "evaluate/metrics.py"},   # its Dice
    "utility": {"core", "data", "evaluate", "segmenter"},
    "privacy": {"core", "data", "evaluate", "segmenter", "utility"},   # the synthetic cases' store
    "synth": {"core", "data", "train", "report/__init__.py", "report/figures.py"},  # case grids
    "report": {"core", "data", "evaluate"},
    "share": {"core", "data", "train", "synth"},   # the card reads the generator file; nnU-Net dataset.json
}
ENTRY_POINTS = {"tools"}


def _top(rel: str) -> str:
    return rel.split("/")[0] if "/" in rel else rel


def test_no_function_over_80_lines():
    long = [(path.name, node.name, node.end_lineno - node.lineno + 1)
            for path in sorted(SRC.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 80 and (path.name, node.name) not in LONG_ON_PURPOSE]
    assert not long, long


def test_no_function_takes_more_than_6_positional_parameters():
    """Readable signatures: past six, parameters are keyword-only (named at every call) or gathered
    in the config sections and small dataclasses they come from."""
    wide = [(path.relative_to(SRC).as_posix(), node.name)
            for path in sorted(SRC.rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and len([a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]) > 6]
    assert not wide, wide


def test_every_module_lives_in_a_subpackage():
    flat = sorted(p.name for p in SRC.glob("*.py"))
    assert flat == ["__init__.py", "cli.py"], flat
    assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__") == \
        sorted([*LAYERS, *ENTRY_POINTS])


def test_subpackages_import_only_the_layers_below():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        layer = _top(rel)
        if layer not in LAYERS:                     # cli.py, tools/: entry points may use anything
            continue
        for dep in imports_of(path):
            top = _top(dep)
            if top in (layer, "__init__.py") or top in LAYERS[layer] or dep in LAYERS[layer]:
                continue
            wrong.append(f"{rel} imports {dep}")
    assert not wrong, wrong


def test_the_layer_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from ctsynth.synth.generate import run\n")
    assert "synth/generate.py" in imports_of(bad) and "synth/__init__.py" in imports_of(bad)


def test_library_modules_never_import_the_stage_glue():
    """Layering: only entry points (cli, tools) import runner; library modules use
    ctsynth.core.progress and import neither runner nor cli (a `python -m` block is an entry
    point, not an import)."""
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in ("cli.py", "core/runner.py"):
            continue
        for dep in imports_of(path):
            assert dep not in ("cli.py", "core/runner.py"), f"{rel} imports {dep}"


def test_stages_start_without_what_they_do_not_use():
    """Every stage process pays its imports: the torch-free stages never import torch, seeding
    makes torch deterministic without importing the compiler stack (seconds per stage), and the
    utility stage's metrics leave piq/torchvision (torch._dynamo) to the evaluate stage."""
    import subprocess
    import sys

    code = """
import sys
from ctsynth.core.runner import seed_everything
import ctsynth.data.phantom, ctsynth.data.ingest, ctsynth.data.preprocess
seed_everything(1, torch=False)
assert "torch" not in sys.modules, "torch-free stages imported torch"
seed_everything(1)
import torch
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
import ctsynth.utility.utility
heavy = sorted(m for m in ("torch._inductor", "torch._dynamo", "torchvision", "piq") if m in sys.modules)
assert not heavy, heavy
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
