"""Which ``ctsynth`` source files a file imports, transitively (read from the source, not executed).

Two uses that must agree: ``tests/test_dvc_deps.py`` holds each DVC stage's code deps (folders of
the package) to cover the closure of its script, and training folds the source of its closure
into the checkpoint fingerprint -- so whenever DVC reruns train because its code changed, training
starts afresh instead of "resuming" a finished run of the old code.

Modules are named by their path inside the package (``"core/config.py"``); importing a module
runs every ``__init__.py`` above it, so those belong to the closure too.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]


def _module_file(dotted: str) -> str | None:
    """``"ctsynth.core.config"`` -> ``"core/config.py"`` (a package -> its ``__init__.py``)."""
    parts = dotted.split(".")
    if parts[0] != "ctsynth":
        return None
    rel = "/".join(parts[1:])
    for cand in (f"{rel}.py", f"{rel}/__init__.py" if rel else "__init__.py"):
        if (PKG / cand).is_file():
            return cand
    return None


def _with_parents(rel: str) -> set[str]:
    """``rel`` and the ``__init__.py`` of every package above it."""
    out, parts = {rel}, rel.split("/")[:-1]
    for i in range(len(parts) + 1):
        out.add("/".join([*parts[:i], "__init__.py"]))
    return out


def imports_of(path: Path) -> set[str]:
    """Package files ``path`` imports anywhere (top level or inside functions; a top-level
    ``if __name__ == "__main__":`` block is an entry point, not an import)."""
    path = path.resolve()
    here = ["ctsynth", *path.parent.relative_to(PKG).parts] if path.is_relative_to(PKG) else None
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_module_file(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if here is None:
                    continue
                base = here[:len(here) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            found.add(_module_file(mod))
            found |= {_module_file(f"{mod}.{a.name}") for a in node.names}   # from pkg import module
    return set().union(*(_with_parents(f) for f in found if f))


def closure(modules) -> set[str]:
    """``modules`` and every package file they import, transitively (paths inside the package)."""
    todo, seen = list(modules), set()
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += list(imports_of(PKG / mod) | _with_parents(mod))
    return seen


def script_closure(script: Path) -> set[str]:
    """Package files that running ``script`` may import."""
    return closure(imports_of(script))


def source_hash(module: str) -> str:
    """Hash of the source of ``module`` (e.g. ``"train/train.py"``) and of everything it imports."""
    h = hashlib.sha256()
    for name in sorted(closure({module})):
        h.update(name.encode())
        h.update((PKG / name).read_bytes())
    return h.hexdigest()[:16]
