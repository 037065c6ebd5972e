"""Known-answer tests for ctsynth.metrics: paired metrics, per-structure HU errors, Dice,
Fréchet distance / KID, and streaming accumulators == all-at-once."""
from __future__ import annotations

import kornia
import numpy as np
import pytest
import torch

from ctsynth.core.errors import MetricUnavailable
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.metrics import (
    DiceAccumulator,
    FeatureBank,
    PairedAccumulator,
    dice_scores,
    frechet_distance,
    frechet_distance_weighted,
    kernel_distance,
    per_slice_metrics,
    reported_structures,
)
from ctsynth.evaluate.registry import METRICS, definition

WINDOW = [-1000.0, 1000.0]
STRUCTS = ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"]


@pytest.fixture
def real(tiny_store):
    """(12, 32, 32) float32 real slices in [-1, 1] and their masks."""
    store = ProcessedStore(tiny_store)
    return (torch.from_numpy(np.asarray(store.images[:12], np.float32)),
            torch.from_numpy(np.asarray(store.masks[:12]).astype(np.int64)))


def _blur(x, sigma):
    return kornia.filters.gaussian_blur2d(x[:, None], (9, 9), (sigma, sigma))[:, 0]


def _noise(x, level, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + level * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _means(fake, real):
    return {k: float(v.mean()) for k, v in per_slice_metrics(fake, real, WINDOW).items()}


def test_identical_images_give_perfect_scores(real):
    x, _ = real
    m = _means(x, x)
    assert m["mse"] == 0.0 and m["mae_hu"] == 0.0
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["psnr"] == pytest.approx(80.0, abs=1e-3)   # piq: 10·log10(1 / (0 + 1e-8))


@pytest.mark.parametrize("degrade,levels", [(_blur, (0.6, 1.2, 2.5)), (_noise, (0.03, 0.1, 0.3))])
def test_degradation_worsens_every_metric_monotonically(real, degrade, levels):
    x, _ = real
    runs = [_means(degrade(x, lvl), x) for lvl in levels]
    for a, b in zip(runs, runs[1:]):
        assert b["mse"] > a["mse"] > 0
        assert b["mae_hu"] > a["mae_hu"] > 0
        assert b["psnr"] < a["psnr"] < 80
        assert b["ssim"] < a["ssim"] < 1


def test_mae_hu_uses_the_window():
    real = torch.zeros(2, 16, 16)
    fake = real + 0.1                      # 0.1 in [-1, 1] = 100 HU over a 2000 HU window
    assert _means(fake, real)["mae_hu"] == pytest.approx(100.0, rel=1e-5)
    assert float(per_slice_metrics(fake, real, [-200, 200])["mae_hu"][0]) == pytest.approx(20.0, rel=1e-5)


def test_per_structure_mae_known_values():
    masks = torch.zeros(1, 16, 16, dtype=torch.long)
    masks[0, :4, :4] = 1                   # Myo: 16 px
    masks[0, 8:12, 8:10] = 3               # LV: 8 px
    real = torch.zeros(1, 16, 16)
    delta = torch.full((1, 16, 16), 0.01)  # background: +10 HU
    delta[masks == 1] = 0.1                # Myo: +100 HU
    delta[masks == 3] = -0.05              # LV: −50 HU
    acc = PairedAccumulator(WINDOW, STRUCTS)
    acc.update(real + delta, real, masks, ["c"], [0])
    s = acc.summary()
    assert s["mae_hu_Myo"] == pytest.approx(100, rel=1e-4)
    assert s["mae_hu_LV"] == pytest.approx(50, rel=1e-4)
    assert s["mae_hu_background"] == pytest.approx(10, rel=1e-4)
    assert s["mae_hu"] == pytest.approx((16 * 100 + 8 * 50 + 232 * 10) / 256, rel=1e-4)
    assert np.isnan(s["mae_hu_LA"])        # absent structure: undefined, not 0
    table = acc.per_structure().set_index("structure")
    assert table.loc["LV", "bias_hu"] == pytest.approx(-50, rel=1e-4)
    assert table.loc["Myo", "n_pixels"] == 16 and table.loc["background", "n_pixels"] == 232
    assert table.loc["Myo", "generated_hu_mean"] - table.loc["Myo", "real_hu_mean"] == pytest.approx(100, rel=1e-4)


def test_paired_streaming_equals_all_at_once(real):
    x, masks = real
    fake = _noise(_blur(x, 1.0), 0.05)
    cases = ["a"] * 5 + ["b"] * 7
    zs = list(range(12))
    whole, chunked = PairedAccumulator(WINDOW, STRUCTS), PairedAccumulator(WINDOW, STRUCTS)
    frame = whole.update(fake, x, masks, cases, zs)
    parts = [chunked.update(fake[s:s + 5], x[s:s + 5], masks[s:s + 5], cases[s:s + 5], zs[s:s + 5])
             for s in range(0, 12, 5)]
    a, b = whole.summary(), chunked.summary()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, nan_ok=True)
    np.testing.assert_allclose(whole.per_case().drop(columns="case").to_numpy(float),
                               chunked.per_case().drop(columns="case").to_numpy(float), rtol=1e-9)
    direct = per_slice_metrics(fake, x, WINDOW)
    np.testing.assert_allclose(frame["ssim"], direct["ssim"].numpy(), rtol=1e-6)
    assert sum(len(p) for p in parts) == 12 and whole.n_slices == 12
    # the pooled MAE equals the all-pixels MAE in HU computed directly
    direct_mae = float((fake - x).abs().mean() * 1000.0)
    assert a["mae_hu"] == pytest.approx(direct_mae, rel=1e-5)


def test_dice_known_values():
    t = torch.zeros(1, 12, 12, dtype=torch.long)
    t[0, 2:6, 2:6] = 1                     # 16 px
    p = torch.zeros_like(t)
    p[0, 2:6, 4:8] = 1                     # 16 px, 8 overlap
    assert dice_scores(t, t, [1])[1] == 1.0
    d = dice_scores(p, t, [1, 2])
    assert d[1] == pytest.approx(0.5)      # 2·8 / (16 + 16)
    assert d[2] == 1.0                     # absent from both: agreement


def test_dice_streaming_equals_all_at_once(real):
    _, masks = real
    pred = masks.clone()
    pred[:, :, :3] = 0                     # damage a strip
    pred[::2] = torch.roll(pred[::2], 2, dims=-1)
    labels = reported_structures(STRUCTS)
    acc = DiceAccumulator(labels)
    for s in range(0, 12, 5):
        acc.update(pred[s:s + 5], masks[s:s + 5], ["a"] * len(pred[s:s + 5]))
    expected = dice_scores(pred, masks, labels)
    got = acc.summary()
    for idx, name in labels.items():
        assert got[name] == pytest.approx(expected[idx], rel=1e-12)
    assert acc.per_case()["a"] == got


def test_reported_structures_handles_subsets_and_wh():
    assert reported_structures(["LV", "Ao"]) == {3: "LV", 6: "Ao"}
    assert list(reported_structures(["WH"]).values()) == STRUCTS


def test_frechet_distance_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    assert frechet_distance(a, a.clone()) == pytest.approx(0.0, abs=1e-4)
    # a shift by c in every dimension leaves the covariance unchanged: FD = D·c²
    assert frechet_distance(a, a + 0.5) == pytest.approx(16 * 0.25, rel=1e-3)
    # more noise → larger distance
    fds = [frechet_distance(a, a + s * torch.randn(a.shape, generator=g)) for s in (0.1, 0.5, 1.0)]
    assert fds[0] < fds[1] < fds[2]
    with pytest.raises(MetricUnavailable):
        frechet_distance(a[:1], a[:1])


def _scipy_fd(a, b):
    """Reference FD as pytorch-fid computes it (scipy.linalg.sqrtm of Σ_a Σ_b)."""
    import scipy.linalg

    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n_a, n_b, dim", [(300, 300, 16), (60, 60, 96), (40, 70, 96)])
def test_frechet_distance_matches_scipy_sqrtm_also_with_fewer_slices_than_dims(n_a, n_b, dim):
    g = torch.Generator().manual_seed(n_a + dim)
    mix = torch.randn(6, dim, generator=g)
    a = torch.randn(n_a, 6, generator=g) @ mix + 0.3 * torch.randn(n_a, dim, generator=g)
    b = torch.randn(n_b, 6, generator=g) @ mix * 1.2 + 0.3 * torch.randn(n_b, dim, generator=g) + 0.1
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-4)
    # identical sets: 0 up to float64 rounding even when N < D (piq's Newton–Schulz gave ~1e-3 × trace)
    assert 0 <= frechet_distance(a, a.clone()) < 1e-9 * float(torch.cov(a.T.double()).trace())


def test_weighted_frechet_distance_equals_repeated_rows():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(30, 12, generator=g), torch.randn(30, 12, generator=g) + 0.2
    w = torch.from_numpy(np.random.default_rng(0).multinomial(30, [1 / 30] * 30)).double()
    rows = torch.repeat_interleave(torch.arange(30), w.long())
    assert frechet_distance_weighted(a, b, w, w) == pytest.approx(frechet_distance(a[rows], b[rows]), rel=1e-9)
    assert frechet_distance_weighted(a, b) == frechet_distance(a, b)


def test_unpaired_kernel_distance_uses_both_whole_sets():
    g = torch.Generator().manual_seed(2)
    a, same = torch.relu(torch.randn(40, 16, generator=g)), torch.relu(torch.randn(80, 16, generator=g))
    b = torch.cat([same[:40], same[40:] + 2.0])             # rows 40.. are far away
    # paired subsets would only ever draw rows < min(len) = 40 of b, which match a's distribution
    far = kernel_distance(a, b, subset_size=20, n_subsets=20, paired=False)
    near = kernel_distance(a, same, subset_size=20, n_subsets=20, paired=False)
    assert far > 10 * abs(near) and abs(near) < 5e-2
    assert kernel_distance(a, b, 20, 5, seed=1, paired=False) == kernel_distance(a, b, 20, 5, seed=1, paired=False)
    with pytest.raises(ValueError, match="equal size"):
        kernel_distance(a, b)


def test_kernel_distance_is_zero_for_identical_sets_and_seeded():
    g = torch.Generator().manual_seed(1)
    a = torch.relu(torch.randn(120, 32, generator=g))
    same = kernel_distance(a, a.clone(), subset_size=50, n_subsets=20)
    assert abs(same) < 5e-3
    far = kernel_distance(a, a + 1.0, subset_size=50, n_subsets=20)
    assert far > 20 * max(abs(same), 1e-4)
    assert kernel_distance(a, a + 1.0, 50, 5, seed=3) == kernel_distance(a, a + 1.0, 50, 5, seed=3)
    with pytest.raises(MetricUnavailable):
        kernel_distance(a[:3], a[:3])


def test_feature_bank_concatenates():
    bank = FeatureBank()
    bank.add(torch.ones(3, 4))
    bank.add(torch.zeros(2, 4))
    assert len(bank) == 5 and bank.tensor().shape == (5, 4)


def test_every_emitted_key_has_a_definition():
    for key in ("mse", "psnr", "ssim", "mae_hu", "fd_seg", "kid_seg", "fid_inception",
                "dice_generated_LV", "dice_real_PA", "mae_hu_Ao", "privacy_generated_share_above"):
        assert definition(key), key
    assert all(m.definition and "\n" not in m.definition for m in METRICS)
