"""CT or MR (``data.modality``): what an image's intensities mean, in one place.

CT intensities are Hounsfield units (HU): air -1000, water 0, and every HU rule of the pipeline
(the body above -500 HU, lungs below -400 HU, bone above ``data.anatomy.bone_hu``, the contrast
level of the blood pools) holds across scanners. MR has no absolute scale: ingest maps each MR
volume's 0.5 and 99.5 % intensity percentiles to -1000 and +1000 *normalised units* (nu), clipped,
so the model sees [-1, 1] as for CT (``preprocess.hu_window`` must stay [-1000, 1000]). Metrics are
then in nu (the report names the unit), and what only HU can say is skipped or replaced:

* the body outline (evaluation's in-body masks, the derived anatomy) is above -700 nu (15 % of
  the percentile range: MR background is noise near 0, tissue well above it);
* derived anatomy has no bone class (cortical bone is dark in MR, beside dark lungs and air);
* texture is measured inside the heart structures only (the lung / soft-tissue regions are HU bands);
* the contrast control (a blood-pool level in HU) is refused by the params check.

:func:`problems` says when the data do not look like the modality set (CT has values below -100
HU: fat, lungs, air; MR magnitude images have none below 0).
"""
from __future__ import annotations

import numpy as np

from ctsynth.core.config import MR_RANGE

MODALITIES = ("ct", "mr")
UNITS = {"ct": "HU", "mr": "nu"}
BODY_LEVEL = {"ct": -500.0, "mr": -700.0}      # the body outline: above this (HU / nu)
MR_PERCENTILES = (0.5, 99.5)                   # mapped to MR_RANGE (-1000, 1000 nu)


def unit(meta_or_modality) -> str:
    """The intensity unit of a store's meta (or a modality name): "HU" or "nu"."""
    return UNITS[_modality(meta_or_modality)]


def body_level(meta_or_modality) -> float:
    """The body outline's threshold (HU for CT, nu for MR)."""
    return BODY_LEVEL[_modality(meta_or_modality)]


def _modality(meta_or_modality) -> str:
    if isinstance(meta_or_modality, str):
        return meta_or_modality
    return str((meta_or_modality or {}).get("modality") or "ct")            # stores written before MR: CT


def problems(data: np.ndarray, modality: str, path) -> list[str]:
    """Why ``data`` does not look like ``modality`` (empty when it does)."""
    low = float(np.min(data))
    if modality == "ct" and low >= 0:
        return [f"{path}: no negative value (minimum {low:g}): not a CT in Hounsfield units (air is -1000 HU, fat "
                f"-100 HU); if this is MR, set data.modality: mr"]
    if modality == "mr" and low < -100:
        return [f"{path}: values down to {low:g}: Hounsfield units, i.e. CT; MR magnitude images have no negative "
                f"values; set data.modality: ct"]
    return []


def normalise_mr(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """An MR volume -> ``(int16 volume in nu, 0.5 % percentile, 99.5 % percentile)``: the percentiles go
    to -1000 / +1000 nu, linearly, clipped."""
    data = np.asarray(data, np.float32)
    lo, hi = (float(v) for v in np.percentile(data, MR_PERCENTILES))
    if hi <= lo:
        hi = lo + 1.0
    nu = (data - lo) / (hi - lo) * (MR_RANGE[1] - MR_RANGE[0]) + MR_RANGE[0]
    return np.rint(np.clip(nu, *MR_RANGE)).astype(np.int16), lo, hi
