"""``docs/results.md``: the reference run's numbers, written from the committed result files.

After a reference ``dvc repro`` of the default ``params.yaml`` on main, commit ``dvc.lock`` and the
small result files (``reports/*.json``, ``*.csv``: DVC outputs with ``cache: false``) and run::

    python -m ctsynth.tools.reference > docs/results.md

``tests/test_docs.py`` writes it again from the committed files and fails when the two differ,
and checks that the committed files are the ones ``dvc.lock`` names (same md5). So every number
the docs quote traces to files of a named commit, and to the lock that says what made them.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ctsynth.core.accel import runtime_summary
from ctsynth.evaluate.registry import lookup, short, table_rows
from ctsynth.evaluate.results import Results, fmt
from ctsynth.report.report import RUNTIME_STEPS, _read_json

UTILITY_ROWS = (("utility_dice_real", "real training slices only"), ("utility_dice_synthetic", "synthetic cases only"),
                ("utility_dice_mixed", "real + synthetic"), ("utility_ratio_synthetic", "synthetic ÷ real"),
                ("utility_gain_mixed", "real + synthetic − real"))


def _row(res: Results, key: str, label: str | None = None) -> str:
    r = res[key]
    spec = lookup(key)
    floor = res.results.get(spec.floor) if spec is not None and spec.floor else None
    ref = floor.shown() if floor is not None and floor.value is not None else ""
    value = fmt(r.value) if r.value is not None else f"null: {short(r.null_reason or 'no reason given', 80)}"
    return f"| `{key}`{f' {label}' if label else ''} | {value} | {r.interval or ''} | {ref} |"


def conditions_table(res: Results) -> str:
    """The headline for both conditions the generator was scored with, test patients, 95 %
    intervals: the README's first results table and docs/results.md's (tests/test_docs.py holds
    the README to the committed files)."""
    def cell(key: str) -> str:
        r = res.results.get(key)
        return "—" if r is None or r.value is None else f"{fmt(r.value)} {r.interval or ''}".strip()

    rows = [f"| {spec.label} | {cell(spec.heart_only)} | {cell(spec.key)} |"
            for spec in table_rows() if spec.heart_only and spec.key in res]
    return ("| test patients (" + str(res.value("n_test_cases")) + "), 95 % interval | heart masks alone "
            "(the paper's condition) | heart masks + body, lung, bone thresholded from the scored CT |\n"
            "|---|---|---|\n" + "\n".join(rows))


def markdown(reports_dir: str | Path = "reports") -> str:
    """The page, from evaluate's files in ``reports_dir`` (``metrics.json`` must exist)."""
    reports_dir = Path(reports_dir)
    res = Results.read(reports_dir)
    if res is None:
        raise FileNotFoundError(f"{reports_dir / 'metrics.json'}: no results; run `dvc repro` first")
    notes = _read_json(reports_dir / "metrics_notes.json") or {}
    val = _read_json(reports_dir / "validation.json") or {}
    runtime = notes.get("runtime") or {}
    head = "| metric | value | 95 % interval | as good as real gets |\n|---|---|---|---|"
    lines = [
        "# Results of the reference run",
        "",
        "<!-- written by `python -m ctsynth.tools.reference > docs/results.md`; tests/test_docs.py checks it -->",
        "",
        "The default `params.yaml` run by `dvc repro` on the default data (the embedded phantom).",
        "Every number below is read from the result files committed with this page (`reports/headline.json`,",
        "`metrics.json`, `metrics_ci.json`, `validation.json`, `metrics_notes.json`); `dvc.lock` of the same",
        "commit names their md5 and every input that made them. Where each step ran:",
        "",
        *(f"- {label}: {runtime_summary(runtime.get(key))}" for key, label in RUNTIME_STEPS),
        "",
        "Another CPU model or thread count gives other bits from the same commit, differences of the size",
        "of a training seed's ([design.md](design.md#repeatability-what-repeats-and-what-does-not)).",
        "",
        "## Headline: the test patients (scored to report, never to choose)",
        "",
        f"{res.value('n_test_slices')} generated slices of {res.value('n_test_cases')} test patients. "
        f"Intervals: {notes.get('intervals', 'see metrics_notes.json')}",
        "",
        "What the generator was given: the heart masks alone (the paper's condition), or the heart masks",
        "with body, lung and bone thresholded from the scored patient's own CT (which carries much of the",
        "image it is scored against; every other table on this page is for that condition):",
        "",
        conditions_table(res),
        "",
        head,
        *(_row(res, spec.key, f"({spec.label})") for spec in table_rows() if spec.key in res),
        "",
        "## Validation: what defaults and variants are chosen on",
        "",
        "One trained model, no intervals (a choice needs the spread over training seeds:",
        "[compare.md](compare.md)). Same definitions as without the `val_` prefix ([metrics.md](metrics.md)).",
        "",
        *(["| metric | value |\n|---|---|", *(f"| `{k}` | {fmt(v) if v is not None else 'null'} |"
                                             for k, v in val.items())]
          if val else [f"`{reports_dir / 'validation.json'}` not found: written by this version's evaluate stage."]),
        "",
        "## Utility: Dice on the real test slices, one training per segmenter",
        "",
        "The spread over segmenter seeds is in [experiments/utility.md](experiments/utility.md).",
        "",
        head,
        *(_row(res, key, f"({label})") for key, label in UTILITY_ROWS if key in res),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--readme"]
    reports = args[0] if args else "reports"
    if "--readme" in sys.argv[1:]:                 # the README's results table
        sys.stdout.write(conditions_table(Results.read(Path(reports))) + "\n")
    else:
        sys.stdout.write(markdown(reports))
