"""Which metrics get a 95 % interval, and how, from the per-slice statistics of one evaluation.

:func:`metric_intervals` turns what :mod:`ctsynth.evaluate.evaluate` collected once (per-slice paired
values, pixel and Dice counts, feature matrices) into ``{metric: Interval}``. Every interval
resamples the test *patients* (the independent units) through one :class:`Resampling`, a weight
matrix over the test slices that every metric's replicate function accepts:

* ``jackknife`` (default, ``evaluate.interval_method``): delete-one-patient replicates and
  θ̂ ± t_{G−1}·SE (:func:`ctsynth.evaluate.bootstrap.jackknife_interval`): valid for few
  patients (≥ 94 % coverage at G = 4 in the coverage simulation of tests/test_intervals.py, where
  the percentile bootstrap gets ~80 %);
* ``bootstrap``: percentiles of ``evaluate.bootstrap`` two-stage cluster resamples (patients,
  then their slices) -- fine with many patients, too narrow with four.

Noise floors compare two independent patient sets (validation vs test): their replicates leave out
one patient of either set, and the gap ``<key>_gap = <key>_vs_val − <key>_floor`` (generated vs
real test slices, both against the same validation patients) is resampled *paired*, on the same
replicates: that interval, not two overlapping ones, says whether generated slices are further
from unseen patients than real ones. Intervals cover patient sampling only: one trained model,
so training noise is not in them (``ctsynth compare`` runs training seeds for that).
:func:`per_case_intervals` gives each test patient's row an interval by resampling that
patient's slices (neighbouring slices are correlated, so these are narrower than the
patient-level intervals). A new metric gets an interval by adding its replicates here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ctsynth.evaluate.bootstrap import (
    LEVEL,
    cluster_weights,
    dice_replicates,
    frechet_replicates,
    jackknife_interval,
    jackknife_weights,
    kid_replicates,
    percentile_interval,
    pooled_ratio,
    resample_weights,
    two_sample_jackknife,
    weighted_mean,
)
from ctsynth.evaluate.metrics import PairedAccumulator
from ctsynth.evaluate.registry import SUFFIX
from ctsynth.evaluate.results import Interval

log = logging.getLogger("ctsynth.evaluate.intervals")

PER_CASE_KEYS = ("mse", "psnr", "ssim", "mae_hu")
METHODS = ("jackknife", "bootstrap")


@dataclass
class FeatureSpace:
    """Features of one space: generated and real test slices (paired, N × D) and real validation
    slices (M × D, or None); ``fd_key``/``kid_key`` name its metrics (``fd_seg``, ``kid_seg``)."""

    fd_key: str
    kid_key: str
    generated: np.ndarray
    real: np.ndarray
    val: np.ndarray | None = None


@dataclass
class Resampling:
    """The patient resamples behind every interval of one evaluation.

    ``W`` (R, N): weights of the test slices per replicate (one-sample metrics); ``Wa2``/``Wb2``
    (R2, M)/(R2, N): weights of the validation and test slices for two-sample metrics (floors);
    ``sizes``/``sizes2``: the jackknife's patient counts per independent set."""

    method: str
    W: np.ndarray
    sizes: tuple[int, ...] = ()
    Wa2: np.ndarray | None = None
    Wb2: np.ndarray | None = None
    sizes2: tuple[int, ...] = ()

    @classmethod
    def build(cls, method: str, cases, n_boot: int = 1000, seed: int = 0, val_cases=None) -> Resampling:
        """Resamples of the test patients ``cases`` (the case of each slice), and, with ``val_cases``,
        of the validation patients for the floors. bootstrap: ``n_boot`` cluster resamples."""
        if method not in METHODS:
            raise ValueError(f"interval method {method!r}: expected one of {METHODS}")
        has_val = val_cases is not None and len(val_cases) > 0
        if method == "jackknife":
            g = len(np.unique(cases))
            rs = cls(method, jackknife_weights(cases), (g,))
            if has_val:
                rs.Wa2, rs.Wb2 = two_sample_jackknife(val_cases, cases)
                rs.sizes2 = (len(np.unique(val_cases)), g)
            return rs
        rng = np.random.default_rng(seed)
        rs = cls(method, cluster_weights(cases, n_boot, rng))
        if has_val:
            rs.Wa2, rs.Wb2 = cluster_weights(val_cases, n_boot, rng), rs.W
        return rs

    def interval(self, replicates, two_sample: bool = False, centre: float | None = None,
                 nonnegative: bool = False, point: float | None = None) -> Interval | None:
        """The interval of ``replicates`` (computed on ``W``, or on ``Wa2``/``Wb2`` when
        ``two_sample``). ``centre``: bootstrap only, the point estimate to recentre biased
        replicates on (Fréchet distances); ``nonnegative``: clip at 0 (distances); ``point``:
        jackknife only, the reported estimate when the replicate function's own full-data value
        differs from it (KID draws its own random subsets)."""
        if self.method == "jackknife":
            reps = np.array(replicates, dtype=np.float64)
            if point is not None and len(reps):
                reps[-1] = point
            lo, hi = jackknife_interval(reps, self.sizes2 if two_sample else self.sizes)
        else:
            lo, hi = percentile_interval(replicates, centre=centre)
        if lo is None:
            return None
        return Interval(max(lo, 0.0), max(hi, 0.0)) if nonnegative else Interval(lo, hi)


def describe(method: str, n_boot: int, seed: int, n_test: int, n_val: int | None) -> str:
    """What the intervals are, for metrics_notes.json and the report."""
    what = (f"{round(100 * LEVEL)} % intervals (metrics_ci.json, '{SUFFIX}' keys) over the {n_test} test patients"
            + (f" (and the {n_val} validation patients for floors and gaps)" if n_val else "")
            + ": they cover patient sampling for this one trained model, not training noise (seed spread: "
              "`ctsynth compare`). ")
    if method == "jackknife":
        how = ("Delete-one-patient jackknife, estimate ± t quantile × jackknife SE (t with G−1 degrees of freedom; "
               "Welch–Satterthwaite for floors and gaps, which leave out one patient of either set): valid for "
               "few patients, where a percentile bootstrap is too narrow. ")
    else:
        how = (f"Percentiles of {n_boot} patient-level bootstrap resamples (test patients drawn with replacement, "
               f"then their slices; seed {seed}); Fréchet-distance intervals recentred on the point estimate by the "
               f"bootstrap bias. With few patients these undercover (see evaluate.interval_method). ")
    return (what + how + "Gaps (<key>_gap) are resampled paired: generated and real test slices against the same "
            "validation patients on the same replicates. Per-case intervals resample that case's slices only "
            "(correlated neighbours: narrower than patient-level intervals).")


def _add(out: dict, key: str, replicates, centre: float | None = None, two_sample: bool = False,
         point: float | None = None) -> None:
    """Interval of the replicates into ``out`` (an :class:`_Out`); a ``centre`` marks a Fréchet
    distance (bootstrap: recentred on it; both methods: clipped at 0); ``point``: see
    :meth:`Resampling.interval`."""
    interval = out.rs.interval(replicates, two_sample, centre, nonnegative=centre is not None, point=point)
    if interval is not None:
        out[key] = interval


class _Out(dict):
    """``{metric: Interval}`` being filled, with the resampling it is filled from."""

    def __init__(self, rs: Resampling):
        super().__init__()
        self.rs = rs


def _paired(out: dict, W: np.ndarray, slices: dict, labels: dict[int, str]) -> None:
    """mse, psnr, ssim (slice means), mae_hu overall and per label (pooled over pixels)."""
    means = weighted_mean(W, slices["values"])                                    # (B, 4)
    for j, key in enumerate(PairedAccumulator.SLICE_KEYS[:3]):
        _add(out, key, means[:, j])
    n_pix, err = slices["n_pixels"], slices["abs_err_hu"]                         # (N, 8)
    _add(out, "mae_hu", pooled_ratio(W, err.sum(1), n_pix.sum(1)))
    per_label = pooled_ratio(W, err, n_pix)                                       # (B, 8)
    for idx, name in labels.items():
        _add(out, f"mae_hu_{name}", per_label[:, idx])


def _dice(out: dict, W: np.ndarray, counts: dict[str, np.ndarray], structures: dict[int, str]) -> None:
    """Dice per structure and its mean over the structures present in each replicate (NaN where a
    structure is absent from the replicate's ground truth; a replicate with none present is NaN)."""
    idx = list(structures)
    for kind, c in counts.items():
        dice = dice_replicates(W, c)[:, idx]                                      # (B, S), NaN = absent
        for j, name in enumerate(structures.values()):
            _add(out, f"dice_{kind}_{name}", dice[:, j])
        present = np.isfinite(dice)
        n = present.sum(1)
        _add(out, f"dice_{kind}_mean", np.where(n > 0, np.where(present, dice, 0).sum(1) / np.maximum(n, 1), np.nan))


def _distances(out: _Out, W: np.ndarray, space: FeatureSpace, metrics: dict, kid_subset: int, seed: int) -> None:
    """FD/KID of the paired test sets; with validation features, the floors, ``_vs_val`` and their
    paired gap (same replicates)."""
    fd, kid, rs = space.fd_key, space.kid_key, out.rs
    if metrics.get(fd) is not None:
        _add(out, fd, frechet_replicates(space.real, space.generated, W, W), centre=metrics[fd])
    if metrics.get(kid) is not None:
        _add(out, kid, kid_replicates(space.real, space.generated, W, W, True, kid_subset, seed=seed),
             point=metrics[kid])
    if rs.Wa2 is None or space.val is None:
        return
    Wa, Wb = rs.Wa2, rs.Wb2
    for key, reps_of in ((fd, lambda other: frechet_replicates(space.val, other, Wa, Wb)),
                         (kid, lambda other: kid_replicates(space.val, other, Wa, Wb, False, kid_subset, seed=seed))):
        reps = {}
        for suffix, other in (("_floor", space.real), ("_vs_val", space.generated)):
            if metrics.get(key + suffix) is not None:
                reps[suffix] = reps_of(other)
                value = metrics[key + suffix]
                _add(out, key + suffix, reps[suffix], two_sample=True, centre=value if key == fd else None,
                     point=value if key == kid else None)
        if len(reps) == 2 and metrics.get(key + "_gap") is not None:
            gap, value = reps["_vs_val"] - reps["_floor"], metrics[key + "_gap"]
            interval = rs.interval(gap, two_sample=True, centre=value if rs.method == "bootstrap" else None,
                                   point=value if key == kid else None)
            if interval is not None:
                out[key + "_gap"] = interval


def metric_intervals(metrics: dict, slices: dict, dice_counts: dict[str, np.ndarray],
                     labels: dict[int, str], spaces: list[FeatureSpace], val_cases: np.ndarray | None,
                     *, n_boot: int, seed: int, kid_subset: int = 50, method: str = "jackknife") -> dict[str, Interval]:
    """``{metric: Interval}`` for the paired metrics, HU errors, Dice and every feature
    distance with its floors and gaps. slices: :meth:`PairedAccumulator.per_slice`; dice_counts:
    {"generated"|"real": :meth:`DiceAccumulator.per_slice`}; labels: {label index: name}
    including background; val_cases: the case of each validation feature row. ``n_boot`` < 1: none."""
    if n_boot < 1:
        return {}
    t0 = time.time()
    rs = Resampling.build(method, slices["case"], n_boot, seed, val_cases)
    out = _Out(rs)
    _paired(out, rs.W, slices, labels)
    _dice(out, rs.W, dice_counts, {i: n for i, n in labels.items() if i != 0})
    for space in spaces:
        _distances(out, rs.W, space, metrics, kid_subset, seed)
    log.info("intervals (%s): %d metrics from %d replicates of %d test patients in %.1f s", method, len(out),
             len(rs.W), len(np.unique(slices["case"])), time.time() - t0)
    return dict(out)


def per_case_intervals(slices: dict, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per case (sorted): ``<key>_ci95_lo/hi`` for mse, psnr, ssim (slice means) and mae_hu
    (pooled), resampling that case's slices."""
    rng = np.random.default_rng([seed, 1])
    rows = []
    for case in sorted(set(slices["case"].tolist())):
        own = slices["case"] == case
        W = resample_weights(int(own.sum()), n_boot, rng)
        means = weighted_mean(W, slices["values"][own])
        reps = {k: means[:, j] for j, k in enumerate(PairedAccumulator.SLICE_KEYS[:3])}
        reps["mae_hu"] = pooled_ratio(W, slices["abs_err_hu"][own].sum(1), slices["n_pixels"][own].sum(1))
        row = {"case": case}
        for key in PER_CASE_KEYS:
            row[f"{key}{SUFFIX}_lo"], row[f"{key}{SUFFIX}_hi"] = percentile_interval(reps[key])
        rows.append(row)
    return pd.DataFrame(rows)
