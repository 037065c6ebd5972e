"""Which metrics get a 95 % interval, and how, from the per-slice statistics of one evaluation.

:func:`metric_intervals` turns what :mod:`ctsynth.evaluate.stage` collected once (per-slice paired
values, pixel and Dice counts, feature matrices) into ``{metric: Interval}`` through
the patient-level bootstrap of :mod:`ctsynth.bootstrap`: the same B resamples of the test
patients serve every metric, so intervals of different metrics are of the same resamples.
Noise floors (real validation vs real test) resample the validation patients independently.
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
    kid_replicates,
    percentile_interval,
    pooled_ratio,
    resample_weights,
    weighted_mean,
)
from ctsynth.evaluate.metrics import PairedAccumulator
from ctsynth.evaluate.registry import SUFFIX
from ctsynth.evaluate.results import Interval

log = logging.getLogger("ctsynth.evaluate.intervals")

PER_CASE_KEYS = ("mse", "psnr", "ssim", "mae_hu")


@dataclass
class FeatureSpace:
    """Features of one space: generated and real test slices (paired, N × D) and real validation
    slices (M × D, or None); ``fd_key``/``kid_key`` name its metrics (``fd_seg``, ``kid_seg``)."""

    fd_key: str
    kid_key: str
    generated: np.ndarray
    real: np.ndarray
    val: np.ndarray | None = None


def describe(n_boot: int, seed: int) -> str:
    return (f"{round(100 * LEVEL)} % intervals (metrics_ci.json, '{SUFFIX}' keys): percentiles of "
            f"{n_boot} patient-level bootstrap resamples (test patients drawn with replacement, then "
            f"their slices; seed {seed}). Fréchet-distance intervals are recentred on the point "
            f"estimate by the bootstrap bias (resamples repeat slices, which inflates FD). KID "
            f"intervals apply the point estimate's subset estimator to each resample, never pairing a "
            f"slice with itself. "
            f"Floors resample the validation patients independently. Per-case intervals resample that "
            f"case's slices only (correlated neighbours: narrower than patient-level intervals).")


def _add(out: dict, key: str, replicates, centre: float | None = None) -> None:
    """Interval of the replicates into ``out``; recentred FD intervals are clipped at 0 (FD >= 0)."""
    lo, hi = percentile_interval(replicates, centre=centre)
    if lo is not None:
        out[key] = Interval(max(lo, 0.0), max(hi, 0.0)) if centre is not None else Interval(lo, hi)


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
    idx = list(structures)
    for kind, c in counts.items():
        dice = dice_replicates(W, c)[:, idx]                                      # (B, S)
        for j, name in enumerate(structures.values()):
            _add(out, f"dice_{kind}_{name}", dice[:, j])
        _add(out, f"dice_{kind}_mean", dice.mean(1))


def _distances(out: dict, W: np.ndarray, Wv: np.ndarray | None, space: FeatureSpace, metrics: dict,
               kid_subset: int, seed: int) -> None:
    fd, kid = space.fd_key, space.kid_key
    if metrics.get(fd) is not None:
        _add(out, fd, frechet_replicates(space.real, space.generated, W, W), centre=metrics[fd])
    if metrics.get(kid) is not None:
        _add(out, kid, kid_replicates(space.real, space.generated, W, W, True, kid_subset, seed=seed))
    if Wv is None or space.val is None:
        return
    for suffix, other in (("_floor", space.real), ("_vs_val", space.generated)):
        if metrics.get(fd + suffix) is not None:
            _add(out, fd + suffix, frechet_replicates(space.val, other, Wv, W), centre=metrics[fd + suffix])
        if metrics.get(kid + suffix) is not None:
            _add(out, kid + suffix, kid_replicates(space.val, other, Wv, W, False, kid_subset, seed=seed))


def metric_intervals(metrics: dict, slices: dict, dice_counts: dict[str, np.ndarray],
                     labels: dict[int, str], spaces: list[FeatureSpace], val_cases: np.ndarray | None,
                     n_boot: int, seed: int, kid_subset: int = 50) -> dict[str, Interval]:
    """``{metric: Interval}`` for the paired metrics, HU errors, Dice and every feature
    distance with its floors. slices: :meth:`PairedAccumulator.per_slice`; dice_counts:
    {"generated"|"real": :meth:`DiceAccumulator.per_slice`}; labels: {label index: name}
    including background; val_cases: the case of each validation feature row."""
    if n_boot < 1:
        return {}
    t0 = time.time()
    rng = np.random.default_rng(seed)
    W = cluster_weights(slices["case"], n_boot, rng)
    Wv = cluster_weights(val_cases, n_boot, rng) if val_cases is not None and len(val_cases) else None
    out: dict[str, Interval] = {}
    _paired(out, W, slices, labels)
    _dice(out, W, dice_counts, {i: n for i, n in labels.items() if i != 0})
    for space in spaces:
        _distances(out, W, Wv, space, metrics, kid_subset, seed)
    log.info("intervals: %d metrics from %d resamples of %d test patients in %.1f s", len(out), n_boot,
             len(np.unique(slices["case"])), time.time() - t0)
    return out


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
