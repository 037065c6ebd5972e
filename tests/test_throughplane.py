"""Through-plane metrics (ctsynth.evaluate.throughplane): known answers on a smooth synthetic volume."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import make_store
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate import throughplane as tp

WINDOW = (-1000.0, 1000.0)
LABELS = {1: "Myo", 3: "LV"}


def smooth_volume(z: int = 24, s: int = 32, seed: int = 0):
    """A body (ellipse, -0.2) holding two blobs (LV bright, Myo ring) whose radii vary smoothly
    with z, plus mild noise: (real (Z, S, S) in [-1, 1], masks (Z, S, S))."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s] / s
    real = np.full((z, s, s), -1.0, np.float32)
    masks = np.zeros((z, s, s), np.uint8)
    for k in range(z):
        t = k / z
        body = ((yy - 0.5) / 0.45) ** 2 + ((xx - 0.5) / 0.4) ** 2 < 1
        r = 0.08 + 0.1 * np.sin(np.pi * t)
        d = np.hypot(yy - 0.5 - 0.1 * t, xx - 0.45)
        real[k][body] = -0.2
        masks[k][d < r + 0.05] = 1
        masks[k][d < r] = 3
        real[k][masks[k] == 1] = 0.05
        real[k][masks[k] == 3] = 0.3 + 0.2 * t
    real += 0.01 * rng.standard_normal(real.shape).astype(np.float32)
    return np.clip(real, -1, 1), masks


def vol(real, fake, masks, zs=None, dz=4.0, dxy=5.2):
    zs = np.arange(len(real)) if zs is None else np.asarray(zs)
    return tp.CaseVolume("c", real, fake, masks, zs, dz, dxy)


@pytest.fixture(scope="module")
def smooth():
    return smooth_volume()


def shuffled(x, seed=1):
    return x[np.random.default_rng(seed).permutation(len(x))]


def test_ssim_map_identical_is_one_and_differs_otherwise(smooth):
    real, _ = smooth
    assert np.allclose(tp.ssim_map(real[:3], real[:3]), 1.0)
    assert tp.ssim_map(real[:3], real[::-1][:3]).mean() < 0.95


def test_identical_volumes_score_one_and_zero(smooth):
    real, masks = smooth
    m, nulls, sums = tp.evaluate_volumes([vol(real, real.copy(), masks)], LABELS, WINDOW)
    for key in ("zcons_ssim_ratio", "zgrad_ratio", "zcons_ssim_ratio_Myo", "zcons_ssim_ratio_LV"):
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    for plane in (*tp.PLANES, "mean"):
        assert m[f"fd_tri_rand_{plane}"] == pytest.approx(0.0, abs=1e-9), plane
    assert m["fid_tri_inception_mean"] is None and "fid_tri_inception_mean" in nulls
    assert len(sums) == 1 and sums.n_pairs.iloc[0] == len(real) - 1


def test_slices_shuffled_along_z_score_clearly_worse(smooth):
    real, masks = smooth
    order = np.random.default_rng(1).permutation(len(real))
    # the same axial slices (and their masks) in a shuffled order: every axial image is real
    m, _, _ = tp.evaluate_volumes([vol(real, real[order], masks)], LABELS, WINDOW)
    assert m["zcons_ssim_ratio"] < 0.9
    assert m["zcons_ssim_ratio_LV"] < 0.9
    assert m["zgrad_ratio"] > 1.5
    # every axial image is a real slice (a different pick of them); coronal and sagittal see the flicker
    floor = tp.evaluate_volumes([vol(real, smooth_volume(seed=5)[0], masks)], LABELS, WINDOW)[0]
    for plane in ("coronal", "sagittal"):
        assert m[f"fd_tri_rand_{plane}"] > 10 * max(floor[f"fd_tri_rand_{plane}"], 1e-6), plane
        assert m[f"fd_tri_rand_{plane}"] > 2 * m["fd_tri_rand_axial"], plane
    assert m["fd_tri_rand_mean"] == pytest.approx(np.mean([m[f"fd_tri_rand_{p}"] for p in tp.PLANES]))


def test_blurred_along_z_is_smoother_than_real(smooth):
    real, masks = smooth
    flat = np.repeat(real.mean(0, keepdims=True), len(real), 0)     # no change along z at all
    m, _, _ = tp.evaluate_volumes([vol(real, flat, masks)], LABELS, WINDOW)
    assert m["zcons_ssim_ratio"] > 1.0 and m["zgrad_ratio"] < 0.2


def test_gaps_in_z_are_not_neighbours(smooth):
    real, masks = smooth
    zs = np.r_[0:10, 20:34]                         # one gap: 23 pairs -> 22 adjacent
    assert len(tp.adjacent_pairs(zs)) == 22
    sums = tp.case_sums(vol(real, real, masks, zs=zs), LABELS, WINDOW)
    assert sums["n_pairs"] == 22


def test_gradient_is_in_hu_per_mm():
    real = np.zeros((2, 8, 8), np.float32)
    real[1] = 0.1                                   # +100 HU over 4 mm -> 25 HU/mm everywhere
    m, _, _ = tp.evaluate_volumes([vol(real, real, np.zeros_like(real, np.uint8))], {}, WINDOW)
    assert m["zgrad_real"] == pytest.approx(25.0, rel=1e-5)


def test_random_features_are_orientation_agnostic_and_fixed(smooth):
    real, _ = smooth
    f = tp.RandomConvFeatures()
    a = f.features(real[:4])
    assert a.shape == (4, f.dim)
    assert np.allclose(f.features(np.rot90(real[:4], 1, (1, 2)).copy()), a, atol=1e-10)
    assert np.allclose(f.features(real[:4, :, ::-1].copy()), a, atol=1e-10)
    assert np.array_equal(tp.RandomConvFeatures().features(real[:4]).numpy(), a.numpy())
    assert not np.allclose(f.features(real[4:8]), a)


def small_body(z: int = 12, s: int = 48, seed: int = 0):
    """A textured body (ellipse, 17 % of the slice) in air with faint noise, texture drifting slowly
    along z: (real (Z, S, S), body (S, S))."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s] / s
    body = ((yy - 0.5) / 0.22) ** 2 + ((xx - 0.5) / 0.25) ** 2 < 1
    real = np.clip(-1 + 0.01 * np.abs(rng.standard_normal((z, s, s))), -1, 1).astype(np.float32)
    for k in range(z):
        real[k][body] = (0.1 + 0.2 * np.sin(12 * xx + 9 * yy + 0.1 * k))[body] + 0.01 * rng.standard_normal(body.sum())
    return real, body


def test_in_body_consistency_sees_flicker_that_air_dilutes():
    real, body = small_body()
    fake = real.copy()
    fake[:, body] += 0.1 * np.random.default_rng(1).standard_normal((len(real), body.sum())).astype(np.float32)
    m, _, sums = tp.evaluate_volumes([vol(real, fake, np.zeros(real.shape, np.uint8))], {}, WINDOW)
    all_pixels = tp.ssim_map(fake[:-1], fake[1:]).sum() / tp.ssim_map(real[:-1], real[1:]).sum()
    assert all_pixels > 0.93                        # over every pixel: the identical air hides the flicker
    assert m["zcons_ssim_ratio"] < 0.8              # in the body it is plain
    assert sums.n_pix.iloc[0] == (len(real) - 1) * body.sum()      # body pixels of the pairs only


def test_body_mask_fills_lungs_and_drops_the_table():
    img = np.full((1, 20, 20), -1.0, np.float32)
    img[0, 2:14, 3:17] = 0.0                        # body (soft tissue) ...
    img[0, 5:11, 6:14] = -0.8                       # ... around a lung (below -500 HU)
    img[0, 17:19, 2:18] = 0.2                       # the table: a separate component
    body = tp.body_mask(img, WINDOW)
    assert body[0, 2:14, 3:17].all() and body.sum() == 12 * 14
    assert tp.body_mask(np.full((2, 8, 8), -1.0), WINDOW).sum() == 0
    assert tp.body_box(body) == (slice(0, 1), slice(2, 14), slice(3, 17))


def test_tri_planar_planes_get_equal_counts_seeded_and_evenly_spaced(smooth):
    real, masks = smooth                            # 24 axial slices; coronal, sagittal cut by fewer rows/cols
    counts = {p: len(tp.plane_images(real, masks, p, tp.body_box(tp.body_mask(real, WINDOW)), 32)) for p in tp.PLANES}
    assert len(set(counts.values())) > 1            # the planes differ ...
    vols = [vol(real, real, masks), vol(real[:12], real[:12], masks[:12])]
    sets = tp.plane_sets(vols, [tp.body_mask(v.real, WINDOW) for v in vols])
    n = {p: len(sets[p]["real"]) for p in tp.PLANES}
    assert len(set(n.values())) == 1 and n["axial"] >= min(counts.values())       # ... the sets do not
    again = tp.plane_sets(vols, [tp.body_mask(v.real, WINDOW) for v in vols])
    assert all(np.array_equal(sets[p]["real"], again[p]["real"]) for p in tp.PLANES)
    picks = tp.even_picks(24, 8, np.random.default_rng(0))
    assert len(set(picks)) == 8 and set(np.diff(picks)) <= {2, 3, 4} and picks.max() < 24


def test_plane_images_are_cropped_to_the_body_not_padded_with_air():
    real = np.full((6, 48, 48), -1.0, np.float32)   # a box-shaped body in air: every cut of it is all body
    real[:, 10:30, 8:40] = 0.1 + 0.05 * np.random.default_rng(0).standard_normal((6, 20, 32))
    masks = np.zeros(real.shape, np.uint8)
    masks[:, 15:25, 12:36] = 1
    box = tp.body_box(tp.body_mask(real, WINDOW))
    assert box == (slice(0, 6), slice(10, 30), slice(8, 40))
    for plane, n in (("axial", 6), ("coronal", 10), ("sagittal", 24)):        # the cuts through the structure
        imgs = tp.plane_images(real, masks, plane, box, 48)
        assert imgs.shape == (n, 48, 48), plane
        assert (imgs > -0.5).all(), plane                                      # no air: cropped, not padded
    whole = tuple(slice(0, n) for n in real.shape)
    assert np.allclose(tp.plane_images(real, masks, "axial", whole, 48), real, atol=1e-6)   # own size: unchanged
    assert (tp.plane_images(real, masks, "coronal", whole, 48) < -0.9).mean() > 0.3        # uncropped: air beside


def test_ratio_intervals_bracket_the_estimate(smooth):
    real, masks = smooth
    vols = [tp.CaseVolume(f"c{i}", r, np.clip(r + 0.05 * i * np.random.default_rng(i).standard_normal(r.shape), -1, 1)
                          .astype(np.float32), m, np.arange(len(r)), 4.0, 5.2)
            for i, (r, m) in enumerate(smooth_volume(seed=s) for s in range(4))]
    m, _, sums = tp.evaluate_volumes(vols, LABELS, WINDOW)
    ci = tp.ratio_intervals(sums, LABELS, 200, seed=0)
    for key in ("zcons_ssim_ratio", "zgrad_ratio"):
        lo, hi = ci[key].lo, ci[key].hi
        assert lo <= m[key] <= hi and lo < hi
    per_case = tp.per_case_table(sums)
    assert list(per_case.case) == ["c0", "c1", "c2", "c3"]
    assert per_case.zcons_ssim_ratio.iloc[0] == pytest.approx(1.0)
    assert per_case.zcons_ssim_ratio.iloc[3] < per_case.zcons_ssim_ratio.iloc[1]


def test_case_volumes_reassemble_sorted_by_z(tmp_path):
    store = ProcessedStore(make_store(tmp_path / "p", cases=("a", "b"), slices_per_case=5))
    index = store.rows_for_cases(["b", "a"])[::-1].copy()               # any order in fake.npy
    fake = np.asarray(store.images[index], np.float32) * 0.5
    vols = tp.case_volumes(store, fake, index)
    assert [v.case for v in vols] == ["b", "a"]
    for v in vols:
        assert list(v.zs) == list(range(5))
        assert np.array_equal(v.fake, v.real.astype(np.float32) * 0.5)
        assert (v.dz, v.dxy) == (3.0, 2.0)


def _flicker(real, fake, masks):
    sums = tp.case_sums(vol(real, fake, masks), LABELS, WINDOW)
    return tp.consistency_metrics(pd.DataFrame([sums]), LABELS)


def test_flicker_known_answers_noise_is_blurred_away_content_jumps_are_not(smooth):
    real, masks = smooth
    same = _flicker(real, real.copy(), masks)
    assert same["flicker_ratio"] == same["flicker_ratio_LV"] == 1.0
    assert _flicker(real, shuffled(real), masks)["flicker_ratio"] > 3
    rng = np.random.default_rng(7)
    noisy = _flicker(real, np.clip(real + 0.01 * rng.standard_normal(real.shape), -1, 1).astype(np.float32), masks)
    assert abs(noisy["flicker_ratio"] - 1) < 0.1 and noisy["zgrad_ratio"] > 1.15    # independent noise: ~1
    jitter = real + (0.05 * rng.standard_normal((len(real), 1, 1))).astype(np.float32) * (masks > 0)
    jumpy = _flicker(real, jitter, masks)                                              # content jumps slice to slice
    assert jumpy["flicker_ratio"] > 1.4 and jumpy["flicker_ratio"] > jumpy["zgrad_ratio"]
    assert jumpy["flicker_ratio_LV"] > 2
