"""Patient-level bootstrap: 95 % intervals for the evaluation metrics, cheaply.

One resample draws the test *patients* with replacement, then, inside each drawn patient, that
patient's slices with replacement (a two-stage cluster bootstrap: slices of one patient are
correlated, patients are the independent units). A resample is stored as integer frequency
weights over the evaluated slices, ``W`` (B, N): how often each slice was drawn. Every metric is
then a cheap function of ``W`` and per-slice statistics gathered once during evaluation, so
nothing is re-run through a network B times:

* slice means (mse, psnr, ssim): ``W @ x / ΣW``;
* pooled ratios (mae_hu, mae_hu_<S> = Σ|err| / Σpixels; Dice = 2Σ|P∩T| / (Σ|P| + Σ|T|)):
  ratios of W-weighted sums of per-slice counts;
* Fréchet distances: the exact FD of the feature rows with frequency weights
  (:func:`frechet_replicates`; the same estimator as :func:`ctsynth.evaluate.metrics.frechet_distance`,
  on the rows drawn at least once, its trace term through a symmetric eigen-solver: equal to
  ~1e-8 of the trace);
* KID: the point estimate's estimator (unbiased MMD² averaged over random subsets) on the
  resampled slices, with kernel matrices computed once (:func:`kid_replicates`). Pairs of a slice
  with itself (a duplicate drawn twice, or for paired sets a generated slice and its own real
  slice) are left out, as the point estimate's disjoint subsets leave them out.

Intervals are percentile intervals of the B replicates (:func:`percentile_interval`). Fréchet
distances are biased upward at small N and a resample holds only ~63 % distinct slices, so
their replicates sit above the point estimate (measured: all 300 replicates above it for 160
slices × 192-d); their interval is recentred by the bootstrap bias (mean replicate − point
estimate): it describes the spread of the FD at this test-set size around the value reported.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

LEVEL = 0.95                 # every interval is a 95 % interval (keys say ``_ci95``)
MIN_FINITE = 0.9             # share of finite replicates needed for an interval (else None)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """Row-wise bincount: draws (B, K) of indices in 0..n-1 (−1 = none) → counts (B, n) float64."""
    b = draws.shape[0]
    keep = draws >= 0
    flat = (np.arange(b)[:, None] * n + draws)[keep]
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def resample_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Ordinary bootstrap of n items: (n_boot, n) frequency weights, each row summing to n."""
    return _counts(rng.integers(0, n, size=(n_boot, n)), n)


def cluster_weights(groups: Sequence, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Two-stage bootstrap: draw groups (patients) with replacement, then each drawn group's
    items (slices) with replacement. groups: the group of each item (N,) → weights (n_boot, N)."""
    groups = np.asarray(groups)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    sizes = np.array([len(m) for m in members])
    table = np.full((len(names), sizes.max()), -1)                      # group → its item indices
    for g, m in enumerate(members):
        table[g, :len(m)] = m
    picked = rng.integers(0, len(names), size=(n_boot, len(names)))    # (B, G) drawn groups
    size = sizes[picked][..., None]                                     # (B, G, 1)
    local = (rng.random((n_boot, len(names), sizes.max())) * size).astype(np.int64)
    items = np.where(np.arange(sizes.max()) < size, table[picked[..., None], local], -1)
    return _counts(items.reshape(n_boot, -1), len(groups))


def percentile_interval(replicates, level: float = LEVEL, centre: float | None = None):
    """(lo, hi) percentile interval of the replicates; None, None when too few are finite.

    ``centre``: the point estimate, to recentre biased replicates (subtract mean − centre).
    """
    reps = np.asarray(replicates, dtype=np.float64)
    finite = reps[np.isfinite(reps)]
    if reps.size == 0 or finite.size < MIN_FINITE * reps.size:
        return None, None
    if centre is not None:
        if not np.isfinite(centre):
            return None, None
        finite = finite - (finite.mean() - centre)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def weighted_mean(W: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of per-item values under each resample: W (B, N), values (N,) or (N, K) → (B,) / (B, K)."""
    return (W @ values) / W.sum(1).reshape(-1, *([1] * (np.ndim(values) - 1)))


def pooled_ratio(W: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Σ w·num / Σ w·den per resample (NaN where the denominator is 0): (B,) or (B, K)."""
    num, den = W @ numerator, W @ denominator
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def dice_replicates(W: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pooled Dice per label under each resample. counts (N, 3, L): |P∩T|, |P|, |T| per slice → (B, L);
    NaN where the resample's target count is 0 (the structure is absent: not scored, as in
    :func:`ctsynth.evaluate.metrics.dice_scores`)."""
    inter, pred, target = (W @ counts[:, k, :] for k in range(3))
    return np.where(target > 0, 2 * inter / np.maximum(pred + target, 1e-300), np.nan)


@contextlib.contextmanager
def _one_thread():
    """Run small linear algebra on one thread: for ~100² matrices the thread hand-offs cost more
    than they save, and far more when another process shares the cores (measured on 2 shared
    cores: 0.5 s on one thread against 3-7 s batched on two for 1000 FD resamples)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fd_one(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> float:
    """Exact FD of one weighting, on the rows drawn at least once (zero-weight rows add nothing)."""
    ia, ib = wa.nonzero().flatten(), wb.nonzero().flatten()
    wa, wb, a, b = wa[ia], wb[ib], a[ia], b[ib]
    na, nb = wa.sum(), wb.sum()
    mu_a, mu_b = wa @ a / na, wb @ b / nb                                        # (D,)
    A = (a - mu_a) * (wa / (na - 1)).sqrt()[:, None]                              # (na', D): AᵀA = Σ_a
    B = (b - mu_b) * (wb / (nb - 1)).sqrt()[:, None]
    M = A @ B.T                                                                   # ‖M‖_* = tr (Σa Σb)^½
    small = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    tr_sqrt = torch.linalg.eigvalsh(small).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + A.square().sum() + B.square().sum() - 2 * tr_sqrt)


def frechet_replicates(a, b, Wa: np.ndarray, Wb: np.ndarray) -> np.ndarray:
    """Fréchet distance of every resample: features a (Na, D), b (Nb, D), weights (B, Na), (B, Nb)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    Wa, Wb = torch.from_numpy(np.asarray(Wa, np.float64)), torch.from_numpy(np.asarray(Wb, np.float64))
    with _one_thread():
        return np.array([_fd_one(a, b, wa, wb) for wa, wb in zip(Wa, Wb)])


def polynomial_kernel(x, y) -> np.ndarray:
    """piq's KID kernel k(x, y) = (⟨x, y⟩ / D + 1)³ in float64: (Nx, D), (Ny, D) → (Nx, Ny)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _subset_mean(K: torch.Tensor, rows: np.ndarray, cols: np.ndarray, skip_same: bool) -> np.ndarray:
    """Mean of K over each subset's (row, col) pairs, pairs of the same item left out when
    ``skip_same``: rows, cols (S, m) item indices → (S,) (NaN when no pair is left).

    Through item counts (S, N) instead of (S, m, m) gathers: Σ K[r_i, c_j] = c_rᵀ K c_c, and the
    same-item pairs add Σ_k c_r[k] c_c[k] K[k, k]."""
    cr = torch.from_numpy(_counts(rows, K.shape[0]))                              # (S, N)
    cc = torch.from_numpy(_counts(cols, K.shape[1]))
    total = ((cr @ K) * cc).sum(1)
    n = cr.sum(1) * cc.sum(1)
    if skip_same:
        both = cr * cc
        total, n = total - both @ K.diagonal(), n - both.sum(1)
    return torch.where(n > 0, total / n.clamp_min(1), torch.nan).numpy()


def kid_replicates(x, y, Wx: np.ndarray, Wy: np.ndarray, paired: bool, subset_size: int = 50,
                   *, n_subsets: int = 50, seed: int = 0) -> np.ndarray:
    """KID of every resample with the point estimate's estimator (:func:`ctsynth.evaluate.metrics.kernel_distance`):
    unbiased MMD² (piq's kernel) averaged over ``n_subsets`` random subsets of the resampled slices.

    features x (Nx, D), y (Ny, D); weights (B, Nx), (B, Ny). ``paired``: row i of x and y belong
    together; both sets are then drawn from one permutation of the resampled positions (disjoint
    halves) and a slice is never compared with its own pair. Pairs of a slice with itself (drawn
    twice) are left out everywhere, as the point estimate has no such pairs.
    """
    kxx, kyy, kxy = (torch.from_numpy(polynomial_kernel(p, q)) for p, q in ((x, x), (y, y), (x, y)))
    rng = np.random.default_rng(seed)
    out = np.empty(len(Wx))
    with _one_thread():
        for b, (wx, wy) in enumerate(zip(np.asarray(Wx, np.int64), np.asarray(Wy, np.int64))):
            px, py = np.repeat(np.arange(len(wx)), wx), np.repeat(np.arange(len(wy)), wy)   # resampled items
            if paired:
                m = min(subset_size, len(px) // 2)
                perm = rng.random((n_subsets, len(px))).argsort(1)
                a, c = px[perm[:, :m]], px[perm[:, m:2 * m]]                             # (S, m) each
            else:
                m = min(subset_size, len(px), len(py))
                a = px[rng.random((n_subsets, len(px))).argsort(1)[:, :m]]
                c = py[rng.random((n_subsets, len(py))).argsort(1)[:, :m]]
            if m < 2:
                out[b] = np.nan
                continue
            values = (_subset_mean(kxx, a, a, True) + _subset_mean(kyy, c, c, True)
                      - 2 * _subset_mean(kxy, a, c, paired))
            out[b] = np.nanmean(values) if np.isfinite(values).any() else np.nan
    return out


# --- Few-cluster intervals: the delete-one-patient jackknife with t quantiles ------------------------
#
# With G = 4 test patients the percentile bootstrap above undercovers: a resample of G clusters has
# about (G−1)/G of the variance, and its percentiles behave like normal rather than t_{G−1}
# quantiles, so its interval is about half as wide as a t-interval for a mean (measured in
# tests/test_intervals.py::test_coverage_*). The jackknife over patients is the standard remedy for
# few clusters: each replicate leaves one patient out, SE² = (G−1)/G · Σ(θ₋ᵢ − θ̄)², and the interval
# is θ̂ ± t_{G−1} · SE. For a mean of equal-size patients it *is* the t-interval; for pooled ratios,
# Dice and distances it is its linearised form. The replicates are the same weighted functions as the
# bootstrap's, so every metric gets one by swapping the weight matrix.

def jackknife_weights(groups: Sequence) -> np.ndarray:
    """Leave-one-group-out weights: groups (N,) → (G + 1, N); row g drops group g (weight 0) and keeps
    every other item (1); the last row keeps everything (its replicate is the point estimate)."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    g = inverse.max() + 1 if len(inverse) else 0
    return np.vstack([inverse[None, :] != np.arange(g)[:, None], np.ones((1, len(inverse)), bool)]).astype(np.float64)


def two_sample_jackknife(groups_a: Sequence, groups_b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife weights for a statistic of two independent sets of patients (e.g. validation vs
    test): rows leave out one patient of a (all of b kept), then one of b (all of a kept); last row
    keeps everything. → (Ga + Gb + 1, Na), (Ga + Gb + 1, Nb)."""
    wa, wb = jackknife_weights(groups_a), jackknife_weights(groups_b)
    ga, gb = len(wa) - 1, len(wb) - 1
    full_a, full_b = np.ones((gb, wa.shape[1])), np.ones((ga, wb.shape[1]))
    return np.vstack([wa[:ga], full_a, wa[-1:]]), np.vstack([full_b, wb[:gb], wb[-1:]])


def jackknife_interval(replicates, sizes: Sequence[int], level: float = LEVEL):
    """θ̂ ± t_df · SE from jackknife replicates: ``replicates`` = the leave-one-out values of each
    independent set of groups in turn (``sizes`` = their group counts, e.g. (G,) or (Ga, Gb)),
    then the point estimate. SE² = Σ_sets (G−1)/G Σ(θ₋ᵢ − θ̄)²; df = Welch–Satterthwaite over the
    sets (G − 1 for one set). (None, None) when a set has < 2 groups or a replicate is not finite."""
    from scipy import stats

    reps = np.asarray(replicates, dtype=np.float64)
    if len(reps) != sum(sizes) + 1 or min(sizes, default=0) < 2 or not np.isfinite(reps).all():
        return None, None
    point, parts, start = reps[-1], [], 0
    for g in sizes:
        r = reps[start:start + g]
        parts.append((g - 1) / g * np.square(r - r.mean()).sum())
        start += g
    var = float(sum(parts))
    denom = sum(v * v / (g - 1) for v, g in zip(parts, sizes))
    df = var * var / denom if denom > 0 else float(min(sizes) - 1)
    half = stats.t.ppf(0.5 + level / 2, df) * np.sqrt(var)
    return float(point - half), float(point + half)


def case_table_intervals(table, metrics_of, n_boot: int, seed: int, method: str = "jackknife") -> dict:
    """``{key: (lo, hi)}`` for metrics computed from a per-case table (one row per patient; e.g.
    per-case sums whose pooled ratio is the metric). ``metrics_of(table) -> {key: value}`` is
    evaluated on every replicate's rows: jackknife = leave one case out, estimate ± t_{G−1}·SE;
    bootstrap = percentiles of ``n_boot`` resamples of the cases. Keys whose estimate or a
    replicate is not finite get no interval."""
    n = len(table)
    if n_boot < 1 or n == 0:
        return {}
    if method == "jackknife":
        picks = [np.delete(np.arange(n), i) for i in range(n)] + [np.arange(n)]       # last: all cases
    else:
        picks = list(np.random.default_rng(seed).integers(0, n, size=(n_boot, n)))
    reps = [metrics_of(table.iloc[p].reset_index(drop=True)) for p in picks]
    point = metrics_of(table)
    out = {}
    for key, value in point.items():
        if value is None or not np.isfinite(value):
            continue
        vals = np.array([np.nan if r.get(key) is None else r[key] for r in reps], np.float64)
        lo, hi = jackknife_interval(vals, (n,)) if method == "jackknife" else percentile_interval(vals)
        if lo is not None:
            out[key] = (lo, hi)
    return out
