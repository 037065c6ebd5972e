"""preprocess: canonical volumes -> memory-mapped stores of resized, normalised axial slices.

For every case in ``data/interim/manifest.csv``:

1. pick axial slices: all of them, or those containing a selected structure plus ``margin``;
2. HU window -> [-1, 1] (:func:`hu_to_unit`; :func:`unit_to_hu` is the one inverse);
3. put the slice in radiological display orientation (:func:`to_display`: anterior up, patient
   right on the image left) and resize to ``image_size``² — image anti-aliased, mask nearest;
4. keep only the selected structures in the mask (all seven when ``WH`` is selected);
5. with ``partial_volume`` k > 1, also the mask (and anatomy) at ``k * image_size``², nearest, in
   ``masks_fine.npy`` (``anatomy_fine.npy``): the model's condition averages each k x k block of it
   into the area fraction of every class (:func:`ctsynth.data.store.condition_batch`), so a
   condition pixel on an edge says how much of it each side covers, as the anti-aliased image does.

Slices are streamed one at a time from the uncompressed interim volumes (memory-mapped), into
``images.npy`` (float16) and ``masks.npy`` (uint8) opened with ``open_memmap``, so peak memory
is independent of the volume size. float16 keeps < 0.5 HU error over a 2000 HU window. When
ingest wrote anatomy volumes, ``anatomy.npy`` (uint8 body / lung / bone classes, nearest) holds
them on the same slices (:mod:`ctsynth.data.anatomy`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap
from skimage.transform import resize
from tqdm import tqdm

from ctsynth.core.config import Params
from ctsynth.core.errors import InputError
from ctsynth.core.io import atomic_dir, write_json
from ctsynth.core.labels import STRUCTURES, WH, structure_index
from ctsynth.core.progress import quiet
from ctsynth.data import modality

log = logging.getLogger("ctsynth.data.preprocess")


# ---------------------------------------------------------------------- intensity (one place)

def hu_to_unit(hu, window):
    """HU -> model space [-1, 1], clipping to the window ``[low, high]``."""
    lo, hi = float(window[0]), float(window[1])
    x = (np.asarray(hu, dtype=np.float32) - lo) / (hi - lo) * 2.0 - 1.0
    return np.clip(x, -1.0, 1.0)


def unit_to_hu(x, window):
    """Model space [-1, 1] -> HU. Works on numpy arrays and torch tensors alike."""
    lo, hi = float(window[0]), float(window[1])
    return (x + 1.0) * 0.5 * (hi - lo) + lo


# ---------------------------------------------------------------------- geometry (one place)

def to_display(slice_xy: np.ndarray) -> np.ndarray:
    """Canonical RAS slice ``[x, y]`` -> radiological display ``[row, col]`` (anterior up,
    patient right on the left): ``D[r, c] = A[X-1-c, Y-1-r]``."""
    return np.ascontiguousarray(slice_xy[::-1, ::-1].T)


def from_display(display: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`."""
    return np.ascontiguousarray(display.T[::-1, ::-1])


def prepare_slice(hu_xy: np.ndarray, mask_xy: np.ndarray, size: int, window,
                  keep: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One canonical slice -> (image (S, S) float32 in [-1, 1], mask (S, S) uint8).

    ``keep`` lists the structure indices kept in the mask; others become background.
    """
    image = hu_to_unit(to_display(hu_xy), window)
    image = resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return image.astype(np.float32), prepare_mask(mask_xy, size, keep)


def prepare_mask(mask_xy: np.ndarray, size: int, keep: list[int]) -> np.ndarray:
    """One canonical structure-index slice (X, Y) -> display slice (size, size) uint8 (nearest),
    structures not in ``keep`` set to background."""
    mask = resize(to_display(mask_xy), (size, size), order=0, anti_aliasing=False, preserve_range=True)
    return np.where(np.isin(mask, keep), mask, 0).astype(np.uint8)


def prepare_classes(classes_xy: np.ndarray, size: int) -> np.ndarray:
    """One canonical class slice (X, Y) -> display slice (S, S) uint8 (nearest), as masks are."""
    return resize(to_display(classes_xy), (size, size), order=0, anti_aliasing=False,
                  preserve_range=True).astype(np.uint8)


def restore_slice(unit_ss: np.ndarray, shape_xy, window) -> np.ndarray:
    """Model-space display slice (S, S) -> HU slice on the canonical grid ``shape_xy``."""
    rows, cols = shape_xy[1], shape_xy[0]
    img = resize(np.asarray(unit_ss, np.float32), (rows, cols), order=1, anti_aliasing=True,
                 preserve_range=True)
    return from_display(unit_to_hu(img, window))


def kept_indices(structures: list[str]) -> list[int]:
    """Structure indices kept in the mask for a structure selection (WH keeps all seven)."""
    if WH in structures:
        return [structure_index(s) for s in STRUCTURES]
    return [structure_index(s) for s in structures]


def select_slices(label: np.ndarray, keep: list[int], mode: str, margin: int) -> np.ndarray:
    """Axial slice indices to use: all, or those with a kept structure (dilated by margin)."""
    nz = label.shape[2]
    if mode == "all":
        return np.arange(nz)
    present = np.array([np.isin(label[:, :, z], keep).any() for z in range(nz)])
    chosen = present.copy()
    for shift in range(1, margin + 1):
        chosen[shift:] |= present[:-shift]
        chosen[:-shift] |= present[shift:]
    return np.flatnonzero(chosen)


# ---------------------------------------------------------------------- the stage

def run(params: Params, interim_dir: str | Path, out_dir: str | Path) -> dict:
    """Build ``out_dir`` (images.npy, masks.npy, slices.csv, meta.json). Returns meta."""
    interim_dir, cfg = Path(interim_dir), params.preprocess
    manifest_path = interim_dir / "manifest.csv"
    if not manifest_path.exists():
        raise InputError(f"{manifest_path}: not found (run the ingest stage first)")
    manifest = pd.read_csv(manifest_path, dtype={"case": str})
    keep, size = kept_indices(cfg.structures), cfg.image_size

    volumes, plan, anatomy = {}, [], {}
    with_anatomy = "anatomy_file" in manifest and manifest.anatomy_file.notna().all()
    for row in manifest.itertuples():
        image = nib.load(str(interim_dir / row.image_file))
        label = nib.load(str(interim_dir / row.label_file))
        if with_anatomy:
            anatomy[row.case] = nib.load(str(interim_dir / row.anatomy_file))
        lab = np.asanyarray(label.dataobj)  # memmap: uncompressed interim files
        zs = select_slices(lab, keep, cfg.slices, cfg.margin)
        if len(zs) == 0:
            log.warning("%s: no slice contains %s; case skipped", row.case, cfg.structures)
            continue
        volumes[row.case] = (image, label)
        plan.extend((row.case, int(z)) for z in zs)
    if not plan:
        raise InputError(f"{manifest_path}: no slice of any case contains {cfg.structures}")

    meta = {"image_size": size, "hu_window": list(map(float, cfg.hu_window)),
            "structures": list(cfg.structures), "slices": cfg.slices, "margin": cfg.margin,
            "label_map": {str(k): v for k, v in params.data.label_map.items()},
            "anatomy": str(manifest.anatomy_source.iloc[0]) if with_anatomy else None,
            "modality": params.data.modality, "unit": modality.unit(params.data.modality), "cases": {}}
    pv = cfg.partial_volume
    if pv > 1:                       # (absent: 1, so a store without partial volumes stays byte-identical)
        meta["partial_volume"] = pv
    with atomic_dir(out_dir) as tmp:
        images = open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16, shape=(len(plan), size, size))
        masks = open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(len(plan), size, size))
        classes = open_memmap(tmp / "anatomy.npy", mode="w+", dtype=np.uint8,
                              shape=(len(plan), size, size)) if with_anatomy else None
        fine = pv * size                                    # partial volume: the condition's sub-pixel grid
        fine_masks = open_memmap(tmp / "masks_fine.npy", mode="w+", dtype=np.uint8,
                                 shape=(len(plan), fine, fine)) if pv > 1 else None
        fine_classes = open_memmap(tmp / "anatomy_fine.npy", mode="w+", dtype=np.uint8,
                                   shape=(len(plan), fine, fine)) if pv > 1 and with_anatomy else None
        for i, (case, z) in enumerate(tqdm(plan, desc="preprocess", unit="slice", disable=quiet())):
            image, label = volumes[case]
            hu = np.asarray(image.dataobj[:, :, z], dtype=np.float32)
            lab = np.asarray(label.dataobj[:, :, z])
            images[i], masks[i] = prepare_slice(hu, lab, size, cfg.hu_window, keep)
            if fine_masks is not None:
                fine_masks[i] = prepare_mask(lab, fine, keep)
            if classes is not None:
                body = np.asarray(anatomy[case].dataobj[:, :, z])
                classes[i] = prepare_classes(body, size)
                if fine_classes is not None:
                    fine_classes[i] = prepare_classes(body, fine)
        for array in (images, masks, classes, fine_masks, fine_classes):
            if array is not None:
                array.flush()
        del images, masks, classes, fine_masks, fine_classes
        frame = pd.DataFrame(plan, columns=["case", "z"])
        frame.to_csv(tmp / "slices.csv", index=False)
        for row in manifest.itertuples():
            if row.case not in volumes:
                continue
            image = volumes[row.case][0]
            meta["cases"][row.case] = {
                "shape": [int(s) for s in image.shape], "affine": image.affine.tolist(),
                "orig_affine": json.loads(row.orig_affine),
                "orig_shape": [int(row.orig_shape_x), int(row.orig_shape_y), int(row.orig_shape_z)],
                "z": frame.loc[frame.case == row.case, "z"].astype(int).tolist(),
            }
        write_json(tmp / "meta.json", meta)
    log.info("preprocess: %d slices of %d cases at %d² -> %s", len(plan), len(volumes), size, out_dir)
    return meta
