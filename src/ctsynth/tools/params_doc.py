"""params.yaml's comments, generated from the one description of every key.

Each key's meaning and range are written once, beside its typed field in
:mod:`ctsynth.core.config`: the comment on the field's line, or a ``#:`` comment on the lines right
above it when it does not fit there; a section's is the first sentence of its dataclass's
docstring. The comments of ``params.yaml`` are these descriptions, one line per key::

    python -m ctsynth.tools.params_doc            # say whether params.yaml's comments are current
    python -m ctsynth.tools.params_doc --write    # rewrite them (values, order, header kept)

``tests/test_params_doc.py`` fails when they differ. Descriptions say what a key does and why its
default is what it is; measured results belong in ``docs/experiments/`` (defaults.md), not here.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

from ctsynth.core.imports import PKG
from ctsynth.core.io import sync_text

CONFIG = PKG / "core" / "config.py"
PARAMS = PKG.parents[1] / "params.yaml"
COLUMN = 30                                   # where a comment starts in params.yaml
MAX_LINE = 120
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*|\d+):(?P<value>[^#]*?)\s*(?P<comment>#.*)?$")


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def descriptions(source: Path = CONFIG) -> dict[str, str]:
    """``{"train.lr_g": "...", "train": "<section>", ...}`` from the dataclasses of ``source``."""
    text = source.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    paths, todo = {"Params": ""}, ["Params"]
    while todo:                                              # section path of every config dataclass
        name = todo.pop()
        for stmt in classes[name].body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.annotation, ast.Name) \
                    and stmt.annotation.id in classes:
                paths[stmt.annotation.id] = f"{paths[name]}.{stmt.target.id}".lstrip(".")
                todo.append(stmt.annotation.id)
    out = {}
    for name, path in paths.items():
        node = classes[name]
        doc = ast.get_docstring(node)
        if path and doc:
            out[path] = _first_sentence(doc)
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            if isinstance(stmt.annotation, ast.Name) and stmt.annotation.id in classes:
                continue                                     # a subsection: described by its docstring
            key = f"{path}.{stmt.target.id}".lstrip(".")
            same = lines[stmt.end_lineno - 1].partition("  # ")[2].strip()
            above, i = [], stmt.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                above.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            out[key] = " ".join(above) if above else same
    return out


def render(text: str, docs: dict[str, str]) -> str:
    """``text`` (a params file) with the comment of every described key set to its description;
    continuation comment lines under a described key dropped; everything else kept."""
    out, stack, described = [], [], False
    for line in text.splitlines():
        m = _KEY.match(line)
        if not m:
            if described and line.strip().startswith("#") and line.startswith(" " * COLUMN):
                continue                                     # an old continuation of a described key
            described = False
            out.append(line)
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        path = ".".join(k for _, k in stack)
        doc = docs.get(path)
        described = doc is not None
        if not described:
            out.append(line)
            continue
        code = f"{m['indent']}{m['key']}:" + (f" {m['value'].strip()}" if m["value"].strip() else "")
        out.append(f"{code.ljust(COLUMN - 1)} # {doc}" if doc else code)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def problems(text: str, docs: dict[str, str]) -> list[str]:
    """What is wrong with a params file's comments: keys without a description, lines too long."""
    out = [f"{key}: no description beside its field in {CONFIG.name}" for key, doc in docs.items() if not doc]
    out += [f"line {i}: {len(line)} characters (at most {MAX_LINE})"
            for i, line in enumerate(text.splitlines(), 1) if len(line) > MAX_LINE]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctsynth.tools.params_doc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(PARAMS), help="the params file (default: the repo's params.yaml)")
    parser.add_argument("--write", action="store_true", help="rewrite its comments")
    args = parser.parse_args(argv)
    path, docs = Path(args.params), descriptions()
    new = render(path.read_text(), docs)
    said = {"current": "comments current", "rewritten": f"comments rewritten from {CONFIG}",
            "differs": f"comments differ from {CONFIG} (--write rewrites them)"}
    print(f"{path}: {said[sync_text(path, new, args.write)]}")
    for p in problems(new, docs):
        print(f"{path}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
