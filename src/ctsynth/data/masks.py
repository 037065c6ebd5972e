"""Label masks -> structure indices: the one label-mapping routine of ingest, ``ctsynth generate``,
``ctsynth synthesize`` and the report, plus the CLI's ``--label-map`` / ``--structures`` parsing.

Raw label values (MM-WHS 205 ... 850, TotalSegmentator 1 ... 7, anything a ``label_map`` names)
become structure indices 1..7 (:func:`ctsynth.core.labels.structure_index`), background 0.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import yaml

from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.labels import (
    LABEL_PRESETS,
    STRUCTURES,
    WH,
    parse_label_map,
    structure_index,
    validate_structures,
)

log = logging.getLogger(__name__)


def map_labels(data: np.ndarray, label_map: dict[int, str], path, *, unknown: str = "error",
               fix: str = "set data.unknown_labels: background to ignore them"
               ) -> tuple[np.ndarray, list[int], list[str]]:
    """Raw label values -> ``(structure indices (uint8, data's shape), unknown values, problems)``.

    Problems (every one found, never raised here): NaN/Inf, non-integer values, an unsupported
    data type, and -- with ``unknown="error"`` -- values missing from ``label_map`` (``fix`` says
    how to resolve them). With ``unknown="background"`` such values become 0 and are returned."""
    problems: list[str] = []
    out = np.zeros(data.shape, np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            return out, [], [f"{path}: label volume contains NaN/Inf values"]
        if not np.all(data == np.round(data)):
            return out, [], [f"{path}: label volume has non-integer values "
                             f"(e.g. {data[data != np.round(data)].flat[0]:.3g}); labels must be integers"]
        data = data.astype(np.int64)
    elif data.dtype.kind not in "iub":
        return out, [], [f"{path}: label volume has unsupported data type {data.dtype}"]
    values = np.unique(data)
    outside = [int(v) for v in values if v != 0 and int(v) not in label_map]
    if outside and unknown == "error":
        problems.append(f"{path}: label values {outside[:20]} are not in the label map "
                        f"{label_map}; {fix}")
    for value, name in label_map.items():
        out[data == value] = structure_index(name)
    return out, outside, problems


def index_volume(path: Path, data: np.ndarray, label_map: dict[int, str], structures: list[str],
                 unknown: str = "background") -> tuple[np.ndarray, dict]:
    """A user's mask -> structure indices (uint8), raising InputError with every problem.

    Beyond :func:`map_labels`: the mask must hold at least one value of the selected
    ``structures``. Values outside the label map become background with a warning
    (``unknown="background"``) or are an error (``"error"``)."""
    selected = set(STRUCTURES) if WH in structures else set(structures)
    expected = {v: n for v, n in label_map.items() if n in selected}
    if not expected:
        raise ConfigError(f"label map {label_map} names none of the selected structures "
                          f"{sorted(selected)}; check --label-map / --structures")
    out, outside, problems = map_labels(data, label_map, path, unknown=unknown,
                                        fix="pass --label-map naming every value")
    if problems and not outside:                                 # the values themselves are unusable
        raise InputError(problems)
    values = [int(v) for v in np.unique(data) if v != 0]
    if not set(values) & set(expected):
        problems.insert(0, f"{path}: mask has none of the expected label values "
                        f"{ {v: expected[v] for v in sorted(expected)} }; it contains values "
                        f"{values[:20]}{' …' if len(values) > 20 else ''}. Pass --label-map to say "
                        f"which value is which structure")
    if problems:
        raise InputError(problems)
    if outside:
        log.warning("%s: label values %s are not in the label map %s; treated as background",
                    path, outside[:20], label_map)
    return out, {"values_found": values, "unknown_values": outside,
                 "used": {v: expected[v] for v in sorted(set(values) & set(expected))}}


def parse_label_map_arg(value, parse=parse_label_map, where: str = "--label-map",
                        presets: dict = LABEL_PRESETS) -> dict[int, str] | None:
    """``--label-map`` (or, with ``parse=parse_anatomy_map``, ``--anatomy-map``): None, a dict, a preset
    name (``mmwhs``, ``totalsegmentator-heartchambers``; anatomy: ``ctsynth``, ``totalsegmentator-total``),
    inline JSON (``'{"1": "LV"}'``) or a JSON/YAML file path.

    Files are read with json / yaml.safe_load only (no eval, no pickle)."""
    if value is None or isinstance(value, dict):
        return None if value is None else parse(value, where=where)
    text = str(value).strip()
    if text in presets:
        return parse(text, where=where)
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e}); example: '{{\"1\": \"Ao\"}}'") from None
        return parse(raw, where=where)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{where}: {text!r} is neither a preset ({', '.join(presets)}), inline JSON "
                          "nor an existing file")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: label map file is not valid JSON/YAML ({e})") from None
    return parse(raw, where=str(path))


def structures_arg(structures, model_structures: list[str]) -> list[str]:
    """``--structures`` (None, a name, names separated by commas/spaces) -> a subset of the model's."""
    if structures is None:
        return list(model_structures)
    if isinstance(structures, str):
        structures = [structures]
    structures = [s for item in structures for s in str(item).replace(",", " ").split()]
    structures = validate_structures(structures, where="--structures")
    extra = [s for s in structures if s not in model_structures]
    if extra:
        raise ConfigError(f"--structures: {extra} not among the model's structures "
                          f"{model_structures}; choose a subset of those")
    return structures
