"""ctsynth.evaluate.bootstrap: resampling weights and the weighted estimators against their plain versions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from piq.kid import _mmd2_and_variance, _polynomial_kernel

from ctsynth.evaluate.bootstrap import (
    cluster_weights,
    dice_replicates,
    frechet_replicates,
    kid_replicates,
    percentile_interval,
    pooled_ratio,
    resample_weights,
    weighted_mean,
)
from ctsynth.evaluate.metrics import DiceAccumulator, frechet_distance, frechet_distance_weighted, kernel_distance

GROUPS = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 8 + ["d"] * 4)     # 4 patients, 20 slices


def test_cluster_weights_draw_whole_patients_then_their_slices():
    W = cluster_weights(GROUPS, 500, np.random.default_rng(0))
    assert W.shape == (500, 20) and (W >= 0).all() and np.all(W == np.round(W))
    sizes = {g: int((GROUPS == g).sum()) for g in "abcd"}
    times = np.stack([W[:, GROUPS == g].sum(1) / sizes[g] for g in "abcd"], 1)   # (B, 4)
    assert np.all(times == np.round(times))            # a patient contributes whole multiples of its size
    assert (times.sum(1) == 4).all()                   # 4 patients drawn per resample
    assert (times == 0).any(1).mean() > 0.5            # most resamples leave a patient out (1 - 4!/4⁴ = 0.91)
    # slices inside a drawn patient are resampled too (not copied as a block)
    drawn_once = times[:, 2] == 1
    assert (W[drawn_once][:, GROUPS == "c"] != 1).any()
    assert np.array_equal(W, cluster_weights(GROUPS, 500, np.random.default_rng(0)))


def test_resample_weights_sum_to_n():
    W = resample_weights(7, 100, np.random.default_rng(1))
    assert W.shape == (100, 7) and (W.sum(1) == 7).all() and (W == 0).any()


def test_percentile_interval_contains_the_mean_and_recentres():
    reps = np.random.default_rng(2).normal(10.0, 1.0, 4000)
    lo, hi = percentile_interval(reps)
    assert lo < 10 < hi and hi - lo == pytest.approx(2 * 1.96, rel=0.1)
    lo2, hi2 = percentile_interval(reps + 3.0, centre=10.0)     # biased replicates, recentred
    assert lo2 == pytest.approx(lo, abs=0.05) and hi2 == pytest.approx(hi, abs=0.05)
    assert percentile_interval(np.r_[reps[:10], [np.nan] * 10]) == (None, None)
    assert percentile_interval(reps, centre=float("nan")) == (None, None)


def test_weighted_means_and_ratios_equal_repeating_the_rows():
    rng = np.random.default_rng(3)
    x, num, den = rng.random(20), rng.random((20, 3)), rng.random((20, 3)) + 0.1
    W = cluster_weights(GROUPS, 5, rng)
    for w, m, r in zip(W, weighted_mean(W, x), pooled_ratio(W, num, den)):
        rows = np.repeat(np.arange(20), w.astype(int))
        assert m == pytest.approx(x[rows].mean())
        assert r == pytest.approx(num[rows].sum(0) / den[rows].sum(0))
    assert np.isnan(pooled_ratio(np.ones((1, 20)), num, np.zeros((20, 3)))).all()


def test_dice_replicates_equal_the_accumulator():
    rng = np.random.default_rng(4)
    pred, target = rng.integers(0, 3, (20, 8, 8)), rng.integers(0, 3, (20, 8, 8))
    target[:, :, :] = np.where(rng.random((20, 8, 8)) < 0.7, pred, target)
    acc = DiceAccumulator({1: "A", 2: "B"})
    acc.update(pred, target, list(GROUPS))
    counts = np.stack([[[(p == k) & (t == k) for k in range(8)], [p == k for k in range(8)],
                        [t == k for k in range(8)]] for p, t in zip(pred, target)]).sum((-1, -2))  # (20, 3, 8)
    whole = dice_replicates(np.ones((1, 20)), counts.astype(float))[0]
    assert whole[[1, 2]] == pytest.approx([acc.summary()["A"], acc.summary()["B"]])


def test_frechet_replicates_equal_the_exact_weighted_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 24, generator=g)                      # N < D, as on the phantom
    b = a + 0.5 * torch.randn(20, 24, generator=g) + 0.2
    c = torch.randn(12, 24, generator=g)                       # an unpaired set of another size
    rng = np.random.default_rng(5)
    W, Wc = cluster_weights(GROUPS, 30, rng), resample_weights(12, 30, rng)
    paired = frechet_replicates(a, b, W, W)
    unpaired = frechet_replicates(c, b, Wc, W)
    for i in range(30):
        w, wc = torch.from_numpy(W[i]), torch.from_numpy(Wc[i])
        assert paired[i] == pytest.approx(frechet_distance_weighted(a, b, w, w), rel=1e-7)
        assert unpaired[i] == pytest.approx(frechet_distance_weighted(c, b, wc, w), rel=1e-7)
    same = frechet_replicates(a, a.clone(), W, W)
    assert np.abs(same).max() < 1e-6 * float(torch.cov(a.T.double()).trace())
    assert frechet_replicates(a, b, np.ones((1, 20)), np.ones((1, 20)))[0] == pytest.approx(frechet_distance(a, b))


def test_kid_replicates_with_unit_weights_are_the_point_estimate_estimator():
    g = torch.Generator().manual_seed(1)
    x, y = torch.relu(torch.randn(20, 16, generator=g)), torch.relu(torch.randn(20, 16, generator=g)) + 0.3
    ones = np.ones((1, 20))
    # one subset holding every slice: exactly piq's unbiased MMD² (unpaired) / the u-statistic
    # that leaves out each slice's own pair (paired, disjoint halves of 10)
    kxx, kyy, kxy = (_polynomial_kernel(p.double(), q.double()) for p, q in ((x, x), (y, y), (x, y)))
    unpaired = kid_replicates(x, y, ones, ones, paired=False, subset_size=20, n_subsets=1)[0]
    assert unpaired == pytest.approx(float(_mmd2_and_variance(kxx, kxy, kyy, mmd_est="unbiased")), rel=1e-9)
    # many subsets: the same distribution of values as kernel_distance's subsets
    paired = kid_replicates(x, y, ones, ones, paired=True, subset_size=8, n_subsets=400, seed=3)[0]
    assert paired == pytest.approx(kernel_distance(x, y, subset_size=8, n_subsets=400, seed=4), rel=0.1)
    # a slice drawn twice is not paired with itself: identical sets stay ≈ 0 under resampling
    W = cluster_weights(GROUPS, 50, np.random.default_rng(6))
    same = kid_replicates(x, x.clone(), W, W, paired=True, subset_size=8)
    far = kid_replicates(x, x + 1.0, W, W, paired=True, subset_size=8)
    assert np.abs(same).max() < 0.05 * far.min()
    assert np.array_equal(far, kid_replicates(x, x + 1.0, W, W, paired=True, subset_size=8))
