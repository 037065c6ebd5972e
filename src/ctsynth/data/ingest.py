"""ingest: raw image/label NIfTI pairs -> validated canonical volumes + manifest.

Finds ``*<image_suffix>`` files under ``data.raw_dir`` (recursively), pairs each with the file
named ``<case><label_suffix>`` beside it, and checks every pair. All problems of all cases are
collected; with ``data.on_error: fail`` any problem aborts before anything is written, with
``skip`` the bad cases are reported and left out (it still fails if none is left).

Output (``data/interim``, written atomically): ``<case>_image.nii`` (int16 HU; MR: normalised
units, :mod:`ctsynth.data.modality`), ``<case>_label.nii`` (uint8 structure indices, see
:mod:`ctsynth.core.labels`) and, unless
``data.anatomy.source`` is none, ``<case>_anatomy.nii`` (uint8 body / lung / bone classes, derived
from the image or read from ``<case><data.anatomy.label_suffix>``: :mod:`ctsynth.data.anatomy`),
all in canonical RAS+ orientation on the image grid and uncompressed so later stages can
memory-map them, plus ``manifest.csv``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from ctsynth.core.config import Params, project_relative, resolve_path
from ctsynth.core.errors import InputError
from ctsynth.core.io import atomic_dir, canonical, load_nifti, overlap_fraction, resample_nearest, write_csv
from ctsynth.core.labels import STRUCTURES, structure_index
from ctsynth.core.progress import quiet
from ctsynth.data import modality
from ctsynth.data.anatomy import counts as anatomy_counts
from ctsynth.data.anatomy import derive, from_labels
from ctsynth.data.masks import map_labels

log = logging.getLogger("ctsynth.data.ingest")

# A label grid on another grid than its image is accepted when it lies mostly inside the image
# (a label cropped to a slab or box around the heart) or covers most of the image (a padded
# grid); everything outside the label grid is background.
MIN_INSIDE = 0.5   # share of the label grid's physical extent that must lie inside the image
MIN_OVERLAP = 0.5  # or: share of the image's physical extent the label grid must cover


@dataclass
class Pair:
    case: str
    image: Path
    label: Path | None


def find_pairs(raw_dir: Path, image_suffix: str, label_suffix: str) -> tuple[list[Pair], list[str]]:
    """Pair images with labels; return (pairs, problems) — missing partners, duplicate ids."""
    problems: list[str] = []
    if not raw_dir.is_dir():
        raise InputError(f"{raw_dir}: data.raw_dir is not a directory")
    images = sorted(p for p in raw_dir.rglob(f"*{image_suffix}") if p.is_file())
    labels = sorted(raw_dir.rglob(f"*{label_suffix}"))
    if not images and not labels:
        raise InputError(f"{raw_dir}: no cases found (expected files named <case>{image_suffix} "
                         f"with partners <case>{label_suffix})")
    pairs, seen = [], {}
    for img in images:
        case = img.name[: -len(image_suffix)]
        if case in seen:
            problems.append(f"{img}: duplicate case id {case!r} (also {seen[case]})")
            continue
        seen[case] = img
        label = img.with_name(case + label_suffix)
        if not label.exists() and not label.is_symlink():
            problems.append(f"{img}: missing partner label file {label.name}")
            pairs.append(Pair(case, img, None))
        else:
            pairs.append(Pair(case, img, label))
    paired = {p.label for p in pairs if p.label is not None}
    for lab in labels:
        if lab not in paired and lab.with_name(lab.name[: -len(label_suffix)] + image_suffix) not in seen.values():
            problems.append(f"{lab}: missing partner image file "
                            f"{lab.name[: -len(label_suffix)] + image_suffix}")
    return pairs, problems


def _has_affine(img: nib.Nifti1Image) -> bool:
    return int(img.header["sform_code"]) > 0 or int(img.header["qform_code"]) > 0


def _outside_share(label: np.ndarray, label_affine, shape, affine) -> float:
    """Share of the labelled (non-zero) voxels whose centres fall outside the image grid."""
    ijk = np.argwhere(label != 0)
    if not len(ijk):
        return 0.0
    vox = nib.affines.apply_affine(np.linalg.inv(affine) @ label_affine, ijk)   # label voxel -> image voxel
    inside = np.all((vox >= -0.5) & (vox < np.asarray(shape) - 0.5), axis=1)
    return float(1 - inside.mean())


def _label_on_image_grid(pair: Pair, raw_label: np.ndarray, lab, shape, img, problems: list[str],
                         *, path: Path | None = None):
    """A label (``path``, default the pair's label) on another grid, resampled onto the image grid
    (nearest neighbour, background outside the label grid); the label unchanged with a problem
    appended when it cannot be."""
    path = pair.label if path is None else path
    if not (_has_affine(img) and _has_affine(lab)):
        problems.append(f"{path}: shape {raw_label.shape} differs from image {tuple(shape)} "
                        f"and the files carry no usable affine to resample with")
        return raw_label
    cover = overlap_fraction(shape, img.affine, raw_label.shape, lab.affine)     # of the image
    inside = overlap_fraction(raw_label.shape, lab.affine, shape, img.affine)    # of the label grid
    if inside < MIN_INSIDE and cover < MIN_OVERLAP:
        problems.append(f"{path}: label grid does not overlap the image: {1 - inside:.0%} of the "
                        f"label grid lies outside the image (it covers {cover:.0%} of the image); "
                        f"check the affines")
        return raw_label
    log.info("%s: label on another grid, resampled onto the image grid; it covers %.0f%% of the image "
             "(%.0f%% of the label grid inside it), background elsewhere", path, 100 * cover, 100 * inside)
    lost = _outside_share(raw_label, lab.affine, shape, img.affine)
    if lost > 0:
        log.warning("%s: %.1f%% of the labelled voxels lie outside the image and are dropped",
                    pair.case, 100 * lost)
    return resample_nearest(raw_label, lab.affine, shape, img.affine)


def anatomy_path(pair: Pair, suffix: str) -> Path:
    """The supplied anatomy label file of a pair: ``<case><suffix>`` beside its image."""
    return pair.image.with_name(pair.case + suffix)


def _anatomy(pair: Pair, params: Params, data: np.ndarray, img, heart: np.ndarray,
             problems: list[str]) -> np.ndarray | None:
    """The case's anatomy classes on the image grid (original orientation), or None (none / a problem).
    ``data``: the image in HU (CT) or nu (MR: the body rule's level is the modality's, no bone class)."""
    cfg, mr = params.data.anatomy, params.data.modality == "mr"
    body_hu = modality.body_level("mr") if mr else cfg.body_hu
    if cfg.source == "none":
        return None
    if cfg.source == "derived":
        return derive(data.astype(np.float32), heart, body_hu, None if mr else cfg.bone_hu)
    path = anatomy_path(pair, cfg.label_suffix)
    if not path.exists():
        problems.append(f"{path}: missing anatomy label file of case {pair.case} (data.anatomy.source: supplied "
                        f"reads <case>{cfg.label_suffix} beside each image)")
        return None
    try:
        lab = load_nifti(path, "label")
    except InputError as e:
        problems += e.problems
        return None
    raw = np.asanyarray(lab.dataobj)
    if raw.shape != data.shape or not np.allclose(lab.affine, img.affine, atol=1e-3):
        raw = _label_on_image_grid(pair, raw, lab, data.shape, img, problems, path=path)
        if problems:
            return None
    classes, found = from_labels(raw, cfg.label_map, data.astype(np.float32), body_hu, path)
    problems += found
    return None if found else classes


def check_pair(pair: Pair, params: Params) -> tuple[dict, np.ndarray, np.ndarray, object] | list[str]:
    """Validate one pair; return (manifest row, canonical image, canonical label, canonical anatomy
    or None) or problems."""
    problems: list[str] = []
    if pair.label is None:
        return problems
    try:
        img = load_nifti(pair.image, "image")
    except InputError as e:
        problems += e.problems
        img = None
    try:
        lab = load_nifti(pair.label, "label")
    except InputError as e:
        problems += e.problems
        lab = None
    if img is None or lab is None:
        return problems
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        problems.append(f"{pair.image}: image contains {int((~np.isfinite(data)).sum())} NaN/Inf voxels")
    elif data.min() == data.max():
        problems.append(f"{pair.image}: image is constant ({data.min()}); not a scan")
    else:
        problems += modality.problems(data, params.data.modality, pair.image)
    raw_label = np.asanyarray(lab.dataobj)
    if raw_label.shape != data.shape or not np.allclose(lab.affine, img.affine, atol=1e-3):
        raw_label = _label_on_image_grid(pair, raw_label, lab, data.shape, img, problems)
    if problems:
        return problems
    mapped, _, found = map_labels(raw_label, params.data.label_map, pair.label, unknown=params.data.unknown_labels)
    problems += found
    if not problems and not mapped.any():
        problems.append(f"{pair.label}: label volume is empty (no voxel of {sorted(params.data.label_map)})")
    if problems:
        return problems
    if params.data.modality == "mr":                                         # nu: the percentiles -> -1000 / +1000
        hu, p_lo, p_hi = modality.normalise_mr(data)
    else:
        hu = np.clip(np.rint(data), -32768, 32767).astype(np.int16) if data.dtype != np.int16 else data
    classes = _anatomy(pair, params, hu, img, mapped, problems)
    if problems:
        return problems
    image_c = canonical(nib.Nifti1Image(hu, img.affine))
    label_c = canonical(nib.Nifti1Image(mapped, img.affine))
    anatomy_c = None if classes is None else canonical(nib.Nifti1Image(classes, img.affine))
    row = {"case": pair.case, "source_image": project_relative(pair.image),
           "source_label": project_relative(pair.label),
           "image_file": f"{pair.case}_image.nii", "label_file": f"{pair.case}_label.nii",
           "orig_axcodes": "".join(nib.aff2axcodes(img.affine)),
           "orig_shape_x": data.shape[0], "orig_shape_y": data.shape[1], "orig_shape_z": data.shape[2],
           "orig_affine": json.dumps(np.round(img.affine, 6).tolist())}
    row.update({f"shape_{a}": int(s) for a, s in zip("xyz", image_c.shape)})
    row.update({f"spacing_{a}": round(float(s), 4) for a, s in zip("xyz", image_c.header.get_zooms()[:3])})
    row.update({"hu_min": int(hu.min()), "hu_max": int(hu.max()), "modality": params.data.modality})
    if params.data.modality == "mr":
        row.update({"mr_p0_5": round(p_lo, 4), "mr_p99_5": round(p_hi, 4)})
    counts = np.bincount(np.asarray(label_c.dataobj).ravel(), minlength=len(STRUCTURES) + 1)
    row.update({f"vox_{name}": int(counts[structure_index(name)]) for name in STRUCTURES})
    if anatomy_c is not None:
        row.update({"anatomy_file": f"{pair.case}_anatomy.nii", "anatomy_source": params.data.anatomy.source,
                    **{f"vox_{k}": v for k, v in anatomy_counts(classes).items()}})
    return row, image_c, label_c, anatomy_c


def run(params: Params, out_dir: str | Path, raw_dir: str | Path | None = None) -> pd.DataFrame:
    """Ingest every pair under ``raw_dir`` (default ``data.raw_dir``) into ``out_dir``."""
    raw_dir = resolve_path(raw_dir or params.data.raw_dir)
    pairs, problems = find_pairs(raw_dir, params.data.image_suffix, params.data.label_suffix)
    bad_cases = {p.case for p in pairs if p.label is None}
    rows: list[dict] = []
    # Each good case is written into the temporary folder as soon as it is checked (memory stays
    # at one volume); any problem under on_error=fail raises inside the block, which discards
    # the folder, so nothing is half-written and all problems are reported together.
    with atomic_dir(out_dir) as tmp:
        for pair in tqdm(pairs, desc="ingest", unit="case", disable=quiet()):
            result = check_pair(pair, params)
            if isinstance(result, list):
                problems += result
                bad_cases.add(pair.case)
                continue
            row, image_c, label_c, anatomy_c = result
            nib.save(image_c, str(tmp / row["image_file"]))
            nib.save(label_c, str(tmp / row["label_file"]))
            if anatomy_c is not None:
                nib.save(anatomy_c, str(tmp / row["anatomy_file"]))
            rows.append(row)
        if problems:
            if params.data.on_error == "fail" or not rows:
                raise InputError(problems + ([] if rows else [f"{raw_dir}: no usable case left"]))
            for p in problems:
                log.warning("skipped: %s", p)
        manifest = pd.DataFrame(rows)
        write_csv(tmp / "manifest.csv", manifest)
    counts = Counter({k: int(manifest[f"vox_{k}"].gt(0).sum()) for k in STRUCTURES})
    log.info("ingest: %d cases (%d skipped) -> %s; cases per structure %s",
             len(rows), len(bad_cases), out_dir, dict(counts))
    return manifest


def _manifest_file(interim_dir: Path, case: str, column: str) -> Path | None:
    """The file the ingest manifest names in ``column`` for ``case``; None without manifest, case or entry."""
    manifest = interim_dir / "manifest.csv"
    if manifest.exists():
        frame = pd.read_csv(manifest, dtype={"case": str})
        row = frame.loc[frame.case == case]
        if len(row) and column in frame and isinstance(row[column].iloc[0], str):
            return interim_dir / row[column].iloc[0]
    return None


def interim_anatomy_path(interim_dir: str | Path, case: str) -> Path | None:
    """The canonical anatomy file of ``case`` in the ingest folder, None when ingest wrote none."""
    return _manifest_file(Path(interim_dir), case, "anatomy_file")


def label_path(interim_dir: str | Path, case: str) -> Path:
    """The canonical label file of ``case`` in the ingest folder (named by its manifest)."""
    return _manifest_file(Path(interim_dir), case, "label_file") or Path(interim_dir) / f"{case}_label.nii"
