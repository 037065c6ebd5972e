"""Cardiac structures, MM-WHS label values and condition encodings.

Inside the pipeline a label volume holds *structure indices*: 0 = background and
``STRUCTURES.index(name) + 1`` for each structure, whatever the raw dataset used
(MM-WHS 205/420/..., or ``{1: Ao}`` for another dataset; see :func:`parse_label_map`).

A *condition* is what the generator sees. ``structures`` selects which structures are
kept (others become background); ``WH`` is the union of all seven as one channel.

* ``onehot``: one channel per selected structure, in the order given (WH = one channel).
* ``index``: one channel holding ``structure_index / 7`` for kept structures (the authors'
  encoding, scaled to [0, 1]); WH contributes value 1.0 where no finer structure is kept.
"""
from __future__ import annotations

import numpy as np

from ctsynth.core.errors import ConfigError

STRUCTURES: tuple[str, ...] = ("Myo", "LA", "LV", "RA", "RV", "Ao", "PA")
N_CLASSES = len(STRUCTURES) + 1       # background + the structures: the values of an index mask
WH = "WH"
ALL_CONDITIONS: tuple[str, ...] = STRUCTURES + (WH,)
MMWHS_LABEL_MAP: dict[int, str] = {205: "Myo", 420: "LA", 500: "LV", 550: "RA", 600: "RV",
                                   820: "Ao", 850: "PA"}
# Named label sets ``data.label_map`` / ``--label-map`` accept instead of a mapping. TotalSegmentator's
# ``heartchambers_highres`` task writes 1 heart_myocardium, 2 heart_atrium_left, 3 heart_ventricle_left,
# 4 heart_atrium_right, 5 heart_ventricle_right, 6 aorta, 7 pulmonary_artery.
LABEL_PRESETS: dict[str, dict[int, str]] = {
    "mmwhs": MMWHS_LABEL_MAP,
    "totalsegmentator-heartchambers": {i + 1: name for i, name in enumerate(STRUCTURES)},
}
ENCODINGS = ("onehot", "index")
# Colour-blind-safe (Okabe-Ito) colours, uint8 RGB, indexed by structure index (0 = background).
STRUCTURE_COLOURS = np.array([[0, 0, 0], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66],
                              [0, 114, 178], [213, 94, 0], [204, 121, 167]], np.uint8)


def structure_index(name: str) -> int:
    """Index stored in interim label volumes (1..7)."""
    return STRUCTURES.index(name) + 1


def parse_label_map(raw: dict | str, where: str = "data.label_map") -> dict[int, str]:
    """Validate ``{raw_value: structure_name}`` (keys may be ints or numeric strings), or resolve a
    preset name of :data:`LABEL_PRESETS` to its mapping."""
    return _parse_value_map(raw, STRUCTURES, LABEL_PRESETS, where, "structure", "a label-set preset")


def _parse_value_map(raw, names, presets: dict, where: str, what: str, preset_kind: str) -> dict[int, str]:
    """``{integer value: one of names}`` or a preset name -> the mapping; ConfigError listing every
    problem (a key that is not an integer, value 0, a name not among ``names``)."""
    if isinstance(raw, str):
        if raw not in presets:
            raise ConfigError(f"{where}: {raw!r} is not {preset_kind}; presets: {', '.join(presets)} "
                              f"(or give a mapping of label value -> {what} name)")
        return dict(presets[raw])
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: must be a non-empty mapping of label value -> {what} name, or a "
                          f"preset name ({', '.join(presets)})")
    problems, out = [], {}
    for key, name in raw.items():
        try:
            value = int(key)
            if str(key).strip() not in (str(value), f"{value}.0") and not isinstance(key, int):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{where}: key {key!r} is not an integer label value")
            continue
        if value == 0:
            problems.append(f"{where}: value 0 is background and cannot name a {what}")
        if name not in names:
            problems.append(f"{where}.{key}: {name!r} is not a{'n' if what[0] in 'aeiou' else ''} {what}; allowed: "
                            f"{', '.join(names)}")
        out[value] = name
    if problems:
        raise ConfigError(problems)
    return out


def validate_structures(structures, where: str = "preprocess.structures") -> list[str]:
    if isinstance(structures, str):
        structures = [structures]
    if not isinstance(structures, (list, tuple)) or not structures:
        raise ConfigError(f"{where}: must be a non-empty list drawn from {', '.join(ALL_CONDITIONS)}")
    bad = [s for s in structures if s not in ALL_CONDITIONS]
    if bad:
        raise ConfigError(f"{where}: unknown structure(s) {bad}; allowed: {', '.join(ALL_CONDITIONS)}")
    if len(set(structures)) != len(structures):
        raise ConfigError(f"{where}: duplicate entries in {list(structures)}")
    return list(structures)


def condition_channels(structures: list[str], encoding: str) -> int:
    return len(structures) if encoding == "onehot" else 1


def encode_condition(index_mask: np.ndarray, structures: list[str], encoding: str) -> np.ndarray:
    """Structure-index mask ``(..., H, W)`` -> condition ``(..., C, H, W)`` float32 in [0, 1]."""
    index_mask = np.asarray(index_mask)
    if encoding not in ENCODINGS:
        raise ConfigError(f"model.encoding: {encoding!r}; allowed: {', '.join(ENCODINGS)}")
    if encoding == "onehot":
        chans = []
        for name in structures:
            chans.append(index_mask > 0 if name == WH else index_mask == structure_index(name))
        return np.stack(chans, axis=-3).astype(np.float32)
    out = np.zeros(index_mask.shape, np.float32)
    if WH in structures:
        out[index_mask > 0] = 1.0
    for name in structures:
        if name != WH:
            idx = structure_index(name)
            out[index_mask == idx] = idx / len(STRUCTURES)
    return out[..., None, :, :]


# ------------------------------------------------ anatomy around the heart (ctsynth.data.anatomy)
OUTSIDE, BODY, LUNG, BONE = 0, 1, 2, 3
ANATOMY_CLASSES = {"body": BODY, "lung": LUNG, "bone": BONE}

# TotalSegmentator v2 `total` task: lung lobes 10-14 and trachea 16 (air inside the body), sacrum 25,
# vertebrae 26-50, humerus/scapula/clavicula/femur/hip 69-78, skull 91, ribs 92-115, sternum 116,
# costal cartilages 117. Its `body` task is separate: the body outline then comes from the image rule.
_TOTALSEG_TOTAL = {**{v: "lung" for v in (10, 11, 12, 13, 14, 16)},
                   **{v: "bone" for v in (25, *range(26, 51), *range(69, 79), 91, *range(92, 118))}}
ANATOMY_PRESETS: dict[str, dict[int, str]] = {
    "ctsynth": {BODY: "body", LUNG: "lung", BONE: "bone"},    # the classes above, as the phantom writes them
    "totalsegmentator-total": _TOTALSEG_TOTAL,
}


def parse_anatomy_map(raw, where: str = "data.anatomy.label_map") -> dict[int, str]:
    """``{value: body|lung|bone}`` or a preset name of :data:`ANATOMY_PRESETS` -> the mapping; ConfigError
    listing every problem."""
    return _parse_value_map(raw, tuple(ANATOMY_CLASSES), ANATOMY_PRESETS, where, "anatomy class", "an anatomy preset")
