"""synthesize: new labelled cases — training masks warped into novel anatomies, CT drawn by the generator.

For each new case a *source* label volume is picked (the stage uses the split's training cases
only, never validation or test; the CLI any folder of label NIfTIs), and a random 3-D spatial
transform is drawn and applied once to all its structures, nearest-neighbour, on the source's own
grid (in canonical RAS space, so the rotation axes are anatomical):

* an affine about the volume centre, in millimetres: rotation about x, y and z, anisotropic
  scale, translation — composed by :func:`kornia.geometry.transform.get_affine_matrix3d`;
* a smooth deformation: random displacements (uniform in ±``deform_mm``) on a coarse control
  grid (``deform_grid_mm`` apart), trilinearly upsampled to every voxel.

A draw is rejected and redrawn (up to ``max_attempts``) when a selected structure vanishes (keeps
fewer than :data:`MIN_KEPT` of its voxels, e.g. pushed out of the field of view) or falls into more
connected pieces (26-connectivity) than the source had. Each case's draw comes from its own
seeded generator ``numpy.random.default_rng([seed, case number])``; ``manifest.csv`` records the
source, that seed, the attempt that was kept and every drawn parameter, so a case can be redrawn.

The generator (:class:`ctsynth.synth.inference.MaskToCT`, with the preprocessing stored in the model
file) then draws a CT for every axial slice, assembled on the label's grid and written with the
label's affine in the source's orientation, int16 HU.

Layouts (the folder is written atomically):

* ``pairs`` (default): ``<id><image_suffix>`` + ``<id><label_suffix>`` with the source's raw label
  values — the layout ``ingest`` reads, so the folder can be used as ``data.raw_dir``;
* ``nnunet``: ``imagesTr/<id>_0000.nii.gz`` + ``labelsTr/<id>.nii.gz`` with labels 1..K in the
  order of ``dataset.json`` (nnU-Net v2 requires consecutive labels) and ``dataset.json``.

Both add ``manifest.csv``.

    python stages/synthesize.py --model models/generator.pt --interim data/interim \\
        --split data/split.json --out data/synthetic
    ctsynth synthesize --labels my_masks/ --out synth/ --cases 50 --layout nnunet
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from kornia.geometry.linalg import transform_points
from kornia.geometry.transform import get_affine_matrix3d
from skimage.measure import label as connected_components
from tqdm import tqdm

from ctsynth.core.config import Params, SynthesizeCfg
from ctsynth.core.errors import ConfigError, InputError, ModelFileError
from ctsynth.core.io import atomic_dir, from_canonical, load_nifti, save_nifti, to_canonical, write_csv
from ctsynth.core.labels import STRUCTURES, parse_label_map
from ctsynth.core.progress import quiet
from ctsynth.data import contrast
from ctsynth.data.ingest import interim_anatomy_path, label_path
from ctsynth.data.masks import index_volume, parse_label_map_arg, structures_arg
from ctsynth.data.split import load_split
from ctsynth.synth.inference import MaskToCT, load_model

log = logging.getLogger("ctsynth.synth.synthesize")

LAYOUTS = ("pairs", "nnunet")
MIN_KEPT = 0.5          # a structure keeping fewer than this share of its source voxels "vanished"


# ------------------------------------------------------------------------------ the spatial draw

@dataclass
class Draw:
    """One random spatial transform (all in canonical RAS millimetres)."""
    rotation_deg: np.ndarray     # (3,) about x, y, z
    scale: np.ndarray            # (3,) per axis
    shift_mm: np.ndarray         # (3,)
    deform_mm: np.ndarray        # (3, gx, gy, gz) displacement at the control points

    def record(self) -> dict:
        r = {f"rot_{a}_deg": round(float(v), 3) for a, v in zip("xyz", self.rotation_deg)}
        r.update({f"scale_{a}": round(float(v), 4) for a, v in zip("xyz", self.scale)})
        r.update({f"shift_{a}_mm": round(float(v), 2) for a, v in zip("xyz", self.shift_mm)})
        r["deform_max_mm"] = round(float(np.abs(self.deform_mm).max()), 2) if self.deform_mm.size else 0.0
        r["deform_grid"] = "x".join(str(n) for n in self.deform_mm.shape[1:])
        return r


def draw_transform(rng: np.random.Generator, cfg: SynthesizeCfg, extent_mm) -> Draw:
    """Uniform draws within the configured ranges; the control grid spans ``extent_mm`` (3,)."""
    rotation = rng.uniform(-1, 1, 3) * np.asarray(cfg.rotation_deg, float)
    scale = rng.uniform(cfg.scale[0], cfg.scale[1], 3)
    shift = rng.uniform(-1, 1, 3) * np.asarray(cfg.shift_mm, float)
    grid = np.maximum(2, np.ceil(np.asarray(extent_mm) / cfg.deform_grid_mm).astype(int) + 1)
    deform = rng.uniform(-1, 1, (3, *grid)) * cfg.deform_mm
    return Draw(rotation, scale, shift, deform)


def sampling_grid(shape, spacing, draw: Draw) -> torch.Tensor:
    """Where each output voxel reads the source: ``grid_sample`` coordinates (1, X, Y, Z, 3).

    Output voxel y (mm) reads the source at ``A⁻¹·y + d(y)``: A = the affine about the volume
    centre, d = the upsampled control-point displacements."""
    shape = tuple(int(n) for n in shape)
    spacing_t = torch.tensor(spacing, dtype=torch.float64)
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) * spacing_t / 2
    A = get_affine_matrix3d(torch.tensor(draw.shift_mm)[None], centre[None],
                            torch.tensor(draw.scale)[None], torch.tensor(draw.rotation_deg)[None])  # (1, 4, 4)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)                   # (X, Y, Z, 3)
    mm = transform_points(torch.linalg.inv(A), (voxels * spacing_t).reshape(1, -1, 3))
    mm = mm.reshape(*shape, 3)
    if draw.deform_mm.size and np.any(draw.deform_mm):
        field = F.interpolate(torch.tensor(draw.deform_mm)[None], size=shape, mode="trilinear",
                              align_corners=True)[0]                                  # (3, X, Y, Z)
        mm = mm + field.permute(1, 2, 3, 0)
    index = mm / spacing_t                                                            # source voxels
    norm = 2 * index / (torch.tensor(shape, dtype=torch.float64) - 1).clamp_min(1) - 1
    return norm.flip(-1)[None].float()          # grid_sample wants (W, H, D) = (z, y, x) order


def warp_labels(index_xyz: np.ndarray, spacing, draw: Draw) -> np.ndarray:
    """Structure-index volume (X, Y, Z) -> the same grid after ``draw``; nearest, outside = 0."""
    src = torch.from_numpy(np.ascontiguousarray(index_xyz, dtype=np.float32))[None, None]
    out = F.grid_sample(src, sampling_grid(index_xyz.shape, spacing, draw), mode="nearest",
                        padding_mode="zeros", align_corners=True)
    return out[0, 0].round().to(torch.uint8).numpy()


def _pieces(mask: np.ndarray) -> int:
    return int(connected_components(mask, connectivity=3, return_num=True)[1])


def topology_problems(src: np.ndarray, out: np.ndarray, keep: list[int]) -> list[str]:
    """Why a warped volume is rejected: a kept structure vanished or split into new pieces."""
    problems = []
    for idx in keep:
        n_src = int((src == idx).sum())
        if n_src == 0:
            continue
        n_out = int((out == idx).sum())
        name = STRUCTURES[idx - 1]
        if n_out < MIN_KEPT * n_src:
            problems.append(f"{name} vanished ({n_out} of {n_src} voxels left)")
            continue
        before, after = _pieces(src == idx), _pieces(out == idx)
        if after > before:
            problems.append(f"{name} split into {after} pieces (source: {before})")
    return problems


# ------------------------------------------------------------------------------ the dataset

@dataclass
class Source:
    """A label volume to warp: ``load() -> (canonical structure indices (X, Y, Z) uint8, affine)``
    where the affine is the source's own (the output is written in its orientation); ``anatomy()``:
    its canonical body / lung / bone classes on the same grid, warped with it (None: none)."""
    name: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    anatomy: Callable[[], np.ndarray] | None = None


def _write_case(out: Path, layout: str, case: str, image: np.ndarray, labels: np.ndarray,
                affine: np.ndarray, *, suffixes: tuple[str, str]) -> tuple[str, str]:
    if layout == "nnunet":
        files = (f"imagesTr/{case}_0000.nii.gz", f"labelsTr/{case}.nii.gz")
    else:
        files = (case + suffixes[0], case + suffixes[1])
    save_nifti(out / files[0], image, affine, dtype=np.int16)
    save_nifti(out / files[1], labels, affine, dtype=np.int16)
    return files


def output_values(keep: list[int], label_map: dict[int, str], layout: str) -> dict[int, int]:
    """Structure index -> label value written: the raw value of the label map (its smallest, when
    several name the structure) for ``pairs``; 1..K in ``keep`` order for ``nnunet``."""
    if layout == "nnunet":
        return {idx: k for k, idx in enumerate(keep, 1)}
    raw = {}
    for value, name in sorted(label_map.items()):
        raw.setdefault(STRUCTURES.index(name) + 1, value)
    return {idx: raw[idx] for idx in keep if idx in raw}


def synthesize_dataset(synth: MaskToCT, sources: list[Source], cfg: SynthesizeCfg, out_dir,
                       label_map: dict[int, str], layout: str = "pairs",
                       *, suffixes: tuple[str, str] = ("_image.nii.gz", "_label.nii.gz"),
                       prefix: str = "synth", anatomy_suffix: str = "_anatomy.nii.gz") -> pd.DataFrame:
    """Write ``cfg.cases`` new labelled cases into ``out_dir`` (atomically); return the manifest.

    Case i warps ``sources[i % len(sources)]`` with a draw from ``default_rng([cfg.seed, i])``; a
    source's anatomy is warped by the same draw, conditions a model with ``model.anatomy`` and, in
    the ``pairs`` layout, is written as ``<case><anatomy_suffix>`` (classes 1 body, 2 lung, 3 bone:
    ingestible with ``data.anatomy.source: supplied``, preset ``ctsynth``). A model with a noise model
    (``model.noise``) adds it to every case, slice z of case i from ``(cfg.seed, i, 2, z)``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if not sources:
        raise InputError("synthesize: no source label volumes")
    keep = list(synth.keep)
    values = output_values(keep, label_map, layout)
    missing = [STRUCTURES[i - 1] for i in keep if i not in values]
    if missing:
        raise ConfigError(f"label map {label_map} has no value for the model's structures {missing}")
    rows, lut = [], np.zeros(256, np.int16)
    for idx, value in values.items():
        lut[idx] = value
    width = max(4, len(str(cfg.cases)))
    synth.set_level(cfg.contrast, "synthesize.contrast")                 # refused before any work if out of range
    synth.seed = cfg.seed                                                # the noise of model.noise, if any
    with atomic_dir(out_dir) as tmp:
        if layout == "nnunet":
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
        for i in tqdm(range(cfg.cases), desc="synthesize", unit="case", disable=quiet()):
            source = sources[i % len(sources)]
            index, affine = source.load()
            src = np.where(np.isin(index, keep), index, 0).astype(np.uint8)
            warped, draw, attempt = _accepted_draw(src, affine, cfg, i, source.name, keep)
            anatomy = None if source.anatomy is None else \
                warp_labels(source.anatomy(), np.linalg.norm(np.asarray(affine)[:3, :3], axis=0), draw)
            case = f"{prefix}_{i + 1:0{width}d}"
            level = case_level(synth, cfg, i)
            image = synth.volume(warped, desc=case,                                  # (X, Y, Z) int16 HU
                                 anatomy_xyz=anatomy if synth.anatomy is not None else None, key=(i, 2))
            files = _write_case(tmp, layout, case, from_canonical(image, affine),
                                from_canonical(lut[warped], affine), affine, suffixes=suffixes)
            anatomy_file = case + anatomy_suffix if anatomy is not None and layout == "pairs" else ""
            if anatomy_file:
                save_nifti(tmp / anatomy_file, from_canonical(anatomy, affine), affine, dtype=np.uint8)
            counts = np.bincount(warped.ravel(), minlength=len(STRUCTURES) + 1)
            rows.append({"case": case, "source": source.name, "draw_seed": f"{cfg.seed}:{i}",
                         "attempt": attempt, **draw.record(), "image_file": files[0], "label_file": files[1],
                         "anatomy_file": anatomy_file,
                         **resolution_record(warped.shape, affine, synth.size),
                         "contrast_hu": np.nan if level is None else round(level, 2),
                         **{f"vox_{STRUCTURES[k - 1]}": int(counts[k]) for k in keep}})
        manifest = pd.DataFrame(rows)
        write_csv(tmp / "manifest.csv", manifest)
        if layout == "nnunet":
            write_dataset_json(tmp, values, len(rows), synth.meta)
    log.info("synthesize: %d cases from %d sources -> %s (%s layout), %d redraws, generator %.1f slices/s",
             len(rows), len(sources), out_dir, layout, int(manifest.attempt.sum() - len(rows)),
             synth.throughput())
    return manifest


def case_level(synth: MaskToCT, cfg: SynthesizeCfg, i: int) -> float | None:
    """Set and return case ``i``'s contrast level: ``cfg.contrast``, or a draw from the training
    cases' distribution by ``default_rng([seed, i, 1])`` (apart from the spatial draws, which stay
    what they were without the control). None: the model has no contrast control."""
    if synth.contrast is None:
        return None
    if cfg.contrast is not None:
        return synth.level
    return synth.set_level(contrast.draw(np.random.default_rng([cfg.seed, i, 1]), synth.contrast))


def resolution_record(shape, affine: np.ndarray, model_size: int) -> dict:
    """What the CT's in-plane detail really is: the generator draws each axial slice at
    ``model_size``² and the result is resized to the label grid, so the effective spacing is the
    field of view over ``model_size`` (the grid's own spacing when the grid is not finer)."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)                      # mm per axis
    eff = [max(float(spacing[a]), float(spacing[a]) * shape[a] / model_size) for a in (0, 1)]
    return {"model_size": int(model_size), "spacing_x_mm": round(float(spacing[0]), 4),
            "spacing_y_mm": round(float(spacing[1]), 4), "effective_spacing_x_mm": round(eff[0], 4),
            "effective_spacing_y_mm": round(eff[1], 4)}


def _accepted_draw(src: np.ndarray, affine: np.ndarray, cfg: SynthesizeCfg, i: int, name: str,
                   keep: list[int]) -> tuple[np.ndarray, Draw, int]:
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)                      # mm per axis
    extent = (np.array(src.shape) - 1) * spacing
    rng = np.random.default_rng([cfg.seed, i])
    reasons = []
    for attempt in range(1, cfg.max_attempts + 1):
        draw = draw_transform(rng, cfg, extent)
        warped = warp_labels(src, spacing, draw)
        problems = topology_problems(src, warped, keep)
        if not problems:
            return warped, draw, attempt
        reasons.append("; ".join(problems))
    raise InputError(f"{name}: no acceptable spatial draw in {cfg.max_attempts} attempts (case {i + 1}); "
                     f"last: {reasons[-1]}. Narrow the synthesize ranges or raise synthesize.max_attempts")


def write_dataset_json(out: Path, values: dict[int, int], n: int, meta: dict, name: str = "ctsynth-synthetic") -> None:
    """nnU-Net v2 ``dataset.json``: ``values`` maps structure index -> label value 1..K. The channel is
    named by ``meta["modality"]`` (CT when absent): nnU-Net normalises "CT" by its HU statistics and
    any other name (here "MR") per image."""
    labels = {"background": 0, **{STRUCTURES[idx - 1]: k for idx, k in values.items()}}
    kind = str(meta.get("modality") or "ct").upper()
    dataset = {"name": name, "description": f"synthetic {kind} from warped training masks "
               "(ctsynth synthesize)", "channel_names": {"0": kind}, "labels": labels,
               "numTraining": n, "file_ending": ".nii.gz",
               "ctsynth": {"structures": meta.get("structures"), "image_size": meta.get("image_size")}}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


# ------------------------------------------------------------------------------ entry points

def check_model_structures(meta: dict, structures: list[str], model_path) -> None:
    """The model must have been trained for the structures the pipeline selects."""
    if list(meta["structures"]) != list(structures):
        raise ModelFileError(f"{model_path}: trained for structures {list(meta['structures'])} but "
                             f"preprocess.structures is {list(structures)}; rerun `dvc repro train` "
                             f"or use a model trained for these structures")


def run(params: Params, model_path, interim_dir, split_path, out_dir) -> pd.DataFrame:
    """The stage: ``synthesize.cases`` new pairs from the *training* cases into ``out_dir``."""
    train = load_split(split_path, need=("train",))["train"]
    model, meta = load_model(model_path)
    check_model_structures(meta, params.preprocess.structures, model_path)
    synth = MaskToCT(model, meta, batch_size=params.generate.batch_size)
    log.info("synthesize: %d cases from the %d training cases %s", params.synthesize.cases, len(train), train)
    return synthesize_dataset(synth, interim_sources(interim_dir, train), params.synthesize, out_dir,
                              params.data.label_map,
                              suffixes=(params.data.image_suffix, params.data.label_suffix),
                              anatomy_suffix=params.data.anatomy.label_suffix)


def interim_sources(interim_dir, cases: list[str]) -> list[Source]:
    """The ingested label volumes of ``cases`` (sorted) as sources, with their anatomy when ingest
    wrote it, read when a case needs them."""
    interim_dir = Path(interim_dir)

    def source(case: str) -> Source:
        def load():
            img = load_nifti(label_path(interim_dir, case), role="label")            # canonical indices
            return np.asarray(img.dataobj, dtype=np.uint8), img.affine
        path = interim_anatomy_path(interim_dir, case)
        anatomy = None if path is None else (lambda: np.asarray(load_nifti(path, role="label").dataobj, np.uint8))
        return Source(case, load, anatomy)

    return [source(c) for c in sorted(cases)]


def label_sources(labels_dir, pattern: str, label_map: dict[int, str], structures: list[str],
                  anatomy_suffix: str | None = None, label_suffix: str | None = None,
                  *, anatomy_map="ctsynth") -> list[Source]:
    """Every ``pattern`` file under ``labels_dir`` as a source; all problems of all files at once
    (unreadable, no known structure, values outside the label map, a missing or bad anatomy file).

    ``anatomy_suffix``: each label file ``<id><label_suffix>`` has its anatomy (body / lung / bone
    values, ``anatomy_map``) beside it as ``<id><anatomy_suffix>`` (without ``label_suffix``, ``<id>``
    is the file name minus ``.nii[.gz]``); files ending in ``anatomy_suffix`` are not label files."""
    from ctsynth.synth.inference import read_anatomy

    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise InputError(f"{labels_dir}: --labels is not a folder")
    files = sorted(p for p in labels_dir.rglob(pattern) if p.is_file()
                   and not (anatomy_suffix and p.name.endswith(anatomy_suffix)))
    if not files:
        raise InputError(f"{labels_dir}: no label NIfTI files matching {pattern!r}")
    problems, sources = [], []
    for path in files:
        try:
            img = load_nifti(path, role="label")
            data = np.asanyarray(img.dataobj)
            index, _ = index_volume(path, data, label_map, structures, unknown="error")
            anatomy = None
            if anatomy_suffix:
                stem = (path.name[:-len(label_suffix)] if label_suffix and path.name.endswith(label_suffix)
                        else path.name.split(".nii")[0])
                found = path.with_name(stem + anatomy_suffix)
                if not found.is_file():
                    raise InputError(f"{path}: its anatomy file {found.name} is missing (--anatomy-suffix "
                                     f"{anatomy_suffix!r}: every label file needs one beside it)")
                anatomy = to_canonical(read_anatomy(found, anatomy_map, img), img.affine)
        except InputError as e:
            problems += e.problems
            continue
        canon = to_canonical(index, img.affine)
        sources.append(Source(path.name.split(".nii")[0], lambda canon=canon, affine=img.affine: (canon, affine),
                              None if anatomy is None else (lambda anatomy=anatomy: anatomy)))
    if problems:
        raise InputError(problems)
    return sources


def synthesize_folder(model_path, labels_dir, out_dir, cases: int, seed: int | None = None,
                      label_map=None, *, layout: str = "pairs", pattern: str = "*.nii*",
                      structures: list[str] | None = None, batch_size: int = 32,
                      contrast_hu: float | None = None, anatomy_suffix: str | None = None,
                      label_suffix: str | None = None, anatomy_map="ctsynth") -> pd.DataFrame:
    """``ctsynth synthesize``: any folder of label NIfTIs -> ``cases`` new labelled cases
    (``contrast_hu``: one contrast level for all, for a model with the contrast control; default:
    drawn per case; ``anatomy_suffix`` etc.: the anatomy beside each label file, for a model with
    ``model.anatomy``, see :func:`label_sources`; without it such a model draws from the heart alone)."""
    if not isinstance(cases, int) or cases < 1:
        raise ConfigError(f"--cases: must be a whole number >= 1, got {cases}")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    model, meta = load_model(model_path)
    lmap = (parse_label_map_arg(label_map)
            or parse_label_map(meta.get("label_map") or {}, where=f"{model_path} label_map"))
    chosen = structures_arg(structures, meta["structures"])          # a subset of the model's
    if anatomy_suffix and not meta.get("anatomy"):
        raise ConfigError(f"--anatomy-suffix: {model_path} is not conditioned on the anatomy around the heart "
                          f"(trained with model.anatomy false); leave the option out")
    sources = label_sources(labels_dir, pattern, lmap, chosen, anatomy_suffix, label_suffix, anatomy_map=anatomy_map)
    cfg = SynthesizeCfg(cases=cases, seed=SynthesizeCfg.seed if seed is None else seed, contrast=contrast_hu)
    synth = MaskToCT(model, meta, batch_size=batch_size, structures=chosen)
    return synthesize_dataset(synth, sources, cfg, out_dir, lmap, layout=layout)
