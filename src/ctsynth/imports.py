"""Which ``ctsynth`` modules a file imports, transitively (read from the source, not executed).

Two uses that must agree: ``tests/test_dvc_deps.py`` holds each DVC stage's code deps to the
closure of its script, and training folds the source of its closure into the checkpoint
fingerprint -- so whenever DVC reruns train because its code changed, training starts afresh
instead of "resuming" a finished run of the old code.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PKG = Path(__file__).resolve().parent


def imports_of(path: Path) -> set[str]:
    """Names of the package modules ``path`` imports anywhere (top level or inside functions;
    a top-level ``if __name__ == "__main__":`` block is an entry point, not an import)."""
    found: set[str] = set()
    in_pkg = path.resolve().parent == PKG
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ctsynth.")}
            found |= {"__init__" for a in node.names if a.name == "ctsynth"}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level and in_pkg:                          # from .x import y / from . import x
                found |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif mod == "ctsynth":                             # from ctsynth import x
                found |= {a.name for a in node.names}
            elif mod.startswith("ctsynth."):
                found.add(mod.split(".")[1])
    return {m for m in found if (PKG / f"{m}.py").is_file()}


def closure(modules) -> set[str]:
    """``modules`` and every package module they import, transitively (module names)."""
    todo, seen = list(modules), set()
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += list(imports_of(PKG / f"{mod}.py"))
    return seen


def script_closure(script: Path) -> set[str]:
    """Package modules that running ``script`` may import (``__init__`` always runs first)."""
    return closure(imports_of(script) | {"__init__"})


def source_hash(module: str) -> str:
    """Hash of the source of ``module`` and of everything it imports from the package."""
    h = hashlib.sha256()
    for name in sorted(closure({module, "__init__"})):
        h.update(name.encode())
        h.update((PKG / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]
