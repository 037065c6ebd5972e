"""Known-answer tests for ctsynth.evaluate.metrics: paired metrics, per-structure HU errors, Dice,
Fréchet distance / KID, and streaming accumulators == all-at-once."""
from __future__ import annotations

from types import SimpleNamespace

import kornia
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_params
from ctsynth.core.errors import MetricUnavailable
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate import evaluate
from ctsynth.evaluate.bootstrap import dice_replicates
from ctsynth.evaluate.metrics import (
    DiceAccumulator,
    FeatureBank,
    PairedAccumulator,
    dice_mean,
    dice_scores,
    frechet_distance,
    frechet_distance_weighted,
    kernel_distance,
    per_slice_metrics,
    reported_structures,
)
from ctsynth.evaluate.nearest import PrivacyAccumulator, privacy_rule
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


def test_psnr_and_mse_of_a_constant_offset_are_known():
    """fake = real + δ: MSE is taken in [-1, 1], so δ²; PSNR on (x + 1) / 2 with data_range 1, where
    the offset is δ / 2, so 10·log10(1² / (δ/2)²) = 20 dB for δ = 0.2 (piq adds ε = 1e-8 to the
    MSE). data_range 2 (the [-1, 1] span) would give 26.02 dB, 255 would give 68.1 dB."""
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 16, 16, generator=g) - 0.5           # [-0.5, 0.5]: + δ is never clamped
    delta = 0.2
    acc = PairedAccumulator(WINDOW, STRUCTS)
    frame = acc.update(real + delta, real, torch.zeros(3, 16, 16, dtype=torch.long), ["c"] * 3, [0, 1, 2])
    psnr = 10 * np.log10(1.0 ** 2 / ((delta / 2) ** 2 + 1e-8))
    assert psnr == pytest.approx(20.0, abs=1e-5)
    np.testing.assert_allclose(frame["psnr"], psnr, atol=1e-4)              # per slice, as streamed
    s = acc.summary()
    assert s["psnr"] == pytest.approx(psnr, abs=1e-4)
    assert s["mse"] == pytest.approx(delta ** 2, rel=1e-5)
    assert s["mae_hu"] == pytest.approx(delta * 1000.0, rel=1e-5)           # 0.2 of a 2000 HU window


def test_ssim_of_two_constant_images_is_the_luminance_term():
    """Constant images a, b (in [0, 1], data_range L = 1) have no variance, so SSIM is the luminance
    term alone: (2ab + C1) / (a² + b² + C1), C1 = (0.01·L)². a = 0.05, b = 0.02 give exactly 0.7;
    data_range 2 would give 0.727 (C1 weighs 4× more against the halved values)."""
    a, b, c1 = 0.05, 0.02, (0.01 * 1.0) ** 2
    fake, real = torch.full((2, 16, 16), 2 * a - 1), torch.full((2, 16, 16), 2 * b - 1)   # [-1, 1] model space
    expected = (2 * a * b + c1) / (a ** 2 + b ** 2 + c1)
    assert expected == pytest.approx(0.7, rel=1e-12)
    acc = PairedAccumulator(WINDOW, STRUCTS)
    frame = acc.update(fake, real, torch.zeros(2, 16, 16, dtype=torch.long), ["c", "c"], [0, 1])
    np.testing.assert_allclose(frame["ssim"], expected, rtol=1e-5)
    assert acc.summary()["ssim"] == pytest.approx(expected, rel=1e-5)
    assert acc.summary()["psnr"] == pytest.approx(10 * np.log10(1 / ((a - b) ** 2 + 1e-8)), abs=1e-4)


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
    assert np.isnan(d[2])                  # absent from both: not scored (was 1.0)
    assert np.isnan(dice_scores(p, torch.zeros_like(t), [1])[1])   # predicted but absent from the truth


def _absent_structure_counts():
    """Two patients; LV (3) absent from both ground truths, predicted in b; PA (7) only in a."""
    target = torch.zeros(4, 16, 16, dtype=torch.long)
    target[:, 1:4, 1:4] = 6                # Ao in every slice, 9 px
    target[:2, 5:7, 5:7] = 7               # PA in patient a only, 4 px
    pred = target.clone()
    pred[:, 1, 1:4] = 0                    # Ao: 6 of 9 found → 2·6 / (6 + 9) = 0.8
    pred[2:, 5:7, 5:7] = 3                 # LV predicted in b, where the truth has none
    return pred, target, ["a", "a", "b", "b"]


def test_dice_of_a_structure_absent_from_the_ground_truth_is_null():
    pred, target, cases = _absent_structure_counts()
    acc = DiceAccumulator({3: "LV", 6: "Ao", 7: "PA"})
    acc.update(pred, target, cases)
    s = acc.summary()
    assert np.isnan(s["LV"]) and s["Ao"] == pytest.approx(0.8) and s["PA"] == 1.0
    assert acc.mean() == pytest.approx(0.9)                     # over Ao and PA only (was (1 + 0.8 + 1) / 3)
    assert list(acc.absent()) == ["LV"] and "absent from the ground truth" in acc.absent()["LV"]
    per_case = acc.per_case()                                   # PA absent from patient b only
    assert per_case["a"]["PA"] == 1.0 and np.isnan(per_case["b"]["PA"]) and np.isnan(per_case["b"]["LV"])
    assert np.isnan(dice_mean({"LV": float("nan")}))                         # none present
    assert dice_mean(np.array([[np.nan, 0.5], [np.nan, np.nan]]))[0] == 0.5


def test_evaluate_nulls_an_absent_structure_and_means_the_present_ones(tmp_path):
    """The evaluate stage on a test set without LV: dice_*_LV null with the reason (not 1, nor 0
    for stray predictions), dice_*_mean over Ao and PA, blank per-case / per-structure cells."""
    pred, target, cases = _absent_structure_counts()
    labels = {3: "LV", 6: "Ao", 7: "PA"}
    paired = PairedAccumulator(WINDOW, list(labels.values()))
    paired.update(torch.zeros(4, 16, 16), torch.zeros(4, 16, 16), target, cases, [0, 1, 0, 1])
    dice = {"generated": DiceAccumulator(labels), "real": DiceAccumulator(labels)}
    dice["generated"].update(pred, target, cases)
    dice["real"].update(target, target, cases)
    privacy = PrivacyAccumulator(0.95)
    for kind in ("generated", "real"):
        privacy.update(kind, np.full(4, 0.5))
    acc = SimpleNamespace(paired=paired, dice=dice, privacy=privacy, rule=privacy_rule([], None, 0.95),
                          feats={"seg": {"generated": FeatureBank(), "real": FeatureBank()}})
    store = SimpleNamespace(slices=pd.DataFrame({"case": cases}))
    res, _ = evaluate._metrics(tiny_params(), store, np.arange(4), acc, None, {}, val_cases=None,
                               notes={"fid_inception": "none"})
    for kind in ("generated", "real"):
        assert res.value(f"dice_{kind}_LV") is None
        assert "LV absent from the ground truth" in res.null_reasons()[f"dice_{kind}_LV"]
    assert res.value("dice_generated_mean") == pytest.approx(0.9)      # (0.8 + 1) / 2; was (0 + 0.8 + 1) / 3
    assert res.value("dice_real_mean") == 1.0
    assert res.value("privacy_threshold") == 0.95 and res.value("privacy_threshold_calibrated") is None
    evaluate._write_tables(tmp_path, paired, dice, privacy, pd.DataFrame())
    per_case = pd.read_csv(tmp_path / "per_case.csv").set_index("case")
    assert per_case.loc["a", "dice_real_PA"] == 1.0 and np.isnan(per_case.loc["b", "dice_real_PA"])
    assert per_case["dice_generated_LV"].isna().all()
    per_struct = pd.read_csv(tmp_path / "per_structure.csv").set_index("structure")
    assert per_struct.loc["LV", "n_pixels"] == 0 and per_struct.loc["LV", ["dice_generated", "dice_real"]].isna().all()
    assert per_struct.loc["PA", "dice_real"] == 1.0


def test_dice_replicates_are_nan_where_the_resample_lacks_the_structure():
    pred, target, _ = _absent_structure_counts()
    acc = DiceAccumulator({3: "LV", 6: "Ao", 7: "PA"})
    acc.update(pred, target, ["-"] * 4)
    W = np.array([[1, 1, 1, 1], [0, 0, 2, 2], [2, 2, 0, 0]], float)     # all; patient b twice; a twice
    reps = dice_replicates(W, acc.per_slice())
    assert np.isnan(reps[:, 3]).all()                                  # LV: never in the truth
    assert reps[0, 7] == 1.0 and np.isnan(reps[1, 7]) and reps[2, 7] == 1.0    # PA: only with patient a
    assert reps[:, 6] == pytest.approx([0.8] * 3)


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
