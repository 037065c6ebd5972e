"""Realism metrics (ctsynth.evaluate.realism): known answers for texture, contrast and the
classifier two-sample test, and the report's verdict built on them."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from ctsynth.evaluate import realism as rl
from ctsynth.evaluate.bootstrap import case_table_intervals
from ctsynth.evaluate.results import Interval, Results
from ctsynth.report.summary import realism_checks, realism_reading

WINDOW = (-1000.0, 1000.0)
HU = 1000.0                                 # [-1, 1] units → HU on this window
LABELS = {1: "Myo", 3: "LV"}
CFG = SimpleNamespace(c2st_steps=150, c2st_batch_size=32, c2st_lr=2e-3, c2st_width=8)


def white(shape, sigma, seed):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, sigma, shape))


# ------------------------------------------------------------------------------ texture

def test_white_noise_spectrum_is_sigma_squared_in_every_band_whole_and_masked():
    sigma, size = 0.03, 64
    x = white((40, size, size), sigma, 0)
    counts = rl.band_counts(size)
    full = torch.ones(40, size, size, dtype=torch.bool)
    disc = torch.zeros(size, size, dtype=torch.bool)
    yy, xx = np.mgrid[:size, :size]
    disc[torch.from_numpy((yy - 32) ** 2 + (xx - 30) ** 2 < 15 ** 2)] = True
    for region in (full, disc.expand(40, -1, -1)):
        nps = rl.band_power(x, region).numpy() / counts / len(x)                # mean over slices
        np.testing.assert_allclose(nps, sigma ** 2, rtol=0.1)


def test_band_index_covers_the_disc_without_dc_or_corners():
    band = rl.band_index(16)
    assert band[0, 0] == -1                                                    # DC
    assert band[8, 8] == -1                                                    # corner: radius 0.707 > 0.5
    assert band[0, 8] == rl.N_BANDS - 1                                        # Nyquist along one axis
    assert band[0, 1] == 0 and set(band.unique().tolist()) == {-1, *range(rl.N_BANDS)}


def test_residual_std_ratio_of_two_white_noises_is_their_sigma_ratio():
    size = 32
    real = white((30, size, size), 0.02, 1).float()
    fake = white((30, size, size), 0.03, 2).float()
    masks = torch.zeros(30, size, size, dtype=torch.long)
    masks[:, 4:28, 4:28] = 3                                                   # one big "LV"
    acc = rl.TextureAccumulator(WINDOW, LABELS)
    acc.update(fake, real, masks, ["a"] * 15 + ["b"] * 15, np.ones((30, size, size), bool))
    m = acc.metrics()
    assert m["texture_std_ratio_LV"] == pytest.approx(1.5, rel=0.05)
    assert m["texture_std_ratio"] == pytest.approx(1.5, rel=0.05)
    for k in range(1, rl.N_BANDS + 1):                                         # white: the same in every band
        assert m[f"texture_nps_ratio_band{k}"] == pytest.approx(2.25, rel=0.15)
    assert np.isnan(m["texture_std_ratio_Myo"])                                # absent: undefined, not 1
    # the residual is a high-pass of white noise of 20 HU: a known fraction of it
    assert 8 < m["texture_residual_std_real_hu"] < 20


def test_identical_slices_score_one_and_blurred_ones_score_low():
    rng = np.random.default_rng(3)
    real = torch.from_numpy(rng.normal(0, 0.03, (10, 32, 32))).float()
    masks = torch.full((10, 32, 32), 1, dtype=torch.long)
    body = np.ones((10, 32, 32), bool)
    same = rl.TextureAccumulator(WINDOW, LABELS)
    same.update(real.clone(), real, masks, ["a"] * 10, body)
    assert same.metrics()["texture_std_ratio"] == pytest.approx(1.0, abs=1e-12)
    blurred = torch.from_numpy(ndimage.gaussian_filter(real.numpy(), (0, 1.5, 1.5))).float()
    soft = rl.TextureAccumulator(WINDOW, LABELS)
    soft.update(blurred, real, masks, ["a"] * 10, body)
    m = soft.metrics()
    assert m["texture_std_ratio"] < 0.3
    assert m["texture_nps_ratio_band4"] < m["texture_nps_ratio_band1"] < 1       # fine texture lost most


def test_erode_and_regions():
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 2:7, 2:7] = True
    assert rl.erode(m, 1)[0].sum() == 9 and rl.erode(m, 2)[0].sum() == 1
    edge = torch.ones(1, 5, 5, dtype=torch.bool)
    assert rl.erode(edge, 1)[0].sum() == 9                                       # outside the image is outside
    real = torch.full((1, 12, 12), -0.1)                                         # -100 HU: soft tissue
    real[0, :, :4] = -0.8                                                        # -800 HU: lung
    masks = torch.zeros(1, 12, 12, dtype=torch.long)
    masks[0, 4:8, 8:12] = 3
    regions = rl.texture_regions(real, masks, LABELS, WINDOW, np.ones((1, 12, 12), bool))
    assert regions["lung"][0, :, :3].any() and not regions["lung"][0, :, 5:].any()
    assert not (regions["soft_tissue"] & (masks > 0)).any()                      # structures are their own region
    assert regions["LV"].sum() == 4                                              # 4 x 4 eroded by 1


# ------------------------------------------------------------------------------ contrast

def _pixel_sums(real_means: dict, fake_means: dict, n: int = 100) -> dict:
    """Paired-accumulator style per-case sums (rows n, |err|, err, real HU, fake HU; 8 labels)."""
    out = {}
    for case in real_means:
        p = np.zeros((5, 8))
        for idx in LABELS:
            p[0, idx], p[3, idx], p[4, idx] = n, n * real_means[case][idx], n * fake_means[case][idx]
        out[case] = p
    return out


def test_contrast_bias_and_spread_known_answers():
    real = {c: {1: 100.0 + 10 * i, 3: 300.0 + 40 * i} for i, c in enumerate("abcd")}
    shifted = {c: {k: v + 10.0 for k, v in m.items()} for c, m in real.items()}
    table = rl.contrast_table(_pixel_sums(real, shifted), LABELS)
    m = rl.contrast_metrics(table, LABELS.values())
    assert m["contrast_bias_hu_LV"] == pytest.approx(10.0) and m["contrast_bias_hu_Myo"] == pytest.approx(10.0)
    assert m["contrast_spread_ratio_LV"] == pytest.approx(1.0) and m["contrast_spread_ratio"] == pytest.approx(1.0)
    average = {c: {1: 115.0, 3: 360.0} for c in real}                            # every patient drawn alike
    m = rl.contrast_metrics(rl.contrast_table(_pixel_sums(real, average), LABELS), LABELS.values())
    assert m["contrast_spread_ratio"] == 0.0 and m["contrast_bias_hu_max_abs"] == pytest.approx(0.0)
    iv = rl.table_intervals(table, lambda t: rl.contrast_metrics(t, LABELS.values()), 1000, 0, "jackknife")
    assert iv["contrast_bias_hu_LV"].lo == pytest.approx(10.0) == iv["contrast_bias_hu_LV"].hi   # no spread


def test_case_table_jackknife_of_a_mean_is_the_t_interval():
    from scipy import stats

    values = np.array([1.0, 2.5, 2.0, 4.0])
    table = pd.DataFrame({"v": values})
    lo, hi = case_table_intervals(table, lambda t: {"m": float(t["v"].mean())}, 1000, 0)["m"]
    half = stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2
    assert (lo, hi) == pytest.approx((values.mean() - half, values.mean() + half))


# ------------------------------------------------------------------------------ classifier two-sample test

def test_roc_auc_known_answers_and_brute_force():
    assert rl.roc_auc([0, 1, 2], [3, 4]) == 1.0 and rl.roc_auc([3, 4], [0, 1, 2]) == 0.0
    assert rl.roc_auc([1, 1], [1, 1, 1]) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 37).round(1), rng.normal(0.5, 1, 23).round(1)   # with ties
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert rl.roc_auc(neg, pos) == pytest.approx(brute)
    assert np.isnan(rl.roc_auc([], [1.0]))


def patients(n_patients: int, per: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real-looking slices: a smooth random anatomy plus white noise (the texture), per patient."""
    rng = np.random.default_rng(seed)
    imgs, cases = [], []
    for p in range(n_patients):
        base = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 4) * 3
        for _ in range(per):
            drift = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 4)
            imgs.append(np.clip(0.3 * (base + drift) + rng.normal(0, 0.05, (size, size)), -1, 1))
            cases.append(f"p{p}")
    return np.asarray(imgs, np.float32), np.asarray(cases)


def twins(n_patients: int, per: int, size: int = 32, seed: int = 0):
    """(real, fake, cases) from one distribution: the same smooth anatomy per slice as
    :func:`patients`, each of the pair with its own white noise of the same sd (a null)."""
    rng = np.random.default_rng(seed)
    pairs, cases = [], []
    for p in range(n_patients):
        base = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 4) * 3
        for _ in range(per):
            clean = 0.3 * (base + ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 4))
            pairs.append([np.clip(clean + rng.normal(0, 0.05, (size, size)), -1, 1) for _ in range(2)])
            cases.append(f"p{p}")
    pairs = np.asarray(pairs, np.float32)
    return pairs[:, 0], pairs[:, 1], np.asarray(cases)


def _set(real, fake, cases):
    return {"real": real, "fake": fake, "real_cases": cases, "fake_cases": cases}


@pytest.fixture(scope="module")
def slices():
    return patients(4, 30, seed=1), patients(4, 30, seed=2)


def test_c2st_cannot_tell_real_plus_tiny_noise_and_always_tells_blurred(slices):
    (tr, tr_cases), (te, te_cases) = slices
    rng = np.random.default_rng(5)
    tiny = lambda x: (x + rng.normal(0, 0.002, x.shape)).astype(np.float32)          # noqa: E731
    blur = lambda x: ndimage.gaussian_filter(x, (0, 1.2, 1.2)).astype(np.float32)   # noqa: E731
    same, _, _ = rl.c2st(_set(tr, tiny(tr), tr_cases), _set(te, tiny(te), te_cases), CFG, seed=0)
    assert 0.35 <= same["c2st_auc"] <= 0.65 and same["c2st_p"] > 0.1
    soft, intervals, _ = rl.c2st(_set(tr, blur(tr), tr_cases), _set(te, blur(te), te_cases), CFG, seed=0)
    assert soft["c2st_auc"] >= 0.95
    assert soft["c2st_p"] == rl.smallest_p(4) == 1 / 16            # 4 test patients: 2^4 patterns, no smaller p
    iv = intervals["c2st_auc"]
    assert 0 <= iv.lo <= soft["c2st_auc"] <= iv.hi <= 1


def test_permutation_p_is_uniform_under_the_null_and_small_for_a_shift():
    """Scores whose two classes share a distribution (a patient effect common to both): the p-values
    of 400 repeats are roughly uniform (each decile holds about a tenth, P(p <= 0.05) about 0.05);
    a shift of half a within-patient sd, every patient's slices, gives the smallest p."""
    rng = np.random.default_rng(11)
    cases = np.repeat([f"c{i}" for i in range(10)], 12)
    ps = []
    for _ in range(400):
        effect = np.repeat(rng.normal(0, 1, 10), 12)
        ps.append(rl.permutation_p(effect + rng.normal(0, 1, 120), effect + rng.normal(0, 1, 120), cases, cases)[0])
    ps = np.asarray(ps)
    assert 0.02 <= np.mean(ps <= 0.05) <= 0.09
    deciles = np.histogram(ps, bins=np.linspace(0, 1, 11))[0] / len(ps)
    assert deciles.min() >= 0.05 and deciles.max() <= 0.15
    effect = np.repeat(rng.normal(0, 1, 10), 12)
    p, p_min = rl.permutation_p(effect + rng.normal(0, 1, 120), effect + 1.0 + rng.normal(0, 1, 120), cases, cases)
    assert p_min == 2.0 ** -10 and p < 0.01
    two_same = rl.permutation_p([effect, effect], [effect + 1, effect + 1], cases, cases)   # identical classifiers
    assert two_same == rl.permutation_p(effect, effect + 1, cases, cases)
    many = np.repeat([f"c{i}" for i in range(20)], 3)                                  # above EXACT_PATIENTS: sampled
    p, p_min = rl.permutation_p(rng.normal(0, 1, 60), rng.normal(0, 1, 60), many, many, seed=1)
    assert p_min == 1 / (rl.N_PERMUTATIONS + 1) and 0.05 < p <= 1


def test_classifier_null_is_not_rejected_and_its_blurred_control_is(slices):
    """The whole test on slices: real against real of the same patients (another noise draw) is not
    called different over repeats (p-values spread, few below 0.05); the positive control, real
    against itself blurred by 0.5 px, is caught at p < 0.01 with 10 test patients."""
    ps = []
    for r in range(8):
        fit, score = twins(6, 20, seed=10 * r), twins(10, 12, seed=10 * r + 1)
        metrics, _, _ = rl.c2st(_set(*fit), _set(*score), CFG, seed=r)
        ps.append(metrics["c2st_p"])
    assert np.mean(np.asarray(ps) < 0.05) <= 0.25 and max(ps) > 0.3
    fit, score = patients(6, 20, seed=21), patients(10, 12, seed=22)
    cfg = SimpleNamespace(**vars(CFG), control_blur_px=0.5)
    metrics, intervals, nulls = rl.blur_control(_set(fit[0], fit[0], fit[1]), _set(score[0], score[0], score[1]),
                                                cfg, seed=0)
    assert metrics["c2st_p_blur"] < 0.01 and metrics["c2st_auc_blur"] > 0.9 and not nulls
    assert metrics["c2st_p_min"] == 2.0 ** -10 and "c2st_auc_blur" in intervals


def test_c2st_repeats_bit_for_bit_and_the_seed_matters(slices):
    (tr, cases), _ = slices
    fake = ndimage.gaussian_filter(tr, (0, 0.7, 0.7)).astype(np.float32)
    one = rl.classifier_scores(rl.fit_classifier(tr, fake, CFG, 3), tr[:8])
    two = rl.classifier_scores(rl.fit_classifier(tr, fake, CFG, 3), tr[:8])
    other = rl.classifier_scores(rl.fit_classifier(tr, fake, CFG, 4), tr[:8])
    assert np.array_equal(one, two) and not np.array_equal(one, other)


def test_c2st_repeats_average_the_classifiers_of_consecutive_seeds(slices):
    """c2st_repeats k: every AUC is the mean of the k single classifiers (seeds s .. s + k - 1), the
    interval that of the mean AUC; k = 1 is one classifier of seed s, as before."""
    (tr, tr_cases), (te, te_cases) = slices
    rng = np.random.default_rng(3)
    fake = lambda x: (x + rng.normal(0, 0.03, x.shape)).astype(np.float32)          # noqa: E731  (subtle)
    train, test = _set(tr, fake(tr), tr_cases), _set(te, fake(te), te_cases)
    single = [rl.c2st(train, test, CFG, seed=s)[0] for s in (7, 8, 9)]
    three = SimpleNamespace(**vars(CFG), c2st_repeats=3)
    mean, intervals, _ = rl.c2st(train, test, three, seed=7)
    assert mean["c2st_auc"] == pytest.approx(np.mean([m["c2st_auc"] for m in single]), abs=1e-12)
    assert len({round(m["c2st_auc"], 9) for m in single}) > 1                    # the classifiers do differ
    assert intervals["c2st_auc"].lo <= mean["c2st_auc"] <= intervals["c2st_auc"].hi
    assert rl.c2st(train, test, SimpleNamespace(**vars(CFG), c2st_repeats=1), seed=7)[0] == single[0]
    folds = [rl.c2st_crossfit(train, CFG, s) for s in (7, 8, 9)]
    assert rl.c2st_crossfit(train, three, 7) == pytest.approx(np.mean(folds), abs=1e-12)
    assert rl.classifier_seeds(three, 7) == [7, 8, 9] and rl.classifier_seeds(CFG, 7) == [7]


def test_c2st_crossfit_uses_validation_halves_only(slices):
    (tr, cases), _ = slices
    blurred = ndimage.gaussian_filter(tr, (0, 1.2, 1.2)).astype(np.float32)
    assert rl.c2st_crossfit(_set(tr, blurred, cases), CFG, 0) >= 0.95
    one = cases == "p0"
    assert rl.c2st_crossfit(_set(tr[one], blurred[one], cases[one]), CFG, 0) is None


def test_auc_interval_leaves_out_patients_and_stays_in_unit_range():
    neg = np.r_[np.zeros(10), np.ones(10)]
    pos = np.r_[np.ones(10) * 2, np.ones(10) * 0.5]
    cases = np.repeat(["a", "b"], 10)
    two = rl.auc_interval(neg, pos, cases, cases)                  # 2 patients: t with 1 df, clipped to [0, 1]
    assert (two.lo, two.hi) == (0.0, 1.0)
    rng = np.random.default_rng(0)
    neg4, pos4, cases4 = rng.normal(0, 1, 80), rng.normal(1, 1, 80), np.repeat(list("abcd"), 20)
    four = rl.auc_interval(neg4, pos4, cases4, cases4)
    assert 0 < four.lo <= rl.roc_auc(neg4, pos4) <= four.hi < 1 and four.hi - four.lo < 0.5
    assert rl.auc_interval(neg, pos, np.repeat(["a"], 20), np.repeat(["a"], 20)) is None   # 1 patient: none
    same = rl.auc_interval([neg4, neg4], [pos4, pos4], cases4, cases4)          # two identical classifiers: one
    assert (same.lo, same.hi) == pytest.approx((four.lo, four.hi))


# ------------------------------------------------------------------------------ the verdict

def _results(**values) -> Results:
    res = Results()
    for key, (value, lo, hi) in values.items():
        res.set(key, value)
        res.set_interval(key, Interval(lo, hi))
    res.set("n_test_cases", 4)
    return res


def test_verdict_passes_only_inside_the_margins_and_names_every_structure_outside():
    good = dict(c2st_auc=(0.52, 0.45, 0.58), texture_std_ratio=(1.05, 0.9, 1.2), flicker_ratio=(1.0, 0.9, 1.1),
                contrast_spread_ratio=(1.0, 0.85, 1.2), texture_nps_ratio_band1=(1.0, 0.85, 1.2),
                contrast_bias_hu_LV=(5.0, -10.0, 15.0), flicker_ratio_LV=(1.0, 0.9, 1.1),
                texture_std_ratio_Myo=(1.0, 0.9, 1.1))
    text = realism_reading(_results(**good))
    assert "as good as real</b> on every check" in text
    # an interval that reaches the reference but leaves the margin is not equivalence
    wide = {**good, "contrast_spread_ratio": (0.8, 0.3, 1.3)}
    assert "not as good as real" in realism_reading(_results(**wide))
    # the pooled flicker inside, two structures outside: both named, with their values
    bad = {**good, "flicker_ratio_LV": (1.31, 1.2, 1.45), "flicker_ratio_Ao": (1.24, 1.1, 1.4),
           "texture_std_ratio_Myo": (1.5, 1.3, 1.7)}
    text = realism_reading(_results(**bad))
    assert "not as good as real" in text and "LV 1.31" in text and "Ao 1.24" in text and "Myo 1.5" in text
    names = {name: ok for name, ok, _ in realism_checks(_results(**bad))}
    assert names["flicker_ratio"] is False and names["texture_std_ratio"] is False and names["classifier"] is True
    biased = {**good, "contrast_bias_hu_LV": (60.0, 20.0, 100.0)}
    assert "LV 60" in realism_reading(_results(**biased))
    res = _results(**{k: v for k, v in good.items() if k != "c2st_auc"})
    res.set("c2st_auc", 0.52)                                      # no interval: cannot claim it
    assert "not shown to be as good as real" in realism_reading(res)
    # a classifier that missed its positive control cannot call anything real
    missed = _results(**good)
    missed.set("c2st_p_blur", 0.2)
    assert dict((n, ok) for n, ok, _ in realism_checks(missed))["classifier"] is None
    assert "MISSED" in realism_reading(missed)
    # margins are params: a tighter ratio margin fails what the default passes
    tight = SimpleNamespace(margin_ratio=1.1, margin_bias_hu=20.0, margin_auc=0.6)
    assert "not as good as real" in realism_reading(_results(**good), tight)


