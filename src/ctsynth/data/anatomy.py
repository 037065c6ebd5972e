"""The anatomy around the heart: body outline, lungs and bone, as condition channels.

The seven heart structures leave everything else in the slice (body wall, lungs, spine, ribs) to
the generator's guess. Ingest therefore writes, beside each case's heart labels, an *anatomy*
volume ``<case>_anatomy.nii`` (uint8, one class per voxel, later classes win):

====  =======  ==========================================================================
 0    outside  air outside the body
 1    body     inside the body outline (soft tissue, fat, the heart itself)
 2    lung     air inside the body: lungs (with their vessels) and airways
 3    bone     dense tissue outside the heart labels: bone (and, when derived, contrast-
               filled vessels the heart labels do not cover)
====  =======  ==========================================================================

Two sources (``data.anatomy.source``):

* ``derived`` (default; needs no labels): rules on the image, in :func:`derive`:
  body = the largest 3-D connected component above ``body_hu``, holes filled per axial slice;
  lung = air (below ``body_hu``) inside the body, holes filled per slice (the lung vessels);
  bone = above ``bone_hu`` inside the body, outside the heart labels dilated by one voxel.
* ``supplied``: a label file per case, ``<case><label_suffix>`` beside the image, whose values a
  ``label_map`` (or a preset: ``ctsynth``, the phantom's own files; ``totalsegmentator-total``)
  names ``body``, ``lung`` or ``bone``; values it does not name are ignored (a TotalSegmentator
  file holds 117 classes). A map without ``body`` takes the body outline from the image rule.

The generator sees three channels (:func:`channels`): the body outline (every class > 0), lung and
bone. ``model.anatomy`` switches them on; ``train.anatomy_drop`` trains with them sometimes
blank, so that the same model also draws from heart labels alone (all three channels zero).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctsynth.core.labels import ANATOMY_CLASSES as CLASSES
from ctsynth.core.labels import BODY, BONE, LUNG, OUTSIDE

CHANNELS = ("body", "lung", "bone")               # the condition channels, in this order


def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every axial slice of a (X, Y, Z) mask."""
    out = np.empty_like(mask)
    for z in range(mask.shape[2]):
        out[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return out


def body_outline(hu: np.ndarray, body_hu: float) -> np.ndarray:
    """The body: the largest 3-D connected component above ``body_hu``, holes filled per slice."""
    tissue = hu > body_hu
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    sizes = np.bincount(labels.ravel())[1:]
    return _fill_per_slice(labels == 1 + int(np.argmax(sizes)))


def derive(hu: np.ndarray, heart: np.ndarray, body_hu: float = -500.0, bone_hu: float | None = 200.0) -> np.ndarray:
    """Anatomy classes (uint8, ``hu``'s shape) of a canonical CT volume (X, Y, Z) by the rules above;
    ``heart``: its structure-index labels (the heart is body, never bone); ``bone_hu`` None: no bone
    class (MR, :mod:`ctsynth.data.modality`)."""
    body = body_outline(hu, body_hu)
    lung = _fill_per_slice(body & (hu <= body_hu)) & body
    out = body.astype(np.uint8)
    out[lung] = LUNG
    if bone_hu is not None:
        out[body & ~lung & (hu > bone_hu) & ~ndimage.binary_dilation(heart > 0)] = BONE
    return out


def from_labels(raw: np.ndarray, label_map: dict[int, str], hu: np.ndarray | None, body_hu: float,
                path) -> tuple[np.ndarray, list[str]]:
    """A supplied anatomy label volume -> ``(classes uint8, problems)``. Values the map does not name
    are ignored; without a ``body`` value the body outline comes from the image ``hu``
    (:func:`body_outline`; ``hu`` None: the labelled classes only)."""
    problems: list[str] = []
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            return np.zeros(raw.shape, np.uint8), [f"{path}: anatomy labels must be finite integers"]
        raw = raw.astype(np.int64)
    elif raw.dtype.kind not in "iub":
        return np.zeros(raw.shape, np.uint8), [f"{path}: anatomy labels have unsupported data type {raw.dtype}"]
    named = {v for v in np.unique(raw) if int(v) in label_map}
    if not named:
        problems.append(f"{path}: none of the anatomy label values {sorted(label_map)[:12]} occurs "
                        f"(values found: {[int(v) for v in np.unique(raw)[:12]]}); check data.anatomy.label_map")
    classes = np.zeros(raw.shape, np.uint8)
    for name, value in CLASSES.items():                   # body < lung < bone: later classes win
        codes = [v for v, n in label_map.items() if n == name]
        if codes:
            classes[np.isin(raw, codes)] = value
    if "body" not in label_map.values() and hu is not None:
        body = body_outline(hu, body_hu) | (classes > 0)
        classes = np.where(body & (classes == 0), BODY, classes).astype(np.uint8)
    return classes, problems


def channels(classes: np.ndarray) -> np.ndarray:
    """Anatomy classes ``(..., H, W)`` -> condition channels ``(..., 3, H, W)`` float32: body outline,
    lung, bone (:data:`CHANNELS`)."""
    classes = np.asarray(classes)
    return np.stack([classes > OUTSIDE, classes == LUNG, classes == BONE], axis=-3).astype(np.float32)


def counts(classes: np.ndarray) -> dict[str, int]:
    """Voxels per class (body counts the whole outline), for the ingest manifest."""
    n = np.bincount(np.asarray(classes).ravel(), minlength=4)
    return {"body": int(n[1:].sum()), "lung": int(n[LUNG]), "bone": int(n[BONE])}


def record(anatomy: bool, source: str | None, drop: float) -> dict | None:
    """What a model file records of its anatomy channels (None: ``model.anatomy`` off): their names,
    where the training anatomy came from, and ``train.anatomy_drop`` (> 0: it also draws without)."""
    if not anatomy:
        return None
    return {"channels": list(CHANNELS), "source": source, "drop": float(drop)}
