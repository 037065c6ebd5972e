"""The generate stage: every selected slice of every *test* case through the trained generator.

Writes ``fake.npy`` (float16 (N, S, S) in [-1, 1]) + ``index.npy`` (rows of the processed store),
the same two files for the *validation* cases in ``val/`` (what every choice of a default or a
variant is scored on: the test patients are scored only to report; for a model with anatomy
trained with ``train.anatomy_drop`` > 0 also ``heart_only/`` and ``val/heart_only/``: the same
slices drawn without the anatomy, the paper's condition and what a user with heart labels only gets),
a PNG grid per case (mask | real | generated | |difference|), the whole case re-assembled as a
synthetic CT volume in HU on the *original* grid and affine (``<case>_synth.nii.gz``), and
``condition_subsets.npz``: a few test slices drawn from the full condition set and from each single
structure, which the report renders (the report never loads a model), and ``model.json``: which
training made the slices and on what machine (evaluate copies it into ``metrics_notes.json``).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from ctsynth.core.accel import runtime_record
from ctsynth.core.errors import InputError, ModelFileError
from ctsynth.core.io import atomic_dir, from_canonical, load_nifti, save_nifti, write_json
from ctsynth.core.labels import WH
from ctsynth.core.paths import GENERATED_PROVENANCE, HEART_ONLY
from ctsynth.core.progress import quiet
from ctsynth.data import contrast, modality
from ctsynth.data.ingest import interim_anatomy_path, label_path
from ctsynth.data.noise import case_key
from ctsynth.data.preprocess import kept_indices
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore, evenly_spaced, neighbour_rows
from ctsynth.report.figures import save_case_grid
from ctsynth.synth.inference import MaskToCT, load_model

log = logging.getLogger(__name__)
SUBSETS_FILE = "condition_subsets.npz"


def condition_subset_panels(synth: MaskToCT, store: ProcessedStore, rows: np.ndarray, n_slices: int = 2,
                            levels: dict[str, float] | None = None):
    """A few test slices generated from the full condition set and from each single structure.

    The richest slice of each of the first ``n_slices`` test cases (``rows`` of the store); single
    structures absent from those slices are left out. Returns ``(subsets, panels, titles)``: the
    subsets drawn, ``[(row name, masks (K, S, S), images (K, S, S) in [-1, 1])]`` with the real
    slices first, and ``[(case, z)]`` per column (rendered by
    :func:`ctsynth.report.figures.fig_condition_subsets`). ``levels``: each case's contrast level
    (a model with the contrast control)."""
    cases = store.slices.case.to_numpy()[rows]
    picks = []                                        # the richest slice of each of the first cases
    for case in list(dict.fromkeys(cases))[: max(1, n_slices)]:
        own = rows[cases == case]
        picks.append(own[np.argmax([len(np.unique(store.masks[r])) for r in own])])
    picks = np.array(picks)
    full = list(synth.model_structures)
    masks = np.asarray(store.masks[picks])                                          # (K, S, S)
    present = [s for s in full if s != WH and np.isin(masks, kept_indices([s])).any()]
    subsets = [full] + ([[s] for s in present] if len(full) > 1 else [])
    panels = [("real", masks, np.asarray(store.images[picks], np.float32))]
    context = np.asarray(store.condition_masks[neighbour_rows(store, picks, synth.context)])  # (K, 2k+1, pS, pS)
    anatomy = store_anatomy(synth, store, picks)
    for subset in subsets:
        one = MaskToCT(synth.model, synth.meta, batch_size=len(picks), structures=subset, seed=synth.seed)
        kept = np.where(np.isin(masks, one.keep), masks, 0)
        drawn = one.unit(context, None if levels is None else contrast.row_levels(store, picks, levels), anatomy,
                         slice_keys(store, picks))
        panels.append(("+".join(subset) if subset != full else f"all ({len(full)})", kept, drawn))
    titles = [(str(store.slices.case.iloc[r]), int(store.slices.z.iloc[r])) for r in picks]
    return subsets, panels, titles


def save_condition_subsets(path: Path, subsets, panels, titles) -> None:
    """``condition_subsets.npz``: the panels as arrays, their names, subsets and titles as JSON."""
    np.savez_compressed(path, masks=np.stack([m for _, m, _ in panels]).astype(np.uint8),
                        images=np.stack([i for _, _, i in panels]).astype(np.float32),
                        names=json.dumps([n for n, _, _ in panels]), subsets=json.dumps(subsets),
                        titles=json.dumps(titles))


def _check_store_matches_model(store: ProcessedStore, meta: dict, model_path) -> None:
    problems = []
    absent = {"partial_volume": 1}                    # written only when > 1; the others always are
    for key in ("image_size", "hu_window", "structures", "partial_volume"):
        a, b = store.meta.get(key, absent.get(key)), meta.get(key, absent.get(key))
        if key == "hu_window" and a is not None and b is not None:
            a, b = [float(v) for v in a], [float(v) for v in b]
        if a != b:
            problems.append(f"{model_path}: trained with {key}={b} but the processed store has "
                            f"{key}={a}; rerun `dvc repro train`")
    if problems:
        raise ModelFileError(problems)


def store_anatomy(synth: MaskToCT, store: ProcessedStore, rows: np.ndarray) -> np.ndarray | None:
    """The rows' anatomy classes (N, pS, pS) for a model conditioned on them; None otherwise."""
    return np.asarray(store.condition_anatomy[rows]) if synth.anatomy is not None else None


def slice_keys(store: ProcessedStore, rows: np.ndarray) -> list[tuple[int, int]]:
    """The noise key of each store row (``model.noise``): its case and z, as :meth:`MaskToCT.volume`
    names the same slice of the case's volume (``key=(case_key(case),)``)."""
    rows = np.asarray(rows, np.int64)
    return [(case_key(c), int(z)) for c, z in zip(store.slices.case.to_numpy()[rows], store.slices.z.to_numpy()[rows])]


def generate_slices(synth: MaskToCT, store: ProcessedStore, rows: np.ndarray, folder: Path, what: str,
                    levels: dict[str, float] | None = None, *, heart_only: bool = False) -> np.ndarray:
    """The generator's slice for every store row: ``folder/fake.npy`` (float16 (N, S, S), returned
    memory-mapped) and ``folder/index.npy`` (the rows). ``levels``: each case's contrast level;
    ``heart_only``: a model with anatomy draws without it (blank channels), as for a user who has
    heart labels only."""
    context = neighbour_rows(store, rows, synth.context)                             # (N, 2k+1)
    fake = open_memmap(folder / "fake.npy", mode="w+", dtype=np.float16, shape=(len(rows),) + store.images.shape[1:])
    bs = synth.batch_size
    for i in tqdm(range(0, len(rows), bs), desc=f"generate {what} slices", unit="batch", disable=quiet()):
        level = None if levels is None else contrast.row_levels(store, rows[i:i + bs], levels)
        fake[i:i + bs] = synth.unit(np.asarray(store.condition_masks[context[i:i + bs]]), level,   # (B, 2k+1, pS, pS)
                                    None if heart_only else store_anatomy(synth, store, rows[i:i + bs]),
                                    slice_keys(store, rows[i:i + bs]))
    fake.flush()
    np.save(folder / "index.npy", rows.astype(np.int64))
    return fake


def provenance(meta: dict, device, contrast_used: dict | None = None, noise_seed: int | None = None) -> dict:
    """``model.json``: which training made these slices (step, seed, fingerprint) and on what
    machine it ran (:func:`ctsynth.core.accel.runtime_record`), where generation ran, (contrast
    control) the level each case was drawn at and (``model.noise``) the noise's seed and std."""
    extra, noise = meta.get("extra") or {}, meta.get("noise")
    return {"generator": {k: extra.get(k) for k in ("step", "seed", "fingerprint", "world_size", "precision",
                                                     "runtime")},
            "generate_runtime": runtime_record(device), "contrast": contrast_used,
            "noise": None if not noise else {"seed": noise_seed, "std_units": noise["std"]}}


def measured_levels(synth: MaskToCT, store: ProcessedStore, cases: list[str]) -> tuple[dict | None, dict | None]:
    """Contrast control: each case is drawn at the level measured on its real image (the control
    set to the patient's own contrast), clipped into the model's trained range. Returns
    ``(levels used, record for model.json)``; ``(None, None)`` without the control."""
    if synth.contrast is None:
        return None, None
    measured = contrast.case_levels(store, cases)
    used, clipped = contrast.clip_levels(measured, synth.contrast)
    if clipped:
        log.warning("generate: contrast level of %s outside the trained range %s HU: clipped", clipped,
                    synth.contrast["range_hu"])
    return used, {"measure": synth.contrast["measure"], "measured_hu": {c: round(v, 2) for c, v in measured.items()},
                  "used_hu": {c: round(v, 2) for c, v in used.items()}, "clipped": clipped}


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
    synth = MaskToCT(model, meta, batch_size=params.generate.batch_size, seed=params.generate.seed)
    rows = store.rows_for_cases(test)                                                # (N,)
    window = synth.window
    log.info("generate: %d test slices of %d cases %s on %s", len(rows), len(test), test, synth.device)

    val = [c for c in split.get("val", []) if c in store.meta["cases"]]
    levels, contrast_used = measured_levels(synth, store, test + val)
    with atomic_dir(out_dir) as tmp:
        (tmp / "grids").mkdir()
        start = time.perf_counter()
        fake = generate_slices(synth, store, rows, tmp, "test", levels)
        slices_rate, wall_rate = synth.throughput(), len(rows) / (time.perf_counter() - start)
        if synth.draws_heart_only:                                                   # the paper's condition
            (tmp / HEART_ONLY).mkdir()
            alone = generate_slices(synth, store, rows, tmp / HEART_ONLY, "test (heart only)", levels,
                                    heart_only=True)
            del alone                                                                # close the memory map
        if val:
            (tmp / "val").mkdir()
            val_fake = generate_slices(synth, store, store.rows_for_cases(val), tmp / "val", "validation", levels)
            del val_fake                                                             # close the memory map
            if synth.draws_heart_only:                                               # what drawing without costs
                (tmp / "val" / HEART_ONLY).mkdir()
                alone = generate_slices(synth, store, store.rows_for_cases(val), tmp / "val" / HEART_ONLY,
                                        "validation (heart only)", levels, heart_only=True)
                del alone                                                            # close the memory map
        for case in test:
            pos = np.flatnonzero(store.slices.case.to_numpy()[rows] == case)          # positions in fake
            pick = pos[evenly_spaced(len(pos), params.generate.grid_slices)]
            save_case_grid(tmp / "grids" / f"{case}.png", case, np.asarray(store.masks[rows[pick]]),
                           np.asarray(store.images[rows[pick]]), np.asarray(fake[pick]),
                           store.slices.z.to_numpy()[rows[pick]], window=window, unit=modality.unit(store.meta))
            labels_file = label_path(interim_dir, case)
            label = load_nifti(labels_file, role="label")
            info = store.meta["cases"][case]
            index_xyz = np.asanyarray(label.dataobj)                                  # (X, Y, Z) canonical
            if list(index_xyz.shape) != list(info["shape"]):
                raise InputError(f"{labels_file}: shape {index_xyz.shape} differs from the processed "
                                 f"store's {info['shape']} for case {case}; rerun preprocess")
            synth.set_level(None if levels is None else levels[case])
            anatomy_file = interim_anatomy_path(interim_dir, case) if synth.anatomy is not None else None
            anatomy = None if anatomy_file is None else np.asanyarray(load_nifti(anatomy_file, role="label").dataobj)
            canon = synth.volume(index_xyz, desc=f"volume {case}", anatomy_xyz=anatomy, key=(case_key(case),))
            orig_affine = np.asarray(info["orig_affine"], dtype=np.float64)
            vol = from_canonical(canon, orig_affine)
            if list(vol.shape) != list(info["orig_shape"]):
                raise InputError(f"{case}: reoriented volume {vol.shape} != original {info['orig_shape']}")
            save_nifti(tmp / f"{case}_synth.nii.gz", vol, orig_affine, dtype=np.int16)
        save_condition_subsets(tmp / SUBSETS_FILE, *condition_subset_panels(synth, store, rows, levels=levels))
        write_json(tmp / GENERATED_PROVENANCE, provenance(meta, synth.device, contrast_used, synth.seed))
        del fake
    log.info("generate: %d test slices at %.1f slices/s (generator; %.1f slices/s with data loading), "
             "batch %d; %d volumes, %d grids -> %s", len(rows), slices_rate, wall_rate,
             synth.batch_size, len(test), len(test), out_dir)
    return {"slices": int(len(rows)), "cases": test, "slices_per_s": float(slices_rate),
            "slices_per_s_end_to_end": float(wall_rate)}


