"""Through-plane consistency: the generated test slices reassembled into volumes.

The generator works slice by slice; every consumer of synthetic CT sees the volume. This module
stacks each test case's generated slices (``fake.npy``) and its real slices (the processed
store) back into volumes on the same grid — the processed grid, ``S x S`` in-plane, one slice per
stored ``z`` — and measures what a stack of independent 2-D predictions gets wrong along z.

**Body** (:func:`body_mask`, one rule for the whole evaluation, taken from the *real* volume and
used for real and generated alike): per axial slice, the pixels above -500 HU, their largest
8-connected component (drops the table, arms and stray noise), holes filled (lungs and airways
enclosed by the chest wall are body). Air outside the body is nearly the same in every slice,
real or generated, so every measure below is taken inside the body or on the body's bounding box:

* **adjacent-slice consistency** ``zcons_ssim_ratio``: SSIM map (7 x 7 uniform window, images
  in [-1, 1], data range 2) between neighbouring axial slices (z, z + 1), averaged over the body
  pixels of either slice of the pair; generated / real; 1.0 = as smooth along z as real, < 1 =
  flicker. Over every pixel (as before) the air — identical in real and generated, SSIM ~ 1 — and
  the real slices' independent noise diluted the ratio towards 1: a texture flicker inside the
  body that the in-body ratio shows at 0.73 showed at 0.95 over a slice that is 83 % air (tests).
  Per structure (``zcons_ssim_ratio_<S>``): the SSIM map averaged over the pixels of structure S
  in either slice of the pair. Both volumes use the same pairs and pixels, so the ratio is a ratio
  of sums.
* **through-plane gradient** ``zgrad_ratio``: mean |I(z + 1) - I(z)| / dz in HU/mm over the same
  body pixels, generated / real; > 1 = rougher than real.
* **flicker** ``flicker_ratio``: the same |I(z + 1) - I(z)| after an in-plane Gaussian blur
  (σ = :data:`FLICKER_SIGMA` px) of every slice, generated / real, over the body pixels and per
  structure (``flicker_ratio_<S>``). The blur takes out the real slices' independent per-slice
  noise, which otherwise dominates |dI/dz| and hides a generated volume whose smooth content
  jumps from slice to slice (a stack of 2-D predictions: horizontal streaks in coronal and
  sagittal views). Known answers (tests): identical volumes 1; z-shuffled >> 1; independent
  per-slice noise on the same smooth volume ~ 1 (where the unblurred ``zgrad_ratio`` is far above).
* **tri-planar Fréchet distance** ``fd_tri_rand_<plane>`` (and ``fid_tri_inception_<plane>`` with
  Inception weights): the FD between real and generated 2-D slices taken separately along the
  axial, coronal and sagittal planes (MAISI's "2.5-D FID"), and their mean ``..._mean``. Like
  with like (:func:`plane_sets`): in every plane only the slices that cut a structure (the same
  ones for real and generated), each cropped to the body's 3-D bounding box of the real volume
  (the same crop for real and generated: no air padding, which is identical in both and diluted
  the distance) and resized (bilinear, antialiased) to the store's ``S x S`` — the aspect ratio
  is not kept, so each plane has its own fixed stretch, the same for real and generated.
  Coronal/sagittal images are shown superior up. Each case gives every plane the same number of
  slices, N = the count of its smallest plane, picked evenly spaced with a seeded random start
  (:data:`SAMPLE_SEED`, fixed like the feature seed: the same slices in every run): the FD's
  bias depends on the number of samples, and with unequal counts the planes were not comparable.

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
from scipy import ndimage

from ctsynth.core.errors import MetricUnavailable
from ctsynth.data.preprocess import hu_to_unit
from ctsynth.evaluate.bootstrap import case_table_intervals
from ctsynth.evaluate.metrics import frechet_distance
from ctsynth.evaluate.results import Interval

PLANES = ("axial", "coronal", "sagittal")
BODY_HU = -500.0            # body: HU above this (largest component, holes filled; :func:`body_mask`)
SSIM_WINDOW = 7             # uniform window of the adjacent-slice SSIM map
FEATURE_SEED = 0            # fixed: the random feature space is the same in every run
SAMPLE_SEED = 0             # fixed: the tri-planar FD uses the same slices in every run
FLICKER_SIGMA = 1.5         # px: in-plane Gaussian blur before the flicker measure (per-slice noise out)


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


def body_mask(images: np.ndarray, window, hu: float = BODY_HU) -> np.ndarray:
    """Body of each 2-D slice of ``images`` (..., H, W) in [-1, 1] on the HU ``window``: bool, same shape.

    The pixels above ``hu`` (-500 HU: soft tissue, bone, contrast; not air or lung), the slice's
    largest 8-connected component of them, holes filled. A slice with none is all False. (A
    window whose low end is above ``hu`` clips the threshold to its low end: every pixel above it.)"""
    above = np.asarray(images) > float(hu_to_unit(hu, window))
    flat = above.reshape(-1, *above.shape[-2:])
    out = np.zeros_like(flat)
    for i, m in enumerate(flat):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        if n:
            out[i] = ndimage.binary_fill_holes(lab == 1 + int(np.bincount(lab.ravel())[1:].argmax()))
    return out.reshape(above.shape)


def body_box(body: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box (z, row, column slices) of a (Z, H, W) body mask; the whole grid when empty."""
    if not body.any():
        return tuple(slice(0, n) for n in body.shape)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def case_sums(vol: CaseVolume, labels: dict[int, str], window, body: np.ndarray | None = None,
              body_hu: float = BODY_HU) -> dict[str, float]:
    """Sums over one case's adjacent pairs: in-body SSIM-map sums of real and generated (and per
    structure), pixel counts, and |dI/dz| sums (HU/mm) in the body. ``body``: :func:`body_mask` of
    ``vol.real`` (computed when not given). ``n_pix`` and ``n_body`` both count the body pixels of
    the pairs (either slice of a pair: the union)."""
    i = adjacent_pairs(vol.zs)
    out: dict[str, float] = {"n_pairs": float(len(i))}
    if not len(i):
        return out
    lo, hi = (float(v) for v in window)
    body = body_mask(vol.real, window, body_hu) if body is None else body
    pair_body = body[i] | body[i + 1]                                              # (P, S, S)
    out["n_pix"] = out["n_body"] = float(pair_body.sum())
    maps, flicker = {}, {}
    for kind, v in (("real", vol.real), ("fake", vol.fake)):
        maps[kind] = ssim_map(v[i], v[i + 1])                                      # (P, S, S)
        out[f"ssim_{kind}"] = float(maps[kind][pair_body].sum())
        grad = np.abs(v[i + 1].astype(np.float64) - v[i]) * 0.5 * (hi - lo) / vol.dz   # HU/mm
        out[f"grad_{kind}"] = float(grad[pair_body].sum())
        smooth = ndimage.gaussian_filter(v.astype(np.float64), (0, FLICKER_SIGMA, FLICKER_SIGMA), mode="reflect")
        flicker[kind] = np.abs(smooth[i + 1] - smooth[i]) * 0.5 * (hi - lo) / vol.dz   # HU/mm, blurred in-plane
        out[f"flicker_{kind}"] = float(flicker[kind][pair_body].sum())
    for idx, name in labels.items():
        region = (vol.masks[i] == idx) | (vol.masks[i + 1] == idx)
        out[f"n_{name}"] = float(region.sum())
        for kind in ("real", "fake"):
            out[f"ssim_{kind}_{name}"] = float(maps[kind][region].sum())
            out[f"flicker_{kind}_{name}"] = float(flicker[kind][region].sum())
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
           "zgrad_ratio": _ratio(g("grad_fake"), g("grad_real")),
           "flicker_ratio": _ratio(g("flicker_fake"), g("flicker_real"))}
    for name in labels.values():
        present = g(f"n_{name}") > 0
        out[f"zcons_ssim_ratio_{name}"] = (_ratio(g(f"ssim_fake_{name}"), g(f"ssim_real_{name}"))
                                           if present else float("nan"))
        out[f"flicker_ratio_{name}"] = (_ratio(g(f"flicker_fake_{name}"), g(f"flicker_real_{name}"))
                                        if present else float("nan"))
    return out


NO_RATIO = ("undefined: no pair of consecutive slices, no body pixel or no pixel of the structure in the test "
            "volumes, or the real volumes' neighbouring slices are not similar at all there (real sum <= 0)")
RATIO_KEYS = ("zcons_ssim_ratio", "zgrad_ratio", "flicker_ratio")


def ratio_intervals(sums: pd.DataFrame, labels: dict[int, str], n_boot: int, seed: int,
                    method: str = "jackknife") -> dict:
    """``{key: Interval}`` of the consistency metrics over the test cases (each replicate's metric
    is the ratio of its pooled per-case sums; :func:`ctsynth.evaluate.bootstrap.case_table_intervals`)."""
    if sums.empty:
        return {}
    table = sums.drop(columns=["case"]).astype(np.float64)
    found = case_table_intervals(table, lambda t: consistency_metrics(t, labels), n_boot, seed, method)
    return {k: Interval(lo, hi) for k, (lo, hi) in found.items()}


# ------------------------------------------------------------------------------ tri-planar FD

def plane_images(vol: np.ndarray, masks: np.ndarray, plane: str, box: tuple, size: int) -> np.ndarray:
    """2-D slices of a (Z, S, S) volume along ``plane`` inside ``box`` (z, row, column slices;
    :func:`body_box`) that cut a structure of ``masks`` -> (K, size, size) in [-1, 1].

    axial: the stored slices, cropped to the box's rows x columns; coronal (fixed display row =
    anterior-posterior position): the box's z range x columns; sagittal (fixed column = left-right
    position): z range x rows; coronal/sagittal superior up. Resized bilinearly (antialiased) to
    ``size`` x ``size``: no padding, the aspect ratio is not kept."""
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r}: expected one of {PLANES}")
    v = np.asarray(vol, np.float32)[box]
    m = np.asarray(masks)[box]
    axis = PLANES.index(plane)                                         # 0 axial, 1 coronal, 2 sagittal
    keep = np.flatnonzero(np.moveaxis(m, axis, 0).reshape(m.shape[axis], -1).any(1))
    cuts = np.moveaxis(v, axis, 0)[keep]                                            # (K, ., .)
    if axis:
        cuts = cuts[:, ::-1]                                                        # superior up
    if not len(cuts):
        return np.zeros((0, size, size), np.float32)
    t = torch.from_numpy(np.ascontiguousarray(cuts))[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0].numpy()


def even_picks(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``k`` positions (n <= k), evenly spaced with a random start: floor((i + u) k / n)."""
    return np.floor((np.arange(n) + rng.random()) * k / n).astype(np.int64)


def plane_sets(volumes: list[CaseVolume], bodies: list[np.ndarray], seed: int = SAMPLE_SEED) -> dict:
    """``{plane: {"real": (N, S, S), "fake": (N, S, S)}}``: the tri-planar FD's images, like with
    like. Per case: the box is the body's bounding box of the real volume (``bodies``: its
    :func:`body_mask`); in each plane the :func:`plane_images` that cut a structure; the case
    gives each plane N = its smallest plane's count, picked by :func:`even_picks` (one seeded
    generator, cases and planes in order); real and generated at the same positions. So every
    plane has the same N, summed over the cases."""
    rng = np.random.default_rng(seed)
    size = volumes[0].real.shape[-1] if volumes else 0
    out = {p: {"real": [], "fake": []} for p in PLANES}
    for vol, body in zip(volumes, bodies):
        box = body_box(body)
        imgs = {kind: {p: plane_images(getattr(vol, kind), vol.masks, p, box, size) for p in PLANES}
                for kind in ("real", "fake")}
        n = min(len(imgs["real"][p]) for p in PLANES)
        for p in PLANES:
            pick = even_picks(len(imgs["real"][p]), n, rng)
            for kind in ("real", "fake"):
                out[p][kind].append(imgs[kind][p][pick])
    return {p: {kind: np.concatenate(parts) if parts else np.zeros((0, size, size), np.float32)
                for kind, parts in sets.items()} for p, sets in out.items()}


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


def _features(extractor, images: np.ndarray, batch: int) -> torch.Tensor:
    parts = [torch.as_tensor(extractor.features(images[s:s + batch])).double() for s in range(0, len(images), batch)]
    return torch.cat(parts)


def triplanar_fd(sets: dict, extractor, prefix: str, batch: int = 64) -> tuple[dict, dict]:
    """``{<prefix>_<plane>, <prefix>_mean}`` FD between real and generated slices per plane
    (``sets``: :func:`plane_sets`), and the reasons for the ones that could not be computed.
    ``extractor.features``: (B, H, W) -> (B, D)."""
    metrics, nulls = {}, {}
    for plane in PLANES:
        real, fake = sets[plane]["real"], sets[plane]["fake"]
        key = f"{prefix}_{plane}"
        try:
            if not len(real):
                raise MetricUnavailable(f"{key}: no test case has slices cutting a structure in all three planes")
            metrics[key] = frechet_distance(_features(extractor, real, batch), _features(extractor, fake, batch))
        except MetricUnavailable as e:
            metrics[key], nulls[key] = None, str(e)
    values = [metrics[f"{prefix}_{p}"] for p in PLANES]
    metrics[f"{prefix}_mean"] = None if any(v is None for v in values) else float(np.mean(values))
    if metrics[f"{prefix}_mean"] is None:
        nulls[f"{prefix}_mean"] = "a plane's distance is missing"
    return metrics, nulls


def evaluate_volumes(volumes: list[CaseVolume], labels: dict[int, str], window, inception=None,
                     inception_reason: str = "", seed: int = SAMPLE_SEED,
                     *, body_hu: float = BODY_HU) -> tuple[dict, dict, pd.DataFrame]:
    """All through-plane metrics of the reassembled test volumes: (metrics, reasons for nulls,
    per-case sums (one row per case: ``case`` + :func:`case_sums`)). ``seed``: the tri-planar
    slices' pick (:func:`plane_sets`)."""
    bodies = [body_mask(v.real, window, body_hu) for v in volumes]
    sums = pd.DataFrame([{"case": v.case, **case_sums(v, labels, window, b)} for v, b in zip(volumes, bodies)])
    sums = sums.fillna(0.0)
    metrics = consistency_metrics(sums, labels)
    nulls = {k: NO_RATIO for k, v in metrics.items() if not np.isfinite(v)}
    sets = plane_sets(volumes, bodies, seed)
    fd, fd_nulls = triplanar_fd(sets, RandomConvFeatures(), "fd_tri_rand")
    metrics.update(fd)
    nulls.update(fd_nulls)
    if inception is not None:
        fd, fd_nulls = triplanar_fd(sets, inception, "fid_tri_inception", batch=16)
    else:
        fd = {f"fid_tri_inception_{p}": None for p in (*PLANES, "mean")}
        fd_nulls = {k: inception_reason or "no Inception weights" for k in fd}
    metrics.update(fd)
    nulls.update(fd_nulls)
    return metrics, nulls, sums


def per_case_table(sums: pd.DataFrame) -> pd.DataFrame:
    """One row per case: zcons_ssim_ratio, zgrad_ratio and flicker_ratio of that case alone."""
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
