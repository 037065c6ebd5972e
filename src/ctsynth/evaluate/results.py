"""The one result type of an evaluation: each metric's value, interval and null reason.

:class:`Results` collects what the evaluate stage computes (and the utility stage's results merged
into it), keyed by ``metrics.json`` key in the order set, and writes or reads every metrics file;
:class:`Interval` is the one interval type. What each key means and how it is shown comes from
:mod:`ctsynth.evaluate.registry`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctsynth.core.errors import InputError
from ctsynth.core.io import write_json
from ctsynth.evaluate.registry import SUFFIX, definition, lookup, short, table_rows


def clean(value):
    """JSON-safe scalar: ints stay ints, floats rounded to 6 significant digits, NaN/inf -> None."""
    if value is None or isinstance(value, (bool, int, np.integer)):
        return None if value is None else int(value)
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def fmt(value) -> str:
    """A value as the report and the log show it: numbers to 4 significant digits, '—' for null."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


@dataclass(frozen=True)
class Interval:
    """A 95 % interval; the one interval type of the evaluation."""

    lo: float
    hi: float

    def json(self) -> dict:
        return {"lo": clean(self.lo), "hi": clean(self.hi)}

    @classmethod
    def from_json(cls, blob) -> Interval | None:
        if not isinstance(blob, dict) or blob.get("lo") is None or blob.get("hi") is None:
            return None
        return cls(blob["lo"], blob["hi"])

    def __str__(self) -> str:
        return f"[{fmt(self.lo)}, {fmt(self.hi)}]"


@dataclass
class Result:
    """One metric's value (None: not computed), interval and the reason it is null."""

    value: float | int | None = None
    interval: Interval | None = None
    null_reason: str | None = None

    def shown(self) -> str:
        """'0.812 [0.79, 0.83]', '0.812' without an interval, '—' when null."""
        return fmt(self.value) + (f" {self.interval}" if self.value is not None and self.interval else "")


class Results:
    """The results of one evaluation, keyed by metrics.json key, in the order they were set."""

    def __init__(self):
        self.results: dict[str, Result] = {}
        self._valued: set[str] = set()             # keys given a value (an interval alone adds none)
        self._interval_order: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.results

    def __getitem__(self, key: str) -> Result:
        return self.results[key]

    def value(self, key: str, default=None):
        """The value of ``key``; ``default`` when it is absent or null."""
        value = self.results[key].value if key in self.results else None
        return default if value is None else value

    def shown(self, key: str) -> str:
        """'0.812 [0.79, 0.83]' (value and interval), '0.812', or '—' when absent or null."""
        return self.results[key].shown() if key in self.results else "—"

    def set(self, key: str, value, reason: str | None = None) -> None:
        """Set a value (cleaned for JSON); a null value keeps ``reason``."""
        res = self.results.setdefault(key, Result())
        self._valued.add(key)
        res.value = clean(value)
        res.null_reason = reason if res.value is None else None

    def update(self, values: dict, reasons: dict | None = None) -> None:
        for key, value in values.items():
            self.set(key, value, (reasons or {}).get(key))

    def set_interval(self, key: str, interval: Interval | None) -> None:
        if interval is None:
            return
        if key not in self._interval_order:
            self._interval_order.append(key)
        self.results.setdefault(key, Result()).interval = interval

    def add_intervals(self, intervals: dict[str, Interval]) -> None:
        for key, interval in intervals.items():
            self.set_interval(key, interval)

    def explain_nulls(self, default: str) -> None:
        """Give every null metric without a reason ``default``."""
        for res in self.results.values():
            if res.value is None and not res.null_reason:
                res.null_reason = default

    # ------------------------------------------------------------------ the files
    def metrics(self) -> dict:
        """metrics.json: every key, a number or null."""
        return {k: r.value for k, r in self.results.items() if k in self._valued}

    def intervals(self) -> dict:
        """metrics_ci.json: ``{"<key>_ci95": {"lo", "hi"}}``."""
        return {k + SUFFIX: self.results[k].interval.json() for k in self._interval_order}

    def null_reasons(self) -> dict:
        return {k: r.null_reason for k, r in self.results.items()
                if k in self._valued and r.value is None and r.null_reason}

    def headline(self) -> dict:
        """headline.json, what ``dvc exp show`` shows: the headline metrics present."""
        return {k: r.value for k, r in self.results.items()
                if k in self._valued and (spec := lookup(k)) is not None and spec.headline}

    def write(self, out_dir: Path, notes: dict) -> None:
        """metrics_notes.json, metrics_ci.json, headline.json, then metrics.json (written last)."""
        notes.update({"null_metrics": self.null_reasons(),
                      "definitions": {k: definition(k) for k in self.results}})
        write_json(out_dir / "metrics_notes.json", notes)
        write_json(out_dir / "metrics_ci.json", self.intervals())
        write_json(out_dir / "headline.json", self.headline())
        write_json(out_dir / "metrics.json", self.metrics())

    @classmethod
    def read(cls, reports_dir: Path) -> Results | None:
        """The results evaluate wrote to ``reports_dir`` (None without metrics.json)."""
        reports_dir = Path(reports_dir)
        metrics = _read(reports_dir / "metrics.json")
        if metrics is None:
            return None
        ci = _read(reports_dir / "metrics_ci.json") or {}
        reasons = (_read(reports_dir / "metrics_notes.json") or {}).get("null_metrics", {})
        res = cls()
        res.update(metrics, reasons)
        for key, blob in ci.items():
            if key.endswith(SUFFIX):
                res.set_interval(key[: -len(SUFFIX)], Interval.from_json(blob))
        return res

    # ------------------------------------------------------------------ MLflow and the log
    def mlflow(self) -> dict[str, float]:
        """Every value under an MLflow name, grouped by prefix (the run page's sections):
        ``Headline/<key>`` for the headline, ``<group>/<key>`` for the rest. MLflow orders sections by
        code unit, so the capital H puts the headline first, above the lower-case registry groups.
        Intervals are no charts: the report stage logs ``metrics_ci.json`` as an artifact."""
        out = {}
        for key, res in self.results.items():
            spec = lookup(key)
            if isinstance(res.value, (int, float)):
                out[f"{HEADLINE_SECTION}/{key}" if spec and spec.headline else
                    f"{spec.group if spec else 'other'}/{key}"] = res.value
        return out

    def headline_text(self) -> str:
        """The report's headline table as plain text (the evaluate stage's log)."""
        lines = [f"{'metric':<21} {'value':>9}  {'95 % interval':<22} as good as real gets [95 % interval]"]
        for spec in table_rows():
            if spec.key not in self:
                continue
            res = self[spec.key]
            if res.value is None:
                lines.append(f"{spec.key:<21} {'null':>9}  {short(res.null_reason or '', 90)}")
                continue
            floor = self.results.get(spec.floor) if spec.floor else None
            ref = floor.shown() if floor is not None and floor.value is not None else ""
            iv = str(res.interval) if res.interval else ""
            lines.append(f"{spec.key:<21} {fmt(res.value):>9}  {iv:<22} {ref}".rstrip())
        return "\n".join(lines)


HEADLINE_SECTION = "Headline"      # MLflow's first section (see Results.mlflow)


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
