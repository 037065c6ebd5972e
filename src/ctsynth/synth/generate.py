"""generate: trained generator -> synthetic CT, for the test set (stage) and for any mask (CLI).

Two entry points share one engine (:class:`Synthesizer`):

* :func:`run` (``stages/generate.py``): every selected slice of every *test* case
  of the processed store -> ``fake.npy`` (float16 (N, S, S) in [-1, 1]) + ``index.npy`` (rows of
  the store), a PNG grid per case (mask | real | generated | |difference|) and the whole case
  re-assembled as a synthetic CT volume in HU on the *original* grid and affine.
* :func:`synthesize_volume` (``ctsynth generate``): any label NIfTI -> synthetic CT NIfTI with
  the same shape, orientation and affine, using the preprocessing stored in the model file.

Geometry of one volume: original grid --io_orientation--> canonical RAS ``(X, Y, Z)`` -> per axial
slice :func:`ctsynth.preprocess.to_display` + nearest resize to ``S x S`` -> generator ->
:func:`ctsynth.preprocess.restore_slice` (resize back, HU) -> canonical -> original orientation.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from numpy.lib.format import open_memmap
from skimage.transform import resize
from tqdm import tqdm

from ctsynth.core.accel import pick_device
from ctsynth.data.store import ProcessedStore, condition_batch, context_masks, neighbour_rows
from ctsynth.core.errors import ConfigError, InputError, ModelFileError
from ctsynth.report.figures import save_case_grid
from ctsynth.core.io import atomic_dir, load_nifti, save_nifti
from ctsynth.core.labels import (STRUCTURES, WH, condition_channels, parse_label_map, structure_index,
                     validate_structures)
from ctsynth.data.preprocess import kept_indices, restore_slice, to_display
from ctsynth.core.progress import quiet
from ctsynth.data.split import load_split

log = logging.getLogger("ctsynth.synth.generate")

RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


# ------------------------------------------------------------------------------ the engine

def load_model(model_path: str | Path, device: str = "auto") -> tuple[torch.nn.Module, dict]:
    """``(generator in eval mode, preprocessing meta)`` from a file written by
    :func:`ctsynth.models.save_generator`; ModelFileError for a missing/corrupt file.

    The meta is flat: image_size, hu_window, structures, label_map, encoding (as the model was
    trained) plus in_channels and model_cfg."""
    from ctsynth.train.networks import load_generator

    path = Path(model_path)
    model, blob = load_generator(path, device=pick_device(device))
    meta = {**dict(blob.get("preprocess") or {}), "in_channels": blob.get("in_channels"),
            "model_cfg": blob.get("model_cfg"),
            "context_slices": int((blob.get("model_cfg") or {}).get("context_slices", 0))}  # older files: 0
    missing = [k for k in ("image_size", "hu_window", "structures", "encoding") if k not in meta]
    if missing:
        raise ModelFileError(f"{path}: model file lacks preprocessing info {missing}; "
                             f"retrain with this version of ctsynth")
    k = meta["context_slices"]
    expected = condition_channels(list(meta["structures"]), meta["encoding"]) * (2 * k + 1)
    if meta["in_channels"] != expected:
        raise ModelFileError(f"{path}: model takes {meta['in_channels']} condition channels but its "
                             f"structures {meta['structures']} ({meta['encoding']}, context_slices {k}) "
                             f"need {expected}")
    return model.eval(), meta


class Synthesizer:
    """A generator plus the exact preprocessing it was trained with.

    ``structures`` is the condition subset actually drawn (default: the model's); channels of
    the model's other structures stay empty, so a subset needs no retraining.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, batch_size: int = 32,
                 structures: list[str] | None = None):
        self.meta = meta
        self.size = int(meta["image_size"])
        self.window = [float(v) for v in meta["hu_window"]]
        self.model_structures = list(meta["structures"])
        self.encoding = meta["encoding"]
        self.structures = list(structures) if structures else self.model_structures
        self.keep = kept_indices(self.structures)
        self.batch_size = int(batch_size)
        self.context = int(meta.get("context_slices", 0))       # 2.5-D: neighbours on each side
        self.device = next(model.parameters()).device
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.slices_done, self.seconds = 0, 0.0

    # (N, S, S) uint8 structure indices, or (N, 2k+1, S, S) with each slice's neighbours (z-k..z+k)
    # when the model has context_slices k -> (N, S, S) float32 in [-1, 1]
    @torch.inference_mode()
    def unit(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks)
        if masks.ndim == 3 and self.context == 0:
            masks = masks[:, None]                                                  # (N, 1, S, S)
        if masks.ndim != 4 or masks.shape[1] != 2 * self.context + 1:
            raise InputError(f"generator with context_slices={self.context} needs masks (N, "
                             f"{2 * self.context + 1}, S, S) of each slice and its neighbours, got {masks.shape}")
        out = np.empty((len(masks),) + masks.shape[2:], np.float32)
        start = time.perf_counter()
        for i in range(0, len(masks), self.batch_size):
            chunk = masks[i:i + self.batch_size]
            chunk = np.where(np.isin(chunk, self.keep), chunk, 0)                    # (B, S, S)
            cond = condition_batch(chunk, self.model_structures, self.encoding)      # (B, (2k+1)C, S, S)
            cond = cond.to(self.device).contiguous(memory_format=torch.channels_last)
            fake = self.model(cond)                                                 # (B, 1, S, S)
            out[i:i + len(chunk)] = fake[:, 0].float().clamp_(-1, 1).cpu().numpy()
        self.seconds += time.perf_counter() - start
        self.slices_done += len(masks)
        return out

    def mask_to_model(self, mask_xy: np.ndarray) -> np.ndarray:
        """Canonical structure-index slice (X, Y) -> model-size display slice (S, S) uint8.

        Same geometry as :func:`ctsynth.preprocess.prepare_slice` (display orientation, nearest)."""
        mask = resize(to_display(mask_xy), (self.size, self.size), order=0, anti_aliasing=False,
                      preserve_range=True)
        return np.where(np.isin(mask, self.keep), mask, 0).astype(np.uint8)

    def volume(self, index_xyz: np.ndarray, desc: str = "volume") -> np.ndarray:
        """Canonical structure-index volume (X, Y, Z) -> synthetic CT (X, Y, Z) int16 HU.

        Streams ``batch_size`` slices at a time through the generator, so memory stays ~ one output
        volume plus the model-size uint8 masks. With ``context_slices`` k each slice's condition
        holds its k neighbours on each side (the volume's end slices repeat past its ends)."""
        nx, ny, nz = index_xyz.shape
        lo, hi = self.window
        out = np.empty((nx, ny, nz), np.int16)
        masks = np.stack([self.mask_to_model(np.asarray(index_xyz[:, :, z])) for z in range(nz)])  # (Z, S, S)
        masks = context_masks(masks, self.context)                                    # (Z, 2k+1, S, S)
        for z0 in tqdm(range(0, nz, self.batch_size), desc=desc, unit="batch", disable=quiet()):
            zs = range(z0, min(nz, z0 + self.batch_size))
            fake = self.unit(masks[z0:zs.stop])                                      # (B, S, S)
            for j, z in enumerate(zs):
                hu = restore_slice(fake[j], (nx, ny), self.window)                   # (X, Y) HU
                out[:, :, z] = np.rint(np.clip(hu, lo, hi)).astype(np.int16)
        return out

    def throughput(self) -> float:
        return self.slices_done / self.seconds if self.seconds > 0 else float("nan")


def to_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel array on ``affine``'s grid -> closest canonical RAS+ (as nibabel.as_closest_canonical)."""
    return nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: canonical RAS+ array -> the orientation of ``affine``."""
    ornt = nib.orientations.ornt_transform(RAS, nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))


def condition_subset_panels(model_path, processed_dir, split_path, n_slices: int = 2):
    """A few test slices generated from the full condition set and from each single structure.

    The richest slice of each of the first ``n_slices`` test cases; single structures absent
    from those slices are left out. Returns ``(subsets, panels, titles)``: the subsets drawn,
    ``[(row name, masks (K, S, S), images (K, S, S) in [-1, 1])]`` with the real slices first,
    and ``[(case, z)]`` per column (rendered by :func:`ctsynth.figures.fig_condition_subsets`)."""
    store = ProcessedStore(processed_dir)
    test = load_split(split_path).get("test", [])
    rows = store.rows_for_cases(test)
    if not len(rows):
        raise InputError(f"{split_path}: no test slices in {processed_dir}")
    cases = store.slices.case.to_numpy()[rows]
    picks = []                                        # the richest slice of each of the first cases
    for case in list(dict.fromkeys(cases))[: max(1, n_slices)]:
        own = rows[cases == case]
        picks.append(own[np.argmax([len(np.unique(store.masks[r])) for r in own])])
    picks = np.array(picks)
    model, meta = load_model(model_path)
    full = list(meta["structures"])
    masks = np.asarray(store.masks[picks])                                          # (K, S, S)
    present = [s for s in full if s != WH and np.isin(masks, kept_indices([s])).any()]
    subsets = [full] + ([[s] for s in present] if len(full) > 1 else [])
    panels = [("real", masks, np.asarray(store.images[picks], np.float32))]
    context = np.asarray(store.masks[neighbour_rows(store, picks, meta["context_slices"])])  # (K, 2k+1, S, S)
    for subset in subsets:
        synth = Synthesizer(model, meta, batch_size=len(picks), structures=subset)
        kept = np.where(np.isin(masks, synth.keep), masks, 0)
        panels.append(("+".join(subset) if subset != full else f"all ({len(full)})", kept, synth.unit(context)))
    titles = [(store.slices.case.iloc[r], store.slices.z.iloc[r]) for r in picks]
    return subsets, panels, titles


def evenly_spaced(n_items: int, k: int) -> np.ndarray:
    """``k`` evenly spaced positions in ``range(n_items)`` (all when k >= n_items)."""
    if n_items <= k:
        return np.arange(n_items)
    return np.unique(np.linspace(0, n_items - 1, k).round().astype(int))


# ------------------------------------------------------------------------------ the stage

def _check_store_matches_model(store: ProcessedStore, meta: dict, model_path) -> None:
    problems = []
    for key in ("image_size", "hu_window", "structures"):
        a, b = store.meta.get(key), meta.get(key)
        if key == "hu_window":
            a, b = [float(v) for v in a], [float(v) for v in b]
        if a != b:
            problems.append(f"{model_path}: trained with {key}={b} but the processed store has "
                            f"{key}={a}; rerun `dvc repro train`")
    if problems:
        raise ModelFileError(problems)


def _label_path(interim_dir: Path, case: str) -> Path:
    manifest = interim_dir / "manifest.csv"
    if manifest.exists():
        import pandas as pd

        frame = pd.read_csv(manifest, dtype={"case": str})
        row = frame.loc[frame.case == case]
        if len(row) and "label_file" in frame:
            return interim_dir / str(row.label_file.iloc[0])
    return interim_dir / f"{case}_label.nii"


def run(params, model_path, processed_dir, split_path, interim_dir, out_dir) -> dict:
    """Run the generator on the test cases; write fake.npy, index.npy, grids/, <case>_synth.nii.gz.

    Returns ``{"slices", "cases", "slices_per_s", "slices_per_s_end_to_end"}``."""
    store = ProcessedStore(processed_dir)
    split_path, interim_dir = Path(split_path), Path(interim_dir)
    split = load_split(split_path)
    test = [c for c in split.get("test", []) if c in store.meta["cases"]]
    if not test:
        raise InputError(f"{split_path}: no test case found in the processed store {processed_dir}")
    model, meta = load_model(model_path)
    _check_store_matches_model(store, meta, model_path)
    synth = Synthesizer(model, meta, batch_size=params.generate.batch_size)
    rows = store.rows_for_cases(test)                                                # (N,)
    context = neighbour_rows(store, rows, synth.context)                             # (N, 2k+1)
    window = synth.window
    log.info("generate: %d test slices of %d cases %s on %s", len(rows), len(test), test, synth.device)

    with atomic_dir(out_dir) as tmp:
        (tmp / "grids").mkdir()
        fake = open_memmap(tmp / "fake.npy", mode="w+", dtype=np.float16,
                           shape=(len(rows),) + store.images.shape[1:])              # (N, S, S)
        bs, start = synth.batch_size, time.perf_counter()
        for i in tqdm(range(0, len(rows), bs), desc="generate slices", unit="batch", disable=quiet()):
            fake[i:i + bs] = synth.unit(np.asarray(store.masks[context[i:i + bs]]))  # (B, 2k+1, S, S) -> (B, S, S)
        fake.flush()
        np.save(tmp / "index.npy", rows.astype(np.int64))
        slices_rate, wall_rate = synth.throughput(), len(rows) / (time.perf_counter() - start)
        for case in test:
            pos = np.flatnonzero(store.slices.case.to_numpy()[rows] == case)          # positions in fake
            pick = pos[evenly_spaced(len(pos), params.generate.grid_slices)]
            save_case_grid(tmp / "grids" / f"{case}.png", case, np.asarray(store.masks[rows[pick]]),
                           np.asarray(store.images[rows[pick]]), np.asarray(fake[pick]),
                           store.slices.z.to_numpy()[rows[pick]], window)
            label_path = _label_path(interim_dir, case)
            label = load_nifti(label_path, role="label")
            info = store.meta["cases"][case]
            index_xyz = np.asanyarray(label.dataobj)                                  # (X, Y, Z) canonical
            if list(index_xyz.shape) != list(info["shape"]):
                raise InputError(f"{label_path}: shape {index_xyz.shape} differs from the processed "
                                 f"store's {info['shape']} for case {case}; rerun preprocess")
            canon = synth.volume(index_xyz, desc=f"volume {case}")
            orig_affine = np.asarray(info["orig_affine"], dtype=np.float64)
            vol = from_canonical(canon, orig_affine)
            if list(vol.shape) != list(info["orig_shape"]):
                raise InputError(f"{case}: reoriented volume {vol.shape} != original {info['orig_shape']}")
            save_nifti(tmp / f"{case}_synth.nii.gz", vol, orig_affine, dtype=np.int16)
        del fake
    log.info("generate: %d test slices at %.1f slices/s (generator; %.1f slices/s with data loading), "
             "batch %d; %d volumes, %d grids -> %s", len(rows), slices_rate, wall_rate,
             synth.batch_size, len(test), len(test), out_dir)
    return {"slices": int(len(rows)), "cases": test, "slices_per_s": float(slices_rate),
            "slices_per_s_end_to_end": float(wall_rate)}


# ------------------------------------------------------------------------------ the CLI core

def parse_label_map_arg(value) -> dict[int, str] | None:
    """``--label-map``: None, a dict, inline JSON (``'{"1": "LV"}'``) or a JSON/YAML file path.

    Files are read with json / yaml.safe_load only (no eval, no pickle)."""
    if value is None or isinstance(value, dict):
        return None if value is None else parse_label_map(value, where="--label-map")
    text = str(value).strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--label-map: not valid JSON ({e}); example: '{{\"1\": \"Ao\"}}'") from None
        return parse_label_map(raw, where="--label-map")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--label-map: {text!r} is neither inline JSON nor an existing file")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: label map file is not valid JSON/YAML ({e})") from None
    return parse_label_map(raw, where=str(path))


def _structures_arg(structures, model_structures: list[str]) -> list[str]:
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


def index_volume(path: Path, data: np.ndarray, label_map: dict[int, str],
                  structures: list[str], unknown: str = "background") -> tuple[np.ndarray, dict]:
    """Raw mask values -> structure indices (uint8). Values outside the label map become
    background with a warning (``unknown="background"``) or are an InputError (``"error"``)."""
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: mask contains NaN/Inf values")
        if np.any(data != np.round(data)):
            sample = np.unique(data[data != np.round(data)])[:5].tolist()
            raise InputError(f"{path}: mask holds non-integer values (e.g. {sample}); "
                             f"a label mask must hold integer label values")
    elif data.dtype.kind not in "iub":
        raise InputError(f"{path}: mask has unsupported data type {data.dtype}")
    values = [int(v) for v in np.unique(data) if v != 0]
    selected = set(STRUCTURES) if WH in structures else set(structures)
    expected = {v: n for v, n in label_map.items() if n in selected}
    if not expected:
        raise ConfigError(f"label map {label_map} names none of the selected structures "
                          f"{sorted(selected)}; check --label-map / --structures")
    if not set(values) & set(expected):
        raise InputError(f"{path}: mask has none of the expected label values "
                         f"{ {v: expected[v] for v in sorted(expected)} }; it contains values "
                         f"{values[:20]}{' …' if len(values) > 20 else ''}. Pass --label-map to say "
                         f"which value is which structure")
    outside = [v for v in values if v not in label_map]
    if outside and unknown == "error":
        raise InputError(f"{path}: label values {outside[:20]} are not in the label map {label_map}; "
                         f"pass --label-map naming every value")
    if outside:
        log.warning("%s: label values %s are not in the label map %s; treated as background",
                    path, outside[:20], label_map)
    lut_values = np.array(sorted(label_map), dtype=np.int64)
    lut_index = np.array([structure_index(label_map[v]) for v in lut_values], dtype=np.uint8)
    out = np.zeros(data.shape, np.uint8)
    for v, idx in zip(lut_values, lut_index):
        out[data == v] = idx
    return out, {"values_found": values, "unknown_values": outside,
                 "used": {v: expected[v] for v in sorted(set(values) & set(expected))}}


def synthesize_volume(model_path, mask_path, out_path, structures=None, label_map=None,
                      batch_size: int = 32, device: str = "auto") -> dict:
    """Label NIfTI -> synthetic CT NIfTI (int16 HU), same shape, orientation and affine.

    ``label_map``: dict, inline JSON or JSON/YAML file (default: the model's); ``structures``:
    subset of the model's structures to draw (default: all of them). Returns statistics."""
    model, meta = load_model(model_path, device)
    lmap = (parse_label_map_arg(label_map)
            or parse_label_map(meta.get("label_map") or {}, where=f"{model_path} label_map"))
    chosen = _structures_arg(structures, meta["structures"])
    mask_path = Path(mask_path)
    img = load_nifti(mask_path, role="mask")
    index, info = index_volume(mask_path, np.asanyarray(img.dataobj), lmap, chosen)
    synth = Synthesizer(model, meta, batch_size=batch_size, structures=chosen)
    canon = synth.volume(to_canonical(index, img.affine), desc="generate")           # (X, Y, Z) RAS
    vol = from_canonical(canon, img.affine)                                          # input grid
    save_nifti(out_path, vol, img.affine, dtype=np.int16)
    stats = {"mask": str(mask_path), "out": str(out_path), "shape": list(vol.shape),
             "slices": int(vol.shape[2]), "structures": chosen, "slices_per_s": round(synth.throughput(), 1),
             "hu_min": int(vol.min()), "hu_max": int(vol.max()), **info}
    log.info("generate: %s -> %s, %d slices at %.1f slices/s, HU %d..%d", mask_path, out_path,
             stats["slices"], stats["slices_per_s"], stats["hu_min"], stats["hu_max"])
    return stats
