"""Presets: overlays of params.yaml.

A preset (``params/<name>.yaml``) holds only the keys it sets; everything else comes from the base
params file. Expanding merges the overlay into the base with a round-trip YAML parser, so every
comment and the layout of params.yaml survive, validates the merged result with the params loader,
and (``ctsynth preset``) writes it atomically:

    ctsynth preset paper                          # params/paper.yaml merged into params.yaml
    ctsynth preset my_overlay.yaml --params params.yaml --out params.yaml

Merging is per key inside a section: an overlay's ``train: {iterations: 100000}`` sets that one key
and keeps the rest of ``train``; a key's value (a list, a mapping such as ``data.label_map``) is
replaced whole. An overlay key that params.yaml does not define is an error (all of them together,
naming the overlay file) -- a typo would otherwise silently leave the default in place.
"""
from __future__ import annotations

import dataclasses
import io
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError as RoundTripYAMLError

from ctsynth.core.config import Params, flatten, params_from_dict, to_dict
from ctsynth.core.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parents[3] / "params"     # <checkout>/params
_MISSING = object()


@dataclass
class Expanded:
    """A preset merged into a base params file."""
    overlay: Path                      # the preset file
    text: str                          # the merged params file, comments of the base kept
    params: Params                     # ... validated
    changed: dict[str, tuple[Any, Any]]   # flattened key -> (base value, merged value), where they differ


def available() -> list[str]:
    """Names of the presets in ``params/`` (``ctsynth preset NAME``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name_or_file: str | Path) -> Path:
    """A preset name (``paper`` -> ``<checkout>/params/paper.yaml``) or an overlay file path."""
    text = str(name_or_file)
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        path = PRESETS_DIR / f"{text}.yaml"
        if path.is_file():
            return path
        raise ConfigError(f"preset {text!r}: {path} does not exist; named presets: "
                          f"{', '.join(available()) or 'none'} (or give an overlay file)")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{path}: preset file not found")
    return path


def _yaml() -> YAML:
    y = YAML()                         # round trip: comments, key order and flow style kept
    y.width = 4096                     # never re-wrap a long line
    y.preserve_quotes = True
    y.representer.add_representer(     # `null`, as params.yaml writes it (round trip would write nothing)
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _read(path: Path, what: str) -> Any:
    try:
        return _yaml().load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except RoundTripYAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def _sections() -> dict[str, Any]:
    """params.yaml's top-level keys -> their dataclass (a section) or None (a plain key: seed)."""
    hints = typing.get_type_hints(Params)
    return {f.name: hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(Params)}


def check_overlay(overlay: Any, source: str) -> list[str]:
    """Every problem of the overlay's shape: unknown keys (named together in one line) and
    sections that are not mappings. Values are checked after merging, by the params loader."""
    if overlay is None:
        return []
    if not isinstance(overlay, dict):
        return [f"{source}: must be a mapping of params.yaml sections, got {type(overlay).__name__}"]
    sections, unknown, problems = _sections(), [], []
    for key, value in overlay.items():
        if key not in sections:
            unknown.append(str(key))
        elif sections[key] is not None and value is not None:
            if not isinstance(value, dict):
                problems.append(f"{source}: {key}: must be a mapping of {key}.* keys, got {value!r}")
                continue
            names = {f.name for f in dataclasses.fields(sections[key])}
            unknown += [f"{key}.{k}" for k in value if k not in names]
    if unknown:
        problems.insert(0, f"{source}: unknown keys {', '.join(unknown)} (a preset sets only keys that "
                           f"params.yaml defines; sections: {', '.join(sections)})")
    return problems


def _node(value: Any) -> Any:
    """An overlay value as a fresh node in flow style ([a, b], {k: v}: as params.yaml writes its
    lists; a value on one line keeps the key's comment beside it), none of the overlay's comments."""
    if isinstance(value, dict):
        out = CommentedMap((k, _node(v)) for k, v in value.items())
        out.fa.set_flow_style()
        return out
    if isinstance(value, list):
        seq = CommentedSeq(_node(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    for plain in (bool, int, float, str):
        if isinstance(value, plain):
            return plain(value)
    return value


def _merge(base: dict, overlay: dict | None) -> None:
    sections = _sections()
    for key, value in (overlay or {}).items():
        if sections[key] is None:
            base[key] = _node(value)
            continue
        if not value:
            continue
        target = base.get(key)
        if not isinstance(target, dict):
            base[key] = target = CommentedMap()
        for k, v in value.items():
            old = target.get(k)
            if isinstance(old, CommentedMap) and isinstance(v, dict) and not old.fa.flow_style():
                for gone in [g for g in old if g not in v]:   # a block mapping (data.label_map) stays
                    del old[gone]                             # block, its comments kept
                for kk, vv in v.items():
                    old[kk] = _node(vv)
            else:
                target[k] = _node(v)


def _plain(tree: Any) -> dict:
    return yaml.safe_load(_dump(tree)) or {}


def _dump(tree: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(tree, buf)
    return buf.getvalue()


def expand(preset: str | Path, base: str | Path | None = None) -> Expanded:
    """Merge the preset (a name or an overlay file) into ``base`` (a params file; None: the
    dataclass defaults, which are params.yaml's values) and validate the result.

    Raises :class:`ConfigError` naming every unknown overlay key at once, or every problem of the
    merged params (as ``ctsynth check-params`` would)."""
    path = preset_path(preset)
    overlay = _read(path, "preset")
    problems = check_overlay(overlay, str(path))
    if problems:
        raise ConfigError(problems)
    if base is None:
        tree, label = to_dict(Params()), "defaults"
    else:
        tree, label = _read(Path(base), "params file"), str(base)
        if tree is None:
            tree = CommentedMap()
        if not isinstance(tree, dict):
            raise ConfigError(f"{base}: must be a mapping of params sections, got {type(tree).__name__}")
    before = flatten(_plain(tree))
    _merge(tree, overlay)
    text = _dump(tree)
    raw = yaml.safe_load(text) or {}               # exactly what the stages will read
    params = params_from_dict(raw, f"{label} + {path}")
    after = flatten(raw)
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k, _MISSING) != v}
    return Expanded(path, text, params, changed)


def apply_preset(preset: str | Path, params: str | Path = "params.yaml",
                 out: str | Path = "params.yaml") -> Expanded:
    """Expand the preset onto ``params`` and write the result to ``out`` atomically (nothing is
    written when the overlay or the merged params are invalid)."""
    from ctsynth.core.io import write_text

    expanded = expand(preset, params)
    write_text(out, expanded.text)
    return expanded
