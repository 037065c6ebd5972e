"""The contrast control (``model.contrast_control``): a case's contrast level as a generator input.

A mask says where the blood pools are, not how bright the contrast agent made them: every patient
(real CT, and the phantom) has a level of their own, and a deterministic mask -> CT map can only
draw the training average. With the control on, the condition gets one more channel, a constant
plane holding the case's **contrast level**: the median HU inside its blood pools and vessels
(:data:`BLOOD_POOL` among the model's structures; all of its structures when it has none of
them), measured on the case's stored slices (the median: the slices are resized, and pixels at a
pool's edge blend with what surrounds it). Training reads each training case's level from its
real image; at generation the level is set by the user, measured on a real image (the generate
stage, on the test and validation patients) or drawn from the training cases' distribution
(``synthesize``).

The model file records the levels it was trained on (:func:`record`); a level outside their
range is refused with a clear error (:func:`check`), since the model never saw it. The pipeline's
own measured levels are clipped into the range instead, and say so (:func:`clip`).
"""
from __future__ import annotations

import numpy as np

from ctsynth.core.errors import InputError
from ctsynth.core.labels import WH, structure_index
from ctsynth.data.preprocess import hu_to_unit, unit_to_hu

BLOOD_POOL = ("LA", "LV", "RA", "RV", "Ao", "PA")
MEASURE = "median HU inside the blood pools and vessels"
PLANE = "standardized"              # the record's ``plane``: (level - mean) / sd, see :func:`planes`


def level_structures(structures: list[str]) -> list[str]:
    """The structures whose median HU is the contrast level: the blood pools among ``structures``
    (all of ``structures`` when there are none, e.g. a myocardium-only model)."""
    pool = [s for s in structures if s in BLOOD_POOL]
    return pool or list(structures)


def _in_level(masks: np.ndarray, structures: list[str]) -> np.ndarray:
    names = level_structures(structures)
    if WH in names:
        return masks > 0
    return np.isin(masks, [structure_index(s) for s in names])


def case_levels(store, cases) -> dict[str, float]:
    """``{case: level HU}`` from the store's real slices of ``cases`` (NaN: no level structure)."""
    window = store.meta["hu_window"]
    out = {}
    for case in cases:
        rows = store.rows_for_cases([case])
        inside = _in_level(np.asarray(store.masks[rows]), store.structures)
        values = np.asarray(store.images[rows], np.float32)[inside]
        out[case] = float(unit_to_hu(np.median(values), window)) if values.size else float("nan")
    return out


def row_levels(store, rows: np.ndarray, levels: dict[str, float]) -> np.ndarray:
    """The level (HU, float32) of each row's case."""
    cases = store.slices["case"].to_numpy()[np.asarray(rows, np.int64)]
    return np.array([levels[c] for c in cases], np.float32)


def planes(levels_hu, rec: dict, window) -> np.ndarray:
    """Levels (B,) HU -> the condition channel's value (B,) for the model of record ``rec``.

    A record with ``plane: standardized`` (every model trained since 2026-12-03) says the plane
    holds (level - training mean) / training sd: the training levels span a few units, as the 0/1
    mask channels do. Older model files saw the level on the image's own scale (``hu_to_unit``):
    a spread of about 0.2 beside channels of 0 and 1, which a short training barely learnt to read
    (0.27 HU drawn per HU asked at 1 250 steps; docs/experiments/generator-realism.md, grid 14)."""
    levels = np.asarray(levels_hu, np.float32)
    if rec.get("plane") == PLANE:
        sd = float(rec["sd_hu"]) or 1.0                    # one training level: every plane 0
        return ((levels - float(rec["mean_hu"])) / sd).astype(np.float32)
    return hu_to_unit(levels, window)


def record(levels: dict[str, float], structures: list[str]) -> dict:
    """What the model file keeps: the measure, the training cases' levels and their range."""
    found = {c: round(float(v), 2) for c, v in levels.items() if np.isfinite(v)}
    if not found:
        raise InputError(f"model.contrast_control: no training case has any of {level_structures(structures)} "
                         f"to measure a contrast level on")
    values = list(found.values())
    return {"measure": MEASURE, "plane": PLANE, "structures": level_structures(structures), "train_levels_hu": found,
            "range_hu": [min(values), max(values)], "mean_hu": round(float(np.mean(values)), 2),
            "sd_hu": round(float(np.std(values, ddof=1)), 2) if len(values) > 1 else 0.0}


def check(level: float, rec: dict, where: str = "contrast") -> float:
    """A user's level (HU), refused outside the range the model was trained on."""
    lo, hi = rec["range_hu"]
    if not np.isfinite(level) or not lo <= level <= hi:
        raise InputError(f"{where} {level:g} HU: outside the contrast levels this model was trained on "
                         f"({lo:g} to {hi:g} HU, {rec['measure']}); pick a level in that range")
    return float(level)


def clip(level: float, rec: dict) -> tuple[float, bool]:
    """A measured level clipped into the trained range: (level used, whether it was clipped).
    NaN (no level structure in the case) becomes the training mean."""
    lo, hi = rec["range_hu"]
    if not np.isfinite(level):
        return float(rec["mean_hu"]), True
    used = float(min(max(level, lo), hi))
    return used, used != level


def clip_levels(measured: dict[str, float], rec: dict) -> tuple[dict[str, float], list[str]]:
    """:func:`clip` for every case of ``{case: measured level}``: (levels used, cases clipped, sorted)."""
    done = {c: clip(v, rec) for c, v in measured.items()}
    return {c: used for c, (used, _) in done.items()}, sorted(c for c, (_, moved) in done.items() if moved)


def draw(rng: np.random.Generator, rec: dict) -> float:
    """A level from the training cases' distribution: normal with their mean and sd, truncated to
    their range (redrawn until inside; clipping would pile levels up at the range's ends)."""
    lo, hi = rec["range_hu"]
    for _ in range(100):
        level = float(rng.normal(rec["mean_hu"], rec["sd_hu"]))
        if lo <= level <= hi:
            return level
    return float(np.clip(level, lo, hi))                 # sd 0 or a degenerate range


def training_dataset(store, rows: np.ndarray, cases: list[str], model_cfg, anatomy_drop: float = 0.0):
    """The SliceDataset of ``rows`` (of ``cases``) for a model config: with ``contrast_control``
    each row's condition ends with its case's level (a case without any level structure gets the
    training mean), and the dataset's ``contrast_record`` goes into the model file; with ``anatomy``
    the slices' anatomy channels follow the masks and ``anatomy_record`` (with ``anatomy_drop``,
    :func:`ctsynth.data.anatomy.record`) goes into the model file too; with ``noise: nps``, so does
    ``noise_record``, the noise measured on these rows (:func:`ctsynth.data.noise.measure`)."""
    from ctsynth.data.anatomy import record as anatomy_record
    from ctsynth.data.noise import measure as measure_noise
    from ctsynth.data.store import SliceDataset

    anatomy = bool(getattr(model_cfg, "anatomy", False))
    if not model_cfg.contrast_control:
        ds = SliceDataset(store, rows, model_cfg.encoding, model_cfg.context_slices, anatomy=anatomy)
    else:
        measured = case_levels(store, cases)
        rec = record(measured, store.structures)
        levels, _ = clip_levels(measured, rec)
        values = planes(row_levels(store, rows, levels), rec, store.meta["hu_window"])
        ds = SliceDataset(store, rows, model_cfg.encoding, model_cfg.context_slices, values, rec, anatomy=anatomy)
    ds.anatomy_record = anatomy_record(anatomy, store.meta.get("anatomy"), anatomy_drop)
    ds.noise_record = measure_noise(np.asarray(store.images[rows]), np.asarray(store.masks[rows]),
                                    store.slices.case.to_numpy()[rows], store.slices.z.to_numpy()[rows]) \
        if getattr(model_cfg, "noise", "none") == "nps" else None
    return ds


def measured_planes(store, rows: np.ndarray, rec: dict | None) -> np.ndarray | None:
    """The condition planes of real store ``rows`` at their cases' measured levels, clipped into
    the model's range (None when the model has no contrast control)."""
    if rec is None:
        return None
    cases = list(dict.fromkeys(store.slices["case"].to_numpy()[np.asarray(rows, np.int64)].tolist()))
    levels, _ = clip_levels(case_levels(store, cases), rec)
    return planes(row_levels(store, rows, levels), rec, store.meta["hu_window"])
