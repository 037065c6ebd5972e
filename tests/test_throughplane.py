"""Through-plane metrics (ctsynth.throughplane): known answers on a smooth synthetic volume."""
from __future__ import annotations

import numpy as np
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
    # axial FD sees the same set of slices; coronal and sagittal see the flicker
    assert m["fd_tri_rand_axial"] == pytest.approx(0.0, abs=1e-9)
    floor = tp.evaluate_volumes([vol(real, smooth_volume(seed=5)[0], masks)], LABELS, WINDOW)[0]
    for plane in ("coronal", "sagittal"):
        assert m[f"fd_tri_rand_{plane}"] > 10 * max(floor[f"fd_tri_rand_{plane}"], 1e-6), plane
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


def test_plane_images_isotropic_and_square(smooth):
    real, masks = smooth
    cor = tp.plane_images(real, masks, "coronal", dz=4.0, dxy=2.0)        # 24 slices * 2 = 48 rows
    assert cor.shape[1:] == (48, 48)
    assert cor.shape[0] == int(masks.any(axis=(0, 2)).sum())
    sag = tp.plane_images(real, masks, "sagittal", dz=1.0, dxy=2.0)       # 12 rows, padded to 32
    assert sag.shape[1:] == (32, 32) and sag.shape[0] == int(masks.any(axis=(0, 1)).sum())
    assert np.all(sag[:, :5] == -1.0)                                      # air padding above
    assert np.array_equal(tp.plane_images(real, masks, "axial", 4.0, 2.0), real)


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
