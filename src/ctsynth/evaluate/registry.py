"""Every metric the evaluation reports, in one place, and the one result type they travel in.

:data:`METRICS` declares each metric once: its key (``<S>`` stands for a structure name), its
group, its definition, and how it is shown -- ``headline`` metrics go to ``reports/headline.json``
(the file ``dvc exp show`` reads: at most ~15 columns), to the top section of MLflow's run page
and to the evaluate log; metrics with a ``label`` are rows of the report's first table, beside
their noise ``floor``. Everything else derives from it:

* ``metrics.json`` (every value, or null), ``metrics_ci.json`` (``{"<key>_ci95": {"lo", "hi"}}``)
  and the null reasons in ``metrics_notes.json``: :meth:`Results.write`;
* MLflow names, grouped by prefix so the run page opens on the headline: :meth:`Results.mlflow`;
* the report's tables (:mod:`ctsynth.report.html`, :mod:`ctsynth.report.summary`);
* ``docs/metrics.md``: ``python -m ctsynth.evaluate.registry > docs/metrics.md`` (a test holds
  the file to the registry).

A new metric: one :class:`Metric` entry here, and its value (and interval, if it has one) set on
the :class:`Results` of the evaluation where it is computed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctsynth.core.io import write_json
from ctsynth.core.labels import STRUCTURES
from ctsynth.evaluate.bootstrap import LEVEL

SUFFIX = f"_ci{round(100 * LEVEL)}"          # "_ci95": the interval keys of metrics_ci.json
GROUPS = {
    "counts": "how much was evaluated",
    "paired": "generated vs its real slice, pixel by pixel",
    "distribution": "distance between the generated and real slice distributions, with noise floors",
    "segmentation": "does a segmenter trained on real slices find the structures in generated ones",
    "privacy": "how close generated slices come to the training slices",
    "throughplane": "volumes, not a stack of slices: consistency along z and tri-planar distances",
    "utility": "does synthetic data help a segmenter (the utility stage)",
}


@dataclass(frozen=True)
class Metric:
    """One metric's declaration (``key`` may hold ``<S>``: one metric per structure)."""

    key: str
    group: str
    definition: str
    headline: bool = False        # headline.json / dvc exp show, MLflow's top section, the evaluate log
    label: str = ""               # a row of the report's headline table, named so
    better: str = ""              # "higher" | "lower" (report table)
    floor: str = ""               # key of the reference shown beside it (noise floor or ceiling)
    floor_what: str = ""          # what that reference is


METRICS: tuple[Metric, ...] = (
    Metric('n_test_slices', 'counts',
           'number of generated test slices evaluated (each paired with its real slice)'),
    Metric('n_test_cases', 'counts',
           'number of test patients the evaluated slices come from',
           headline=True),
    Metric('ssim', 'paired',
           'structural similarity, piq (11-px Gaussian window), data_range 1.0 = the HU window mapped to [0, 1], '
           'mean over slices (1 = identical)',
           headline=True, label='SSIM', better='higher'),
    Metric('psnr', 'paired',
           'peak signal-to-noise ratio in dB, piq, data_range 1.0 = the HU window mapped to [0, 1], mean over slices'
           ' (higher is better)',
           headline=True, label='PSNR (dB)', better='higher'),
    Metric('mae_hu', 'paired',
           'mean absolute error in Hounsfield units over all pixels of all slices (lower is better)',
           headline=True, label='MAE (HU)', better='lower'),
    Metric('mse', 'paired',
           'mean squared error between generated and real slices in model space [-1, 1] (lower is better)',
           headline=True, label='MSE ([-1, 1] space)', better='lower'),
    Metric('mae_hu_background', 'paired',
           'mean absolute HU error over background pixels (outside every selected structure)'),
    Metric('mae_hu_<S>', 'paired',
           "mean absolute HU error over the pixels of structure <S>'s mask"),
    Metric('dice_generated_<S>', 'segmentation',
           "Dice of the segmenter's prediction on generated slices vs the mask they were generated from, structure"
           ' <S>'),
    Metric('dice_real_<S>', 'segmentation',
           'Dice of the segmenter on the real test slices vs their masks (the ceiling for dice_generated_<S>)'),
    Metric('dice_generated_mean', 'segmentation',
           'mean of dice_generated_<S> over the selected structures',
           headline=True, label='Dice of generated slices (mean)', better='higher',
           floor='dice_real_mean', floor_what='segmenter on the real slices (ceiling)'),
    Metric('dice_real_mean', 'segmentation',
           'mean of dice_real_<S> over the selected structures',
           headline=True),
    Metric('fd_seg', 'distribution',
           "Fréchet distance (exact, float64) between real and generated test slices in the segmenter's encoder "
           'features (lower is better; compare with fd_seg_floor)',
           headline=True, label='FD, segmenter features', better='lower',
           floor='fd_seg_floor', floor_what='real validation vs real test'),
    Metric('fd_seg_vs_val', 'distribution',
           "Fréchet distance between generated test slices and real validation slices: the floor's comparison with "
           'generated slices in place of the real test slices (same patients, same sizes; ≈ fd_seg_floor = as good '
           'as real)',
           headline=True, label='FD to unseen patients', better='lower',
           floor='fd_seg_floor', floor_what='same comparison, real test slices'),
    Metric('fd_seg_floor', 'distribution',
           'noise floor of fd_seg: Fréchet distance between real validation and real test slices in the same '
           "features (what 'as good as real' gets; other patients, so it also holds anatomy differences)",
           headline=True),
    Metric('kid_seg', 'distribution',
           "kernel distance (piq KID, unbiased MMD², disjoint subsets) in the segmenter's encoder features; ≈ 0 for "
           'matching distributions',
           label='KID, segmenter features', better='lower',
           floor='kid_seg_floor', floor_what='real validation vs real test'),
    Metric('kid_seg_floor', 'distribution',
           'noise floor of kid_seg: KID between real validation and real test slices in the same features'),
    Metric('kid_seg_vs_val', 'distribution',
           'KID between generated test slices and real validation slices (compare with kid_seg_floor)'),
    Metric('fid_inception', 'distribution',
           'FID: Fréchet distance between real and generated test slices in InceptionV3 pool3 features (standard FID'
           ' Inception weights or a local file); null when no weights could be had',
           headline=True, label='FID (Inception)', better='lower',
           floor='fid_inception_floor', floor_what='real validation vs real test'),
    Metric('fid_inception_floor', 'distribution',
           "noise floor of fid_inception: the same distance between real validation and real test slices (what 'as"
           " good as real' gets)"),
    Metric('fid_inception_vs_val', 'distribution',
           'Fréchet distance between generated test slices and real validation slices in InceptionV3 features: the'
           " floor's comparison with generated slices in place of the real test slices"),
    Metric('kid_inception', 'distribution',
           'kernel inception distance (piq KID, cubic polynomial kernel) in InceptionV3 pool3 features; null when no'
           ' weights could be had',
           label='KID (Inception)', better='lower',
           floor='kid_inception_floor', floor_what='real validation vs real test'),
    Metric('kid_inception_floor', 'distribution',
           'noise floor of kid_inception: KID between real validation and real test slices'),
    Metric('kid_inception_vs_val', 'distribution',
           'KID between generated test slices and real validation slices in InceptionV3 features (compare with '
           'kid_inception_floor)'),
    Metric('n_val_slices', 'counts',
           'number of real validation slices (the reference set of the noise floors)'),
    Metric('n_val_cases', 'counts',
           'number of validation patients the noise-floor slices come from'),
    Metric('privacy_threshold', 'privacy',
           'privacy.max_similarity: SSIM to the nearest training slice above which a generated slice is withheld'),
    Metric('privacy_generated_similarity_mean', 'privacy',
           'mean over generated slices of the SSIM to their nearest training slice'),
    Metric('privacy_generated_similarity_max', 'privacy',
           'largest SSIM of any generated slice to its nearest training slice'),
    Metric('privacy_generated_share_above', 'privacy',
           'share of generated slices whose nearest-training-slice SSIM exceeds the threshold (withheld)',
           headline=True),
    Metric('privacy_real_similarity_mean', 'privacy',
           'baseline: mean SSIM of real test slices to their nearest training slice'),
    Metric('privacy_real_similarity_max', 'privacy',
           'baseline: largest SSIM of any real test slice to its nearest training slice'),
    Metric('privacy_real_share_above', 'privacy',
           'baseline: share of real test slices above the threshold'),
    Metric('zcons_ssim_ratio', 'throughplane',
           'adjacent-slice consistency: mean SSIM (7-px uniform window) between neighbouring axial slices (z, z+1) '
           'of the reassembled generated test volumes / the same for the real volumes (1 = as smooth along z as '
           'real; < 1 = flicker)',
           headline=True),
    Metric('zcons_ssim_ratio_<S>', 'throughplane',
           'adjacent-slice consistency inside structure <S> (SSIM map averaged over its pixels in either slice of '
           'each pair), generated / real'),
    Metric('zcons_ssim_real', 'throughplane',
           'mean SSIM between neighbouring axial slices of the real test volumes (denominator of zcons_ssim_ratio)'),
    Metric('zcons_ssim_generated', 'throughplane',
           'mean SSIM between neighbouring axial slices of the generated test volumes (numerator of '
           'zcons_ssim_ratio)'),
    Metric('zgrad_ratio', 'throughplane',
           'through-plane gradient: mean |I(z+1) - I(z)| / dz inside the body (real HU > -500), generated / real '
           '(1 = as real; > 1 = rougher along z)'),
    Metric('zgrad_real', 'throughplane',
           'mean through-plane gradient |dI/dz| of the real test volumes inside the body, HU/mm'),
    Metric('zgrad_generated', 'throughplane',
           'mean through-plane gradient |dI/dz| of the generated test volumes inside the body, HU/mm'),
    Metric('fd_tri_rand_axial', 'throughplane',
           'Fréchet distance between real and generated axial slices in fixed random-CNN features (orientation-'
           'agnostic: seeded, untrained, averaged over 8 rotations/flips)'),
    Metric('fd_tri_rand_coronal', 'throughplane',
           'Fréchet distance between real and generated coronal slices (z resampled to isotropic pixels) in the '
           'same random-CNN features; sees flicker along z'),
    Metric('fd_tri_rand_sagittal', 'throughplane',
           'Fréchet distance between real and generated sagittal slices (z resampled to isotropic pixels) in the '
           'same random-CNN features; sees flicker along z'),
    Metric('fd_tri_rand_mean', 'throughplane',
           'tri-planar (2.5-D) Fréchet distance: mean of fd_tri_rand_axial, _coronal and _sagittal (MAISI-style)'),
    Metric('fid_tri_inception_axial', 'throughplane',
           'FID on axial slices of the reassembled test volumes (InceptionV3 pool3); null without Inception weights'),
    Metric('fid_tri_inception_coronal', 'throughplane',
           'FID on coronal slices (isotropic pixels) of the reassembled test volumes; null without Inception '
           'weights'),
    Metric('fid_tri_inception_sagittal', 'throughplane',
           'FID on sagittal slices (isotropic pixels) of the reassembled test volumes; null without Inception '
           'weights'),
    Metric('fid_tri_inception_mean', 'throughplane',
           "tri-planar FID: mean of the axial, coronal and sagittal FIDs (MAISI's 2.5-D FID); null without "
           'Inception weights'),
    Metric('utility_dice_real', 'utility',
           'downstream utility: mean Dice over structures on the REAL test slices of the segmenter trained on real'
           " training slices only (the segmenter stage's model)"),
    Metric('utility_dice_synthetic', 'utility',
           'downstream utility: mean Dice on the real test slices of the same segmenter (architecture, budget, '
           'seed) trained on the synthetic cases only'),
    Metric('utility_dice_mixed', 'utility',
           'downstream utility: mean Dice on the real test slices of the same segmenter trained on real training +'
           ' synthetic slices'),
    Metric('utility_dice_real_<S>', 'utility',
           'Dice of structure <S> on the real test slices, segmenter trained on real slices only'),
    Metric('utility_dice_synthetic_<S>', 'utility',
           'Dice of structure <S> on the real test slices, segmenter trained on synthetic slices only'),
    Metric('utility_dice_mixed_<S>', 'utility',
           'Dice of structure <S> on the real test slices, segmenter trained on real + synthetic slices'),
    Metric('utility_ratio_synthetic', 'utility',
           'utility_dice_synthetic / utility_dice_real (target >= 0.8: synthetic data alone teaches most of what '
           'real data does)',
           headline=True),
    Metric('utility_gain_mixed', 'utility',
           'utility_dice_mixed - utility_dice_real (> 0: adding synthetic cases helps; target >= -0.01)',
           headline=True),
    Metric('utility_n_synthetic_cases', 'utility',
           'number of synthetic cases (data/synthetic) the utility segmenters were trained on'),
    Metric('utility_n_synthetic_slices', 'utility',
           'number of synthetic slices (after preprocess) in the utility training sets'),
    Metric('utility_n_real_train_slices', 'utility',
           'number of real training slices of the real-only and mixed utility segmenters'),
    Metric('privacy_n_shareable', 'privacy',
           'number of generated slices at or below the threshold (listed in reports/shareable.json)'),
)
_BY_KEY = {m.key: m for m in METRICS}


def lookup(key: str) -> Metric | None:
    """The declaration of a metrics.json key (structure keys resolve their ``<S>`` template)."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    for template, spec in _BY_KEY.items():
        if "<S>" in template:
            prefix, suffix = template.split("<S>")
            name = key[len(prefix):len(key) - len(suffix)] if key.endswith(suffix) else ""
            if key.startswith(prefix) and name in STRUCTURES:
                return spec
    return None


def definition(key: str) -> str:
    """One-line definition of a metrics.json key ('' for an undeclared key)."""
    spec = lookup(key)
    if spec is None:
        return ""
    if "<S>" not in spec.key:
        return spec.definition
    prefix, suffix = spec.key.split("<S>")
    return spec.definition.replace("<S>", key[len(prefix):len(key) - len(suffix)])


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
        """Every number under an MLflow name: headline metrics plain (the run page's first
        section), the others as ``<group>/<key>``, intervals as ``ci95/<key>_lo|_hi``."""
        out = {}
        for key, res in self.results.items():
            spec = lookup(key)
            if isinstance(res.value, (int, float)):
                out[key if spec and spec.headline else f"{spec.group if spec else 'other'}/{key}"] = res.value
            if res.interval is not None:
                out[f"ci{round(100 * LEVEL)}/{key}_lo"] = res.interval.lo
                out[f"ci{round(100 * LEVEL)}/{key}_hi"] = res.interval.hi
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


def table_rows() -> list[Metric]:
    """The report's headline table, in order."""
    return [m for m in METRICS if m.label]


def short(reason: str, limit: int = 110) -> str:
    return reason if len(reason) <= limit else reason[:limit].rsplit(" ", 1)[0] + " …"


def _read(path: Path):
    from ctsynth.core.errors import InputError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def docs_markdown() -> str:
    """docs/metrics.md, generated from :data:`METRICS`."""
    out = ["# Metrics", "",
           "Generated from `src/ctsynth/evaluate/registry.py` by "
           "`python -m ctsynth.evaluate.registry > docs/metrics.md`; do not edit by hand.", "",
           f"`<S>` is a structure ({', '.join(STRUCTURES)}). **Headline** metrics are in "
           "`reports/headline.json` (what `dvc exp show` shows) and in the first section of the MLflow "
           "run page; every metric is in `reports/metrics.json`, its 95 % patient-level interval (where "
           f"it has one) in `reports/metrics_ci.json` as `<key>{SUFFIX}`, and in MLflow as `<group>/<key>` "
           f"and `ci{round(100 * LEVEL)}/<key>_lo|_hi`.", ""]
    for group, what in GROUPS.items():
        out += [f"## {group}: {what}", "", "| key | headline | definition |", "|---|---|---|"]
        out += [f"| `{m.key}` | {'yes' if m.headline else ''} | {m.definition.replace('|', '/')} |"
                for m in METRICS if m.group == group]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":                     # python -m ctsynth.evaluate.registry > docs/metrics.md
    print(docs_markdown(), end="")
