"""One place per path: the pipeline's files live in ``ctsynth.core.paths.PATHS``. dvc.yaml must
spell them too (DVC needs them), so these tests hold its stage commands, its deps/outs and every
stage script's path options (defaults: what `dvc repro` passes) equal to that table."""
from __future__ import annotations

import argparse
import shlex

import pytest
import yaml

from conftest import REPO, load_stage
from ctsynth.core.paths import PATHS, pipeline_path
from ctsynth.core.runner import add_inputs, add_output, add_path

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = sorted(DVC["stages"])
CODE = ("stages/", "src/")


def command_options(name: str) -> dict[str, str]:
    """``--flag value`` pairs after ``stages/<name>.py`` in the stage's dvc.yaml command."""
    words = shlex.split(DVC["stages"][name]["cmd"])
    words = words[words.index(f"stages/{name}.py") + 1:]
    assert all(w.startswith("--") for w in words[::2]) and len(words) % 2 == 0, (name, words)
    return dict(zip(words[::2], words[1::2]))


def path_options(name: str) -> dict[str, argparse.Action]:
    """The options of ``stages/<name>.py`` (its ``add_args``), by flag."""
    parser = argparse.ArgumentParser()
    load_stage(name).add_args(parser)
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_dvc_stage_has_its_script():
    assert STAGES and all((REPO / "stages" / f"{name}.py").is_file() for name in STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_the_command_passes_the_tables_paths(name):
    options = path_options(name)
    for flag, value in command_options(name).items():
        if "${" in value:                                   # a params value, not a pipeline path
            continue
        action = options.get(flag)
        assert action is not None, f"dvc.yaml {name}: stages/{name}.py has no option {flag}"
        table = getattr(action, "pipeline_name", None)
        assert table, f"stages/{name}.py {flag}: declare it with add_inputs/add_output/add_path"
        assert value == pipeline_path(table), (f"dvc.yaml {name}: {flag} {value}, but "
                                               f"ctsynth.core.paths says {table} = {pipeline_path(table)}")


@pytest.mark.parametrize("name", STAGES)
def test_the_scripts_path_defaults_are_the_tables(name):
    """Run by hand with no path arguments, a stage reads and writes what `dvc repro` would; an
    optional path (default None) is one the pipeline passes."""
    passed = command_options(name)
    for flag, action in path_options(name).items():
        table = getattr(action, "pipeline_name", None)
        if table is None:
            looks_like_a_path = isinstance(action.default, str) and (
                "/" in action.default or action.default in {p for p, _ in PATHS.values()})
            assert not looks_like_a_path, f"stages/{name}.py {flag}: a path default not in ctsynth.core.paths"
        elif action.default is None:
            assert passed.get(flag) == pipeline_path(table), f"stages/{name}.py {flag}: optional, never passed"
        else:
            assert action.default == pipeline_path(table), (name, flag, action.default)


def test_every_table_entry_is_a_stage_option():
    used = {getattr(a, "pipeline_name", None) for name in STAGES for a in path_options(name).values()}
    assert set(PATHS) <= used, f"unused in every stage script: {sorted(set(PATHS) - used)}"


def test_dvc_yaml_deps_and_outs_are_in_the_table():
    """Every data dependency and output of dvc.yaml is a table path or lies in a table folder."""
    paths = [p for p, _ in PATHS.values()]
    wrong = []
    for name, stage in DVC["stages"].items():
        for key in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if path.startswith(CODE) or "${" in path:
                    continue
                if not any(path == p or path.startswith(p + "/") for p in paths):
                    wrong.append(f"{name}.{key}: {path}")
    assert not wrong, wrong


def test_the_helpers_record_the_table_name():
    parser = argparse.ArgumentParser()
    add_inputs(parser, "processed", "run_file")
    add_output(parser, "split")
    add_path(parser, "utility", optional=True)
    args = parser.parse_args([])
    assert (args.processed, args.run_file, args.out, args.utility) == \
        (pipeline_path("processed"), pipeline_path("run_file"), pipeline_path("split"), None)
    assert {a.option_strings[0]: a.pipeline_name for a in parser._actions if hasattr(a, "pipeline_name")} == \
        {"--processed": "processed", "--run-file": "run_file", "--out": "split", "--utility": "utility"}
