"""Through-plane consistency: the generated test slices reassembled into volumes.

The generator works slice by slice; every consumer of synthetic CT sees the volume. This module
stacks each test case's generated slices (``fake.npy``) and its real slices (the processed
store) back into volumes on the same grid — the processed grid, ``S x S`` in-plane, one slice per
stored ``z`` — and measures what a stack of independent 2-D predictions gets wrong along z:

* **adjacent-slice consistency** ``zcons_ssim_ratio``: mean SSIM (7 x 7 uniform window, images
  in [-1, 1], data range 2) between neighbouring axial slices (z, z + 1) of the generated volume,
  divided by the same for the real volume; 1.0 = as smooth along z as real, < 1 = flicker.
  Per structure (``zcons_ssim_ratio_<S>``): the SSIM map averaged over the pixels of structure S
  in either slice of the pair. Both volumes use the same pairs and pixels, so the ratio is a ratio
  of sums.
* **through-plane gradient** ``zgrad_ratio``: mean |I(z + 1) - I(z)| / dz in HU/mm inside the body
  (real HU > -500 in either slice of the pair), generated / real; > 1 = rougher than real.
* **tri-planar Fréchet distance** ``fd_tri_rand_<plane>`` (and ``fid_tri_inception_<plane>`` with
  Inception weights): the FD between real and generated 2-D slices taken separately along the
  axial, coronal and sagittal planes (MAISI's "2.5-D FID"), and their mean ``..._mean``.
  Coronal/sagittal slices are resampled along z to the in-plane pixel size (isotropic pixels,
  bilinear), shown superior up, and padded with air to a square; only those cutting a structure
  are used (the same ones for real and generated).

Feature space of ``fd_tri_rand``: :class:`RandomConvFeatures`, a fixed (seed 0, independent of
``params.seed``) random 3-layer CNN, mean + std pooled, averaged over the 8 rotations/flips of
the image. It has learnt nothing, so it has no preferred orientation, and the averaging makes it
exactly invariant to in-plane rotation and flips: axial, coronal and sagittal slices are
described by the same function on equal terms. The repo's segmenter is *not* used here: it was
trained on axial slices only, so its features on coronal/sagittal slices are out of distribution.

Only pairs of stored slices with consecutive ``z`` count as neighbours (gaps are skipped).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ctsynth.core.errors import MetricUnavailable
from ctsynth.data.preprocess import hu_to_unit
from ctsynth.evaluate.metrics import frechet_distance
from ctsynth.evaluate.results import Interval

PLANES = ("axial", "coronal", "sagittal")
BODY_HU = -500.0            # inside the body: real HU above this in either slice of a pair
SSIM_WINDOW = 7             # uniform window of the adjacent-slice SSIM map
FEATURE_SEED = 0            # fixed: the random feature space is the same in every run


@dataclass
class CaseVolume:
    """One test case on the processed grid: slices sorted by z."""
    case: str
    real: np.ndarray         # (Z, S, S) float32 in [-1, 1]
    fake: np.ndarray         # (Z, S, S) float32 in [-1, 1]
    masks: np.ndarray        # (Z, S, S) uint8 structure indices
    zs: np.ndarray           # (Z,) int64 slice index in the original volume
    dz: float                # mm between slices
    dxy: float               # mm per in-plane pixel of the processed grid


def grid_spacing(info: dict, size: int) -> tuple[float, float]:
    """(dz, in-plane pixel size) in mm of a store case's processed grid (``meta.json`` entry):
    voxel sizes from the canonical affine's columns; in-plane = mean field of view / ``size``."""
    aff = np.asarray(info["affine"], dtype=np.float64)[:3, :3]
    vox = np.linalg.norm(aff, axis=0)                                   # (3,) mm
    shape = np.asarray(info["shape"], dtype=np.float64)
    return float(vox[2]), float(np.mean(vox[:2] * shape[:2]) / size)


def case_volumes(store, fake, index: np.ndarray) -> list[CaseVolume]:
    """Reassemble the generated slices (``fake`` (N, S, S) aligned with store rows ``index``)
    and their real slices into one :class:`CaseVolume` per test case (order of first appearance)."""
    case_of = store.slices["case"].to_numpy()[index]
    z_of = store.slices["z"].to_numpy()[index]
    out = []
    for case in dict.fromkeys(case_of):
        pos = np.flatnonzero(case_of == case)
        pos = pos[np.argsort(z_of[pos], kind="stable")]
        rows = index[pos]
        dz, dxy = grid_spacing(store.meta["cases"][case], store.image_size)
        out.append(CaseVolume(case, np.asarray(store.images[rows], np.float32),
                              np.asarray(fake[pos], np.float32), np.asarray(store.masks[rows]),
                              z_of[pos].astype(np.int64), dz, dxy))
    return out


# ------------------------------------------------------------------------------ z consistency

def ssim_map(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW, data_range: float = 2.0) -> np.ndarray:
    """Per-pixel SSIM (B, H, W) of image pairs (B, H, W), uniform window, reflect-padded, float64."""
    x = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)[:, None]    # (B, 1, H, W)
    y = torch.as_tensor(np.ascontiguousarray(b), dtype=torch.float64)[:, None]
    pad = window // 2

    def mean(t):
        return F.avg_pool2d(F.pad(t, (pad,) * 4, mode="reflect"), window, stride=1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s[:, 0].numpy()


def adjacent_pairs(zs: np.ndarray) -> np.ndarray:
    """Positions i whose next stored slice is the next z (z[i + 1] == z[i] + 1)."""
    zs = np.asarray(zs)
    return np.flatnonzero(np.diff(zs) == 1)


def case_sums(vol: CaseVolume, labels: dict[int, str], window) -> dict[str, float]:
    """Sums over one case's adjacent pairs: SSIM-map sums of real and generated (all pixels and
    per structure), pixel counts, and |dI/dz| sums (HU/mm) inside the body."""
    i = adjacent_pairs(vol.zs)
    out: dict[str, float] = {"n_pairs": float(len(i))}
    if not len(i):
        return out
    lo, hi = (float(v) for v in window)
    body = (vol.real[i] > hu_to_unit(BODY_HU, window)) | (vol.real[i + 1] > hu_to_unit(BODY_HU, window))
    out["n_pix"], out["n_body"] = float(body.size), float(body.sum())
    maps = {}
    for kind, v in (("real", vol.real), ("fake", vol.fake)):
        maps[kind] = ssim_map(v[i], v[i + 1])                                      # (P, S, S)
        out[f"ssim_{kind}"] = float(maps[kind].sum())
        grad = np.abs(v[i + 1].astype(np.float64) - v[i]) * 0.5 * (hi - lo) / vol.dz   # HU/mm
        out[f"grad_{kind}"] = float(grad[body].sum())
    for idx, name in labels.items():
        region = (vol.masks[i] == idx) | (vol.masks[i + 1] == idx)
        out[f"n_{name}"] = float(region.sum())
        for kind in ("real", "fake"):
            out[f"ssim_{kind}_{name}"] = float(maps[kind][region].sum())
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def consistency_metrics(sums: pd.DataFrame, labels: dict[int, str]) -> dict[str, float]:
    """metrics.json keys from :func:`case_sums` rows (one per case; any weights already applied)."""
    tot = sums.sum(numeric_only=True)
    g = lambda k: float(tot.get(k, 0.0))                                             # noqa: E731
    out = {"zcons_ssim_real": _ratio(g("ssim_real"), g("n_pix")),
           "zcons_ssim_generated": _ratio(g("ssim_fake"), g("n_pix")),
           "zcons_ssim_ratio": _ratio(g("ssim_fake"), g("ssim_real")),
           "zgrad_real": _ratio(g("grad_real"), g("n_body")),
           "zgrad_generated": _ratio(g("grad_fake"), g("n_body")),
           "zgrad_ratio": _ratio(g("grad_fake"), g("grad_real"))}
    for name in labels.values():
        out[f"zcons_ssim_ratio_{name}"] = (_ratio(g(f"ssim_fake_{name}"), g(f"ssim_real_{name}"))
                                           if g(f"n_{name}") > 0 else float("nan"))
    return out


NO_RATIO = ("undefined: no pair of consecutive slices or no pixel of the structure in the test volumes, "
            "or the real volumes' neighbouring slices are not similar at all there (real sum <= 0)")
RATIO_KEYS = ("zcons_ssim_ratio", "zgrad_ratio")


def ratio_intervals(sums: pd.DataFrame, labels: dict[int, str], n_boot: int, seed: int) -> dict:
    """``{key: Interval}`` of the consistency metrics: patient-level bootstrap (draw the
    test cases with replacement; each resample's metric is the ratio of its pooled sums)."""
    if n_boot < 1 or sums.empty:
        return {}
    rng = np.random.default_rng(seed)
    values = sums.drop(columns=["case"]).to_numpy(np.float64)                         # (C, K)
    picks = rng.integers(0, len(values), size=(n_boot, len(values)))
    boot = [consistency_metrics(pd.DataFrame(values[p], columns=sums.columns[1:]), labels) for p in picks]
    point = consistency_metrics(sums, labels)
    out = {}
    for key in (k for k, v in point.items() if np.isfinite(v)):      # none for an undefined estimate
        vals = np.array([b[key] for b in boot], np.float64)
        vals = vals[np.isfinite(vals)]
        if len(vals):
            out[key] = Interval(float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))
    return out


# ------------------------------------------------------------------------------ tri-planar FD

def plane_images(vol: np.ndarray, masks: np.ndarray, plane: str, dz: float, dxy: float) -> np.ndarray:
    """2-D slices of a (Z, S, S) volume along ``plane`` -> (K, L, L) in [-1, 1].

    axial: every stored slice. coronal (fixed display row = anterior-posterior position) and
    sagittal (fixed column = left-right position): the slices that cut a structure, z resampled
    to the in-plane pixel size (bilinear), superior up, padded with air (-1) to a square."""
    if plane == "axial":
        return np.asarray(vol, np.float32)
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r}: expected one of {PLANES}")
    axis = 1 if plane == "coronal" else 2
    keep = np.flatnonzero(np.moveaxis(masks, axis, 0).reshape(masks.shape[axis], -1).any(1))
    cuts = np.moveaxis(np.asarray(vol, np.float32), axis, 0)[keep]                # (K, Z, S)
    if not len(cuts):
        return np.zeros((0, vol.shape[1], vol.shape[1]), np.float32)
    z_len = max(1, int(round(cuts.shape[1] * dz / dxy)))
    t = F.interpolate(torch.from_numpy(cuts)[:, None], size=(z_len, cuts.shape[2]), mode="bilinear",
                      align_corners=False)[:, 0].flip(1)                           # (K, Z', S), superior up
    side = max(t.shape[1], t.shape[2])
    top, left = (side - t.shape[1]) // 2, (side - t.shape[2]) // 2
    t = F.pad(t, (left, side - t.shape[2] - left, top, side - t.shape[1] - top), value=-1.0)
    return t.numpy()


class RandomConvFeatures:
    """Orientation-agnostic features: a fixed random CNN (seeded, never trained), 3 reflect-padded
    3 x 3 conv layers (16, 32, 32 channels, stride 2, ReLU), mean + std pooled over space (64-d),
    averaged over the 8 rotations and flips of the input. Images (B, H, W) in [-1, 1], any size."""

    def __init__(self, seed: int = FEATURE_SEED, widths=(16, 32, 32)):
        g = torch.Generator().manual_seed(seed)
        self.weights = []
        c_in = 1
        for c_out in widths:
            w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * (2.0 / (9 * c_in)) ** 0.5
            self.weights.append(w)
            c_in = c_out
        self.dim = 2 * c_in

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.weights:
            x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, stride=2))
        flat = x.flatten(2)                                                      # (B, C, H'W')
        return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], 1)           # (B, 2C)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float64)[:, None]      # (B, 1, H, W)
        acc = torch.zeros(x.shape[0], self.dim, dtype=torch.float64)
        for flip in (False, True):
            y = x.flip(-1) if flip else x
            for k in range(4):
                acc += self._one(torch.rot90(y, k, (-2, -1)))
        return acc / 8


def triplanar_fd(volumes: list[CaseVolume], extractor, prefix: str, batch: int = 64) -> tuple[dict, dict]:
    """``{<prefix>_<plane>, <prefix>_mean}`` FD between real and generated slices per plane, and
    the reasons for the ones that could not be computed. ``extractor.features``: (B, H, W) -> (B, D)."""
    metrics, nulls = {}, {}
    for plane in PLANES:
        feats = {"real": [], "fake": []}
        for vol in volumes:
            for kind in feats:
                imgs = plane_images(getattr(vol, kind), vol.masks, plane, vol.dz, vol.dxy)
                for s in range(0, len(imgs), batch):
                    feats[kind].append(torch.as_tensor(extractor.features(imgs[s:s + batch])).double())
        key = f"{prefix}_{plane}"
        try:
            if not feats["real"]:
                raise MetricUnavailable(f"{key}: no {plane} slices cut a structure")
            metrics[key] = frechet_distance(torch.cat(feats["real"]), torch.cat(feats["fake"]))
        except MetricUnavailable as e:
            metrics[key], nulls[key] = None, str(e)
    values = [metrics[f"{prefix}_{p}"] for p in PLANES]
    metrics[f"{prefix}_mean"] = None if any(v is None for v in values) else float(np.mean(values))
    if metrics[f"{prefix}_mean"] is None:
        nulls[f"{prefix}_mean"] = "a plane's distance is missing"
    return metrics, nulls


def evaluate_volumes(volumes: list[CaseVolume], labels: dict[int, str], window, inception=None,
                     inception_reason: str = "") -> tuple[dict, dict, pd.DataFrame]:
    """All through-plane metrics of the reassembled test volumes: (metrics, reasons for nulls,
    per-case sums (one row per case: ``case`` + :func:`case_sums`))."""
    sums = pd.DataFrame([{"case": v.case, **case_sums(v, labels, window)} for v in volumes]).fillna(0.0)
    metrics = consistency_metrics(sums, labels)
    nulls = {k: NO_RATIO for k, v in metrics.items() if not np.isfinite(v)}
    fd, fd_nulls = triplanar_fd(volumes, RandomConvFeatures(), "fd_tri_rand")
    metrics.update(fd)
    nulls.update(fd_nulls)
    if inception is not None:
        fd, fd_nulls = triplanar_fd(volumes, inception, "fid_tri_inception", batch=16)
    else:
        fd = {f"fid_tri_inception_{p}": None for p in (*PLANES, "mean")}
        fd_nulls = {k: inception_reason or "no Inception weights" for k in fd}
    metrics.update(fd)
    nulls.update(fd_nulls)
    return metrics, nulls, sums


def per_case_table(sums: pd.DataFrame) -> pd.DataFrame:
    """One row per case: zcons_ssim_ratio and zgrad_ratio of that case alone."""
    rows = [{"case": r["case"], **{k: consistency_metrics(pd.DataFrame([r]), {})[k] for k in RATIO_KEYS}}
            for _, r in sums.iterrows()]
    return pd.DataFrame(rows, columns=["case", *RATIO_KEYS])


def load_test_volumes(processed_dir, generated_dir) -> list[CaseVolume]:
    """:func:`case_volumes` of ``generated_dir``'s fake.npy/index.npy against the processed store."""
    from pathlib import Path

    from ctsynth.data.store import ProcessedStore

    gen = Path(generated_dir)
    store = ProcessedStore(processed_dir)
    return case_volumes(store, np.load(gen / "fake.npy", mmap_mode="r"), np.load(gen / "index.npy"))


def heart_centre(masks: np.ndarray) -> tuple[int, int, int]:
    """(z, row, col) position of the centre of the structures in a (Z, S, S) mask volume (the
    volume's centre when it holds none)."""
    where = np.argwhere(masks > 0)
    if not len(where):
        return tuple(int(n // 2) for n in masks.shape)
    return tuple(int(round(v)) for v in where.mean(0))
