"""``ctsynth compare``: the training-seed spread of a comparison, on top of ``dvc exp``.

"Configuration A beats B" read off one trained model per arm mixes the effect of the
configuration with the luck of one training run. ``compare run`` trains every configuration of a
grid with several training seeds, as DVC experiments::

    ctsynth compare run --set model.context_slices=0,1 --seeds 1,2,3 --name ctx

queues ``dvc exp run --queue -n ctx-<i> -S model.context_slices=<v> -S train.seed=<s>`` for every
grid point that is not already a finished experiment with exactly those params (so a rerun
resumes: it queues only what is missing or failed), starts the queue (``dvc queue start -j N``:
detached workers, so an interrupted wait loses nothing) and waits for it. ``compare show`` reads
``dvc exp show --json``, groups the finished experiments by the params that differ between them
(all but the seed key) and reports, per metric, mean ± sd over seeds and, for every
configuration against a baseline one, the paired per-seed difference (same seed value in both)
with a t-interval over seeds (df = n − 1).

What the interval includes: the spread of training runs that differ only in the seed key
(``train.seed``: generator init, batch order, augmentation) on fixed data -- the same patients,
split and, unless the seed key names it, segmenter. It is not the patient-level interval of
``metrics_ci.json``, which holds one trained model fixed (docs/compare.md). A seed grid is a
user's command, never a stage of ``dvc repro``.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.io import write_csv, write_text
from ctsynth.core.progress import quiet

CONFIDENCE = 0.95
DEFAULT_SEED_KEY = "train.seed"
DEFAULT_NAME = "compare"
PARAMS_FILE = "params.yaml"
DONE = ("success", "failed")                            # executor states of a finished experiment
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")      # a git ref component; '-<i>' is appended
ABSENT = "(absent)"                                      # a param an experiment does not have


# ------------------------------------------------------------------------------ dvc exp show

@dataclass(frozen=True)
class Experiment:
    """One experiment of ``dvc exp show --json``."""
    name: str | None
    rev: str
    state: str                        # success | queued | running | failed
    params: dict[str, Any]            # flattened: "train.seed" (params.yaml), "<file>:<key>" (other files)
    metrics: dict[str, float]         # numeric metrics, flattened (a key in two files: "<file>:<key>")
    timestamp: str | None = None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix[:-1]: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _files(data: dict, kind: str) -> dict[str, dict]:
    """``{file: flattened values}`` of ``data[kind]`` (params or metrics), files with errors left out."""
    return {f: _flatten(v.get("data") or {}) for f, v in (data.get(kind) or {}).items()
            if isinstance(v, dict) and not v.get("error")}


def _flat_params(data: dict) -> dict[str, Any]:
    out = {}
    for file, values in _files(data, "params").items():
        out.update({k if file == PARAMS_FILE else f"{file}:{k}": v for k, v in values.items()})
    return out


def _flat_metrics(data: dict) -> dict[str, float]:
    """Numeric metrics (bools, strings, nulls and non-finite values left out)."""
    files = _files(data, "metrics")
    seen: dict[str, int] = {}
    for values in files.values():
        for k in values:
            seen[k] = seen.get(k, 0) + 1
    out = {}
    for file, values in files.items():
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[k if seen[k] == 1 else f"{file}:{k}"] = float(v)
    return out


def parse_show(doc: Any, where: str = "`dvc exp show --json`") -> tuple[dict[str, Any], list[Experiment]]:
    """``(workspace params, experiments)`` of a ``dvc exp show --json`` document (DVC 3). A failed
    experiment is ``failed`` whatever its executor says: DVC shows it with its baseline's metrics."""
    if not isinstance(doc, list):
        raise InputError(f"{where}: expected a JSON list of commits, got {type(doc).__name__}")
    workspace: dict[str, Any] = {}
    found = []
    for commit in doc:
        if not isinstance(commit, dict):
            continue
        if commit.get("rev") == "workspace":
            workspace = _flat_params(commit.get("data") or {})
        for exp in commit.get("experiments") or []:
            revs = exp.get("revs") or []
            if not revs:
                continue
            tip, executor = revs[0], exp.get("executor") or {}
            data = tip.get("data") or {}
            state = "failed" if tip.get("error") else executor.get("state") or "success"
            found.append(Experiment(exp.get("name") or tip.get("name"), str(tip.get("rev")), state,
                                    _flat_params(data), _flat_metrics(data), data.get("timestamp")))
    return workspace, found


def dvc(args: list[str]) -> str:
    """Run ``dvc <args>`` in the working directory (the DVC of this Python if it has one); its
    stdout. InputError with the command and the end of its stderr when it fails."""
    base = [sys.executable, "-m", "dvc"] if importlib.util.find_spec("dvc") else [shutil.which("dvc") or "dvc"]
    try:
        done = subprocess.run(base + args, capture_output=True, text=True)
    except OSError as e:
        raise InputError(f"`dvc {' '.join(args)}`: cannot run DVC ({e})") from None
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise InputError(f"`dvc {' '.join(args)}` failed (exit {done.returncode}): {tail}")
    return done.stdout


def read_doc(run_dvc: Callable[[list[str]], str] = dvc, rev: str | None = None) -> Any:
    """``dvc exp show --json`` of HEAD, or of commit ``rev`` (the document, parsed from JSON)."""
    args = ["exp", "show", "--json", *(["--rev", rev] if rev else [])]
    text = run_dvc(args)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"`dvc {' '.join(args)}`: not JSON ({e})") from None


def read_show(run_dvc: Callable[[list[str]], str] = dvc,
              rev: str | None = None) -> tuple[dict[str, Any], list[Experiment]]:
    """The experiments of HEAD, or of commit ``rev`` (``dvc exp show --json``: queued, running and
    failed ones too)."""
    return parse_show(read_doc(run_dvc, rev))


PIPELINE_FILES = ("dvc.lock", "dvc.yaml", "params.yaml")


def same_pipeline(revs: list[str], show: Callable[[str], bytes] | None = None) -> None:
    """InputError unless every commit of ``revs`` holds the same ``dvc.lock``, ``dvc.yaml`` and
    ``params.yaml`` (so the same code, data and params made their baselines: experiments queued on
    them are one study). ``show``: ``git show <rev>:<file>``'s bytes (tests pass a fake)."""
    def git_show(spec: str) -> bytes:
        done = subprocess.run(["git", "show", spec], capture_output=True)
        if done.returncode:
            raise InputError(f"`git show {spec}`: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return done.stdout

    show = show or git_show
    first, *rest = revs
    differ = [f"{r} and {first} differ in {name}" for r in rest for name in PIPELINE_FILES
              if show(f"{r}:{name}") != show(f"{first}:{name}")]
    if differ:
        raise InputError([f"--rev: the commits do not run the same pipeline, their experiments are not one study: "
                          f"{d}" for d in differ])


def baseline_rev(doc: Any) -> str | None:
    """The commit a ``dvc exp show --json`` document lists experiments of (HEAD's, at the time)."""
    revs = [c.get("rev") for c in doc if isinstance(c, dict)] if isinstance(doc, list) else []
    return next((str(r) for r in revs if r and r != "workspace"), None)


# ------------------------------------------------------------------------------------ values

def parse_value(text: str) -> Any:
    """A ``-S``/``--baseline`` value as DVC reads it: YAML 1.2 (``1`` int, ``true`` bool, ``2e-4``
    a float, which PyYAML's YAML 1.1 would leave a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def apply_point(params: dict[str, Any], point: dict[str, str]) -> dict[str, Any]:
    """Flattened ``params`` with the point's values set (a mapping value replaces the subtree)."""
    out = dict(params)
    for key, text in point.items():
        out = {k: v for k, v in out.items() if k != key and not k.startswith(key + ".")}
        value = parse_value(text)
        out.update(_flatten(value, key + ".") if isinstance(value, dict) and value else {key: value})
    return out


def show_value(v: Any) -> str:
    if v is ABSENT or isinstance(v, str):
        return str(v)
    return json.dumps(v, sort_keys=True)


def _key(v: Any) -> str:
    """Hashable identity of a param value (lists and mappings included; 1 and 1.0 alike)."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return "\x00absent" if v is ABSENT else json.dumps(v, sort_keys=True)


def split_values(text: str) -> list[str]:
    """``a,b,[1, 2]`` -> ``['a', 'b', '[1, 2]']``: commas inside brackets or quotes do not split."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    parts.append(cur.strip())
    return parts


def seed_keys_of(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise InputError("--seed-key: give a params key, e.g. train.seed")
    return keys


# ---------------------------------------------------------------------------------- the study

@dataclass
class Study:
    """Finished experiments grouped by configuration (the values of ``grid_keys``) and seed."""
    grid_keys: list[str]
    seed_keys: list[str]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)          # label -> {grid key: value}
    runs: dict[str, dict[str, Experiment]] = field(default_factory=dict)      # label -> {seed: experiment}
    duplicates: list[str] = field(default_factory=list)                       # names left out (older twin)


def _names(name: str | list[str] | None) -> list[str]:
    return [] if name is None else [name] if isinstance(name, str) else list(name)


def study_name_filter(name: str | list[str] | None) -> Callable[[Experiment], bool]:
    """Experiments ``<name>-<i>`` of one study or of several (a study that reused another's runs)."""
    names = _names(name)
    if not names:
        return lambda e: True
    pattern = re.compile(rf"(?:{'|'.join(map(re.escape, names))})-\d+")
    return lambda e: bool(e.name and pattern.fullmatch(e.name))


def _order(values: dict[str, Any]) -> tuple:
    """Sort key of a configuration: numbers by value (2 before 10), everything else by its text."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)          # noqa: E731
    return tuple((0, float(v), "") if number(v) else (1, 0.0, show_value(v)) for v in values.values())


def config_label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={show_value(v)}" for k, v in values.items()) or "(all)"


def build_study(experiments: list[Experiment], seed_keys: list[str], name: str | list[str] | None = None) -> Study:
    """Group the finished experiments (of study ``name``: ``<name>-<i>``, of several names, or all) by the values of
    every param that differs between them but the seed keys. InputError when there are none, or
    when a seed key is missing or does not vary (a grid over something else is not a seed study)."""
    chosen = [e for e in experiments if e.state == "success" and study_name_filter(name)(e)]
    if not chosen:
        which = f"named {' or '.join(f'{n}-<i>' for n in _names(name))}" if _names(name) else "of HEAD"
        raise InputError(f"`dvc exp show`: no finished experiments {which} (failed and queued ones do not "
                         f"count); run `ctsynth compare run ...` first, or check --name")
    problems = []
    for key in seed_keys:
        values = {_key(e.params.get(key, ABSENT)) for e in chosen}
        if len(values) < 2:
            problems.append(f"--seed-key {key}: does not vary over the {len(chosen)} experiments (all "
                            f"{show_value(chosen[0].params.get(key, ABSENT))}); give the key the seeds were set "
                            f"with (`ctsynth compare run --seed-key`)")
    if problems:
        raise InputError(problems)
    every = sorted(set().union(*(e.params for e in chosen)))
    grid = [k for k in every if k not in seed_keys
            and len({_key(e.params.get(k, ABSENT)) for e in chosen}) > 1]
    study = Study(grid, list(seed_keys))
    for e in sorted(chosen, key=lambda e: e.timestamp or "", reverse=True):           # newest first
        values = {k: e.params.get(k, ABSENT) for k in grid}
        label = config_label(values)
        seed = "/".join(show_value(e.params.get(k, ABSENT)) for k in seed_keys)
        study.configs.setdefault(label, values)
        runs = study.runs.setdefault(label, {})
        if seed in runs:
            study.duplicates.append(e.name or e.rev[:7])
        else:
            runs[seed] = e
    study.configs = dict(sorted(study.configs.items(), key=lambda item: _order(item[1])))
    return study


def pick_baseline(study: Study, spec: list[str], workspace: dict[str, Any]) -> str:
    """The baseline configuration: the one matching every ``key=value`` of ``spec``; without a
    spec, the one of the workspace's params (else the first). InputError when a spec key is not
    a grid key, or the spec matches no configuration or several."""
    if not spec:
        for label, values in study.configs.items():
            if all(_key(workspace.get(k, ABSENT)) == _key(v) for k, v in values.items()):
                return label
        return next(iter(study.configs))
    wanted, problems = {}, []
    for item in spec:
        key, sep, text = item.partition("=")
        if not sep:
            problems.append(f"--baseline {item!r}: expected key=value")
        elif key not in study.grid_keys:
            problems.append(f"--baseline {key}: not a param that differs between the configurations "
                            f"({', '.join(study.grid_keys) or 'none: one configuration'})")
        else:
            wanted[key] = parse_value(text)
    if problems:
        raise InputError(problems)
    hits = [label for label, values in study.configs.items()
            if all(_key(values[k]) == _key(v) for k, v in wanted.items())]
    if len(hits) != 1:
        what = "no configuration" if not hits else f"{len(hits)} configurations"
        raise InputError(f"--baseline {' '.join(spec)}: matches {what}; the configurations: "
                         + "; ".join(study.configs))
    return hits[0]


# ------------------------------------------------------------------------------- statistics

@dataclass
class Row:
    """One metric of one configuration: over seeds, and paired against the baseline."""
    metric: str
    config: str
    n_seeds: int
    seeds: str
    mean: float | None
    sd: float | None
    mean_lo: float | None = None       # t-interval of the mean over seeds (df = n_seeds − 1): for a metric
    mean_hi: float | None = None       # that is itself a contrast (utility_gain_mixed), its training noise
    diff: float | None = None          # mean over paired seeds of (this − baseline)
    n_pairs: int = 0
    diff_lo: float | None = None       # t-interval of diff over the paired seeds (df = n_pairs − 1)
    diff_hi: float | None = None
    note: str = ""


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None below 2 values)."""
    n = len(values)
    if not n:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_interval(diffs: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t interval of the mean of paired differences (df = n − 1); None below 2 pairs."""
    from scipy.stats import t

    n = len(diffs)
    if n < 2:
        return None
    mean, sd = mean_sd(diffs)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def metric_names(study: Study) -> list[str]:
    return sorted(set().union(*(e.metrics for runs in study.runs.values() for e in runs.values())))


def _seed_order(seeds) -> list[str]:
    return sorted(seeds, key=lambda s: (len(s), s))


def summarise(study: Study, metrics: list[str], baseline: str) -> list[Row]:
    """A :class:`Row` per metric and configuration, the baseline first."""
    order = [baseline] + [c for c in study.configs if c != baseline]
    rows = []
    for metric in metrics:
        base = {s: e.metrics[metric] for s, e in study.runs[baseline].items() if metric in e.metrics}
        for label in order:
            own = {s: e.metrics[metric] for s, e in study.runs[label].items() if metric in e.metrics}
            mean, sd = mean_sd([own[s] for s in _seed_order(own)])
            row = Row(metric, label, len(own), ",".join(_seed_order(own)), mean, sd)
            row.mean_lo, row.mean_hi = paired_interval([own[s] for s in _seed_order(own)]) or (None, None)
            if not own:
                row.note = "not reported by these experiments"
            elif label == baseline:
                row.note = "baseline"
            else:
                _pair(row, own, base)
            rows.append(row)
    return rows


def _pair(row: Row, own: dict[str, float], base: dict[str, float]) -> None:
    """Fill the paired difference of ``row`` against the baseline's values (by seed)."""
    paired = _seed_order(set(own) & set(base))
    unpaired = _seed_order(set(own) ^ set(base))
    notes = [f"unpaired seeds left out: {','.join(unpaired)}"] if unpaired else []
    row.n_pairs = len(paired)
    if not paired:
        row.note = "; ".join(["no seed in common with the baseline: no difference", *notes])
        return
    diffs = [own[s] - base[s] for s in paired]
    row.diff = sum(diffs) / len(diffs)
    interval = paired_interval(diffs)
    if interval is None:
        notes.insert(0, f"interval null: {len(paired)} paired seed, needs >= 2")
    else:
        row.diff_lo, row.diff_hi = interval
    row.note = "; ".join(notes)


# ---------------------------------------------------------------------------------- output

COLUMNS = ("metric", "config", "n_seeds", "seeds", "mean", "sd", "mean_lo", "mean_hi", "diff", "n_pairs", "diff_lo",
           "diff_hi", "note")


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _cells(row: Row) -> list[str]:
    interval = "" if row.diff_lo is None else f"[{_num(row.diff_lo)}, {_num(row.diff_hi)}]"
    spread = _num(row.mean) + ("" if row.sd is None else f" ± {_num(row.sd)}")
    of_mean = "" if row.mean_lo is None else f"[{_num(row.mean_lo)}, {_num(row.mean_hi)}]"
    return [row.metric, row.config, f"{row.n_seeds} ({row.seeds})" if row.n_seeds else "0", spread, of_mean,
            _num(row.diff), str(row.n_pairs) if row.diff is not None else "", interval, row.note]


HEADERS = ["metric", "config", "seeds", "mean ± sd", f"mean's {CONFIDENCE:.0%} t-interval", "Δ vs baseline", "pairs",
           f"Δ's {CONFIDENCE:.0%} t-interval", "note"]


def text_table(rows: list[Row]) -> str:
    cells = [HEADERS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_table(rows: list[Row]) -> str:
    esc = lambda s: s.replace("|", "\\|")                                       # noqa: E731
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_rows(rows: list[Row], out: Path, header: str) -> None:
    """``.csv``: one line per row, every field; ``.md``: the header and the table. Atomic."""
    import pandas as pd

    if out.suffix == ".csv":
        write_csv(out, pd.DataFrame([{c: getattr(r, c) for c in COLUMNS} for r in rows], columns=list(COLUMNS)))
    elif out.suffix == ".md":
        write_text(out, header + "\n\n" + markdown_table(rows))
    else:
        raise InputError(f"--out {out}: write .csv or .md")


def describe(study: Study, baseline: str, n_experiments: int) -> str:
    keys = ", ".join(study.grid_keys) or "none (one configuration)"
    lines = [f"{n_experiments} finished experiments in {len(study.configs)} configurations; grid keys: {keys}; "
             f"seed key: {', '.join(study.seed_keys)}; baseline: {baseline}",
             f"mean ± sd over seeds; Δ = mean over seeds of (config − baseline) for the same seed value, with its "
             f"{CONFIDENCE:.0%} t-interval (df = pairs − 1): the spread of training runs, on the same patients"]
    if study.duplicates:
        lines.append(f"left out (an experiment with the same config and seed is newer): "
                     f"{', '.join(study.duplicates)}")
    return "\n".join(lines)


def is_validation(metric: str) -> bool:
    """Validation metrics (``reports/validation.json``) choose; every other metric of an experiment
    (``reports/headline.json``) is scored on the test patients and only reported."""
    return metric.startswith("val_")


def show(name: str | list[str] | None = None, metrics: str | None = None, baseline: list[str] | None = None,
         out: str | None = None, seed_key: str = DEFAULT_SEED_KEY,
         run_dvc: Callable[[list[str]], str] = dvc, *, rev: str | list[str] | None = None,
         test: bool = False) -> list[Row]:
    """``ctsynth compare show``: print the table (and write ``out``); the rows. ``rev``: the
    experiments of that commit (default HEAD's), or of several commits that run the same pipeline
    (:func:`same_pipeline`: a grid queued in parts while only docs or tests were committed). Only
    validation metrics (``val_*``) are shown unless ``test``: choices are made on validation
    patients, test patients only report."""
    if out and Path(out).suffix not in (".csv", ".md"):
        raise InputError(f"--out {out}: write .csv or .md")
    revs = rev if isinstance(rev, list) else [rev]
    if len(revs) > 1:
        same_pipeline(revs)
    workspace, experiments = read_show(run_dvc, revs[0])
    for other in revs[1:]:
        experiments = experiments + read_show(run_dvc, other)[1]
    study = build_study(experiments, seed_keys_of(seed_key), name)
    known = metric_names(study)
    shown = known if test else [m for m in known if is_validation(m)]
    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else shown
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        raise InputError(f"--metrics: {', '.join(unknown) or 'none'} not among the experiments' numeric "
                         f"metrics ({', '.join(shown) or 'none'}{'' if test else '; test metrics: --test'})")
    hidden = [m for m in chosen if m not in shown]
    if hidden:
        raise InputError(f"--metrics: {', '.join(hidden)}: test-patient metric(s), shown only with --test "
                         "(choose on the validation metrics val_*; the test patients only report)")
    base = pick_baseline(study, baseline or [], workspace)
    rows = summarise(study, chosen, base)
    header = describe(study, base, sum(len(r) for r in study.runs.values()))
    print(header + "\n\n" + text_table(rows))
    if out:
        write_rows(rows, Path(out), header)
        print(f"wrote {out}")
    return rows


# -------------------------------------------------------------------------------- the grid

@dataclass
class Point:
    """One grid point: its overrides, the experiment that holds it, what to do."""
    overrides: dict[str, str]          # key -> value as given (the -S text)
    name: str
    action: str                        # queue | done | pending (queued or running already)


def parse_grid(sets: list[str], seeds: str, seed_keys: list[str]) -> tuple[dict[str, list[str]], list[int]]:
    """``--set key=v1,v2`` and ``--seeds 1,2,3`` -> ({key: values}, seeds); InputError listing every problem."""
    grid, problems = {}, []
    for item in sets:
        key, sep, text = item.partition("=")
        values = split_values(text) if sep else []
        if not sep or not key or any(v == "" for v in values):
            problems.append(f"--set {item!r}: expected key=value[,value...]")
        elif key in grid or key in seed_keys:
            problems.append(f"--set {key}: given twice, or also the seed key")
        else:
            grid[key] = values
    try:
        seed_list = [int(s) for s in seeds.split(",")]
        if len(set(seed_list)) != len(seed_list) or min(seed_list) < 0:
            raise ValueError
    except ValueError:
        problems.append(f"--seeds {seeds!r}: expected distinct non-negative integers, e.g. 1,2,3")
        seed_list = []
    if problems:
        raise InputError(problems)
    return grid, seed_list


def grid_points(grid: dict[str, list[str]], seeds: list[int], seed_keys: list[str]) -> list[dict[str, str]]:
    """Every combination of the grid values, each with every seed (seeds vary fastest)."""
    keys = list(grid)
    return [{**dict(zip(keys, combo)), **{k: str(s) for k in seed_keys}}
            for combo in itertools.product(*(grid[k] for k in keys)) for s in seeds]


def check_keys(params_path: Path, keys: list[str]) -> None:
    """Every key must name a value of the params file (a typo would otherwise queue a whole grid
    of identical runs -- or add a key that every stage then rejects)."""
    try:
        raw = yaml.safe_load(params_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{params_path}: cannot read the params file ({e})") from None
    missing = []
    for key in keys:
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    if missing:
        raise InputError([f"{params_path}: no key {k} (--set and --seed-key take keys of the params file)"
                          for k in missing])


def validate_points(params_path: Path, points: list[dict[str, str]], seed_keys: list[str]) -> None:
    """Every configuration of the grid must be valid params (ctsynth.core.config), before anything
    is queued; checked once per configuration (the seeds are checked integers already)."""
    from ctsynth.core.config import load_params

    problems: list[str] = []
    seen = set()
    for point in points:
        config = tuple((k, v) for k, v in point.items() if k not in seed_keys)
        if config in seen:
            continue
        seen.add(config)
        try:
            load_params(params_path, [f"{k}={json.dumps(parse_value(v))}" for k, v in point.items()])
        except ConfigError as e:
            problems += [f"{' '.join(f'{k}={v}' for k, v in config) or 'the grid'}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)


def plan(points: list[dict[str, str]], workspace: dict[str, Any], experiments: list[Experiment],
         name: str) -> list[Point]:
    """What to do for each point: ``done`` when a finished experiment has exactly the workspace's
    params with the point's values, ``pending`` when such one is queued or running, else
    ``queue`` it under the next free ``<name>-<i>`` (a failed one is queued again)."""
    used = {e.name for e in experiments if e.name}
    counter = itertools.count(1)
    out = []
    for point in points:
        want = apply_point(workspace, point)
        same = [e for e in experiments if e.state != "failed" and _key_all(e.params) == _key_all(want)]
        match = next((e for e in same if e.state == "success"), same[0] if same else None)
        if match is not None:
            out.append(Point(point, match.name or match.rev[:7], "done" if match.state == "success" else "pending"))
            continue
        label = next(f"{name}-{i}" for i in counter if f"{name}-{i}" not in used)
        used.add(label)
        out.append(Point(point, label, "queue"))
    return out


def _key_all(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, _key(v)) for k, v in params.items()))


def queue_command(point: Point) -> list[str]:
    return ["exp", "run", "--queue", "-n", point.name, *itertools.chain.from_iterable(
        ("-S", f"{k}={v}") for k, v in point.overrides.items())]


def _shell(args: list[str]) -> str:
    return "dvc " + " ".join(a if re.fullmatch(r"[\w.,=:/+-]+", a) else "'" + a.replace("'", "'\\''") + "'"
                             for a in args)


def run(sets: list[str], seeds: str, seed_key: str = DEFAULT_SEED_KEY, name: str = DEFAULT_NAME, jobs: int = 1,
        dry_run: bool = False, *, params_path: str = PARAMS_FILE, run_dvc: Callable[[list[str]], str] = dvc,
        poll_s: float = 10.0) -> int:
    """``ctsynth compare run``: plan the grid, queue what is missing, run the queue and wait.
    Returns the exit code: 0, or 1 when an experiment failed."""
    if not NAME_RE.fullmatch(name):
        raise InputError(f"--name {name!r}: letters, digits, '_' and '-' only (experiments are named <name>-<i>)")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: must be >= 1")
    seed_keys = seed_keys_of(seed_key)
    grid, seed_list = parse_grid(sets, seeds, seed_keys)
    check_keys(Path(params_path), [*grid, *seed_keys])
    points = grid_points(grid, seed_list, seed_keys)
    validate_points(Path(params_path), points, seed_keys)
    shown = read_doc(run_dvc)
    workspace, experiments = parse_show(shown)
    steps = plan(points, workspace, experiments, name)
    todo = [s for s in steps if s.action == "queue"]
    waiting = [s for s in steps if s.action == "pending"]
    finished = len(steps) - len(todo) - len(waiting)
    configs = " x ".join(f"{len(values)} {key}" for key, values in grid.items()) or "1 configuration"
    print(f"{len(points)} grid points ({configs} x {len(seed_list)} seeds): {finished} finished, "
          f"{len(waiting)} queued or running, {len(todo)} to queue")
    for step in steps:
        if step.action != "queue":
            print(f"  {step.action:7} {step.name}: " + " ".join(f"{k}={v}" for k, v in step.overrides.items()))
    for step in todo:
        print("  " + _shell(queue_command(step)))
    if todo or waiting:
        print(f"  {_shell(['queue', 'start', '-j', str(jobs)])}")
    show_cmd = "ctsynth compare show " + " ".join(f"--name {n}" for n in _study_names(steps, name))
    if dry_run or not (todo or waiting):
        if not (todo or waiting):
            print(f"nothing to run; compare them: {show_cmd}")
        return 0
    for step in todo:
        run_dvc(queue_command(step))
    threads = share_cores(jobs)
    if threads:
        print(f"  each of the {jobs} queue workers' runs gets OMP_NUM_THREADS={threads} (set it to choose otherwise)")
    run_dvc(["queue", "start", "-j", str(jobs)])
    # The experiments are queued on HEAD's commit: follow them there, so that a commit made while
    # they run does not hide them (`dvc exp show` lists the experiments of HEAD only).
    failed = wait({s.name for s in todo + waiting}, run_dvc, poll_s, jobs, rev=baseline_rev(shown))
    if failed:
        print(f"{len(failed)} experiment(s) failed: {', '.join(failed)}; see why with "
              + "; ".join(f"dvc queue logs {n}" for n in failed) + "; rerun this command to retry them",
              file=sys.stderr)
        return 1
    print(f"all {len(points)} grid points finished; compare them: {show_cmd}")
    return 0


def share_cores(jobs: int, cores: int | None = None) -> int | None:
    """With ``jobs`` > 1 and no ``OMP_NUM_THREADS`` set, set it to the cores per job (at least 1) for
    the queue workers ``dvc queue start`` spawns, and return it (else None). Every run would otherwise
    start one thread per core: two runs on two cores trained at 0.65 s per GAN step, at one thread each 0.075 s."""
    if jobs <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, (cores or os.cpu_count() or 1) // jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def _study_names(steps: list[Point], name: str) -> list[str]:
    """``name`` and the studies whose finished runs the grid reused (``compare show`` needs them all)."""
    reused = {m.group(1) for s in steps if s.action == "done" and (m := re.fullmatch(r"(.+)-\d+", s.name))}
    return [name, *sorted(reused - {name})]


def wait(names: set[str], run_dvc: Callable[[list[str]], str], poll_s: float, jobs: int = 1,
         restarts: int = 3, rev: str | None = None) -> list[str]:
    """Poll ``dvc exp show`` (of commit ``rev``: the one the experiments were queued on; None: HEAD)
    until none of ``names`` is queued or running (progress bar); the names that failed. DVC's
    workers can exit with experiments still queued (seen between two rounds of ``-j 2``): then the
    queue is started again, up to ``restarts`` times. InputError when no worker is left and
    restarting does not help, naming what is stuck."""
    from tqdm import tqdm

    idle = 0
    bar = tqdm(total=len(names), desc="experiments", unit="exp", disable=quiet())
    try:
        while True:
            _, experiments = read_show(run_dvc, rev)
            states = {e.name: e.state for e in experiments if e.name in names and e.state != "failed"}
            states.update({e.name: "failed" for e in experiments if e.name in names and e.name not in states})
            finished = sum(states.get(n) in DONE for n in names)
            failed = sorted(n for n in names if states.get(n) == "failed")
            bar.update(finished - bar.n)
            bar.set_postfix(failed=len(failed))
            if finished == len(names):
                return failed
            idle = idle + 1 if not _workers_alive(run_dvc) else 0
            if idle >= 3:
                queued = sorted(n for n in names if states.get(n) == "queued")
                if queued and restarts > 0:
                    restarts -= 1
                    bar.write(f"the queue's workers stopped with {len(queued)} experiment(s) still queued "
                              f"({', '.join(queued)}); starting them again")
                    run_dvc(["queue", "start", "-j", str(jobs)])
                    idle = 0
                else:
                    stuck = sorted(n for n in names if states.get(n) == "running")
                    gone = sorted(n for n in names if n not in states)
                    raise InputError(
                        f"{len(names) - finished} experiment(s) not finished and no queue worker runs"
                        + (f"; queued: {', '.join(queued)} (restarted the queue, it stopped again)" if queued else "")
                        + (f"; shown running with no worker left (it died): {', '.join(stuck)}, remove "
                           f"them with `dvc queue kill` or `dvc exp remove`" if stuck else "")
                        + (f"; not listed by `dvc exp show{' --rev ' + rev if rev else ''}`: {', '.join(gone)} "
                           f"(removed?)" if gone else "")
                        + ". Start the queue with `dvc queue start`, then rerun this command to wait for them")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print("stopped waiting; the queue keeps running (`dvc queue status`); rerun the same command to "
              "wait for it again", file=sys.stderr)
        raise
    finally:
        bar.close()


def _workers_alive(run_dvc: Callable[[list[str]], str]) -> bool:
    """Whether ``dvc queue status`` reports an active or idle worker (True when it cannot tell)."""
    found = re.search(r"(\d+) active, (\d+) idle", run_dvc(["queue", "status"]))
    return found is None or int(found[1]) + int(found[2]) > 0
