"""The code deps of every DVC stage, exactly: what its script imports, and nothing else.

A stage's code deps are the package files in the import closure of its script (function-level
imports included: :mod:`ctsynth.core.imports`), so that

* editing a module a stage runs makes that stage stale (``dvc status`` never calls a stale result
  up to date), and
* editing a module it does not run leaves it alone: the tools (``ctsynth.tools``: compare, presets,
  bench, review, the studies' runners) are imported by no stage, so editing them never makes the
  pipeline stale, and a report edit never retrains.

A folder whose every module is in the closure is listed as the folder, to keep ``dvc.yaml``
readable; otherwise the files are listed one by one. ``tests/test_dvc_deps.py`` fails when
``dvc.yaml`` differs from what this module computes; after adding an import, run::

    python -m ctsynth.tools.deps            # say which pipeline files differ
    python -m ctsynth.tools.deps --write    # rewrite their code deps (everything else kept)

The on-demand studies (``studies/<name>/dvc.yaml``) get the same: the closure of their runner.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctsynth.core.imports import PKG, closure, script_closure
from ctsynth.core.io import sync_text

REPO = PKG.parents[1]
PREFIX = "src/ctsynth/"
STUDIES = {"studies/utility/dvc.yaml": ("tools/utility_study.py",)}   # on-demand pipelines: what their stages run
CLI_FILE = "cli.py"      # the studies' stages run `python -m ctsynth.cli study ...`: its own file, not its closure


def _modules(folder: Path) -> set[str]:
    """Every ``.py`` file under ``folder`` (recursively), as paths inside the package."""
    return {p.relative_to(PKG).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def compact(modules: set[str], prefix: str = PREFIX) -> list[str]:
    """``modules`` (paths inside the package) as deps: a complete folder as the folder (sorted)."""
    out: set[str] = set()
    for folder in {m.split("/")[0] for m in modules if "/" in m}:
        inside = {m for m in modules if m.startswith(folder + "/")}
        out |= {prefix + folder} if inside == _modules(PKG / folder) else {prefix + m for m in inside}
    out |= {prefix + m for m in modules if "/" not in m}
    return sorted(out)


def code_deps(script: Path) -> list[str]:
    """``src/ctsynth/...`` deps of a stage ``script``: the files of its import closure."""
    return compact(script_closure(script))


def study_prefix(dvc_file: str) -> str:
    """How a study pipeline's file names the package: relative to the study's folder."""
    return "../" * (len(Path(dvc_file).parts) - 1) + PREFIX


def study_deps(dvc_file: str) -> list[str]:
    """The code deps of every stage of an on-demand study pipeline (paths relative to its folder)."""
    return compact(closure(STUDIES[dvc_file]) | {CLI_FILE, "__init__.py"}, study_prefix(dvc_file))


def stage_scripts(repo: Path = REPO) -> dict[str, Path]:
    """``{stage: stages/<stage>.py}`` for every stage of ``dvc.yaml``."""
    import yaml

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {name: repo / "stages" / f"{name}.py" for name in stages}


def rewrite(text: str, deps: dict[str, list[str]], prefix: str = PREFIX) -> str:
    """A ``dvc.yaml``'s text with each stage's package deps (lines ``- <prefix>...``) replaced by
    ``deps[stage]``, written where the first of them stood; every other line kept as it is."""
    out, stage, done = [], None, set()
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and stripped.endswith(":"):
            stage = stripped[:-1]
        if stage in deps and stripped.startswith("- " + prefix):
            if stage not in done:
                indent = line[:len(line) - len(line.lstrip())]
                out += [f"{indent}- {d}\n" for d in deps[stage]]
                done.add(stage)
            continue
        out.append(line)
    return "".join(out)


def expected() -> dict[Path, str]:
    """Every pipeline file's text as it should be."""
    import yaml

    files = {REPO / "dvc.yaml": rewrite((REPO / "dvc.yaml").read_text(),
                                        {n: code_deps(s) for n, s in stage_scripts().items()})}
    for dvc_file in STUDIES:
        path = REPO / dvc_file
        stages = yaml.safe_load(path.read_text())["stages"]
        deps = study_deps(dvc_file)
        files[path] = rewrite(path.read_text(), {n: deps for n in stages}, study_prefix(dvc_file))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctsynth.tools.deps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    args = parser.parse_args(argv)
    said = {"current": "code deps exact", "rewritten": "code deps rewritten",
            "differs": "code deps differ (--write rewrites them)"}
    for path, text in expected().items():
        print(f"{path.relative_to(REPO)}: {said[sync_text(path, text, args.write)]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
