"""share stage: the synthetic cases you may share, with a dataset card and a checksum manifest.

From ``data/synthetic`` (the synthesize stage), the privacy stage's per-case verdicts and the
expert reviews (``reviews/<reviewer>.jsonl``, written by ``ctsynth review``), a case is **shared**
when

1. it passed the privacy screening (``reports/privacy_cases.csv``: no slice closer to a training
   slice than the calibrated threshold, mask overlap with its source within the cap);
2. no reviewer's current decision rejects it; and
3. with ``share.require_review``, at least ``share.min_accepts`` reviewers accepted it.

A decision made on a case whose files have changed since (its ``case_sha256`` differs) is stale:
counted and listed, never applied. ``data/share/`` (written atomically) holds:

* ``pairs/``: ``<case><image_suffix>`` + ``<case><label_suffix>``, the raw label values of
  ``data.label_map`` (ingestible: point ``data.raw_dir`` at it);
* ``nnunet/``: ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` with labels 1..K and
  ``dataset.json`` (nnU-Net v2);
* ``manifest.csv``: one row per shared case: its files, structure volumes, effective resolution
  and review counts;
* ``dataset_card.json`` and ``DATASET.md``: what the dataset is (generator, training data,
  counts per step, reviewers, privacy rule and score distribution, per-structure statistics,
  performance of the generator, intended use, limitations, license);
* ``SHA256SUMS``: the SHA-256 of every other file (``sha256sum -c SHA256SUMS`` checks them).

**Nothing in ``data/share/`` links a case to a patient.** The synthetic dataset's own manifest
(which training patient each case warps, the draw, the nearest training slice) stays internal, in
``data/synthetic`` and ``reports/``. A shared case is renamed ``case_<k>``, numbered in the order of
its content hash (the internal number follows the order of the training patients, so it would name
the source); its NIfTI files are written anew with a fresh header (no description, intent or file
name fields), the volume centred on the world origin (a scan's origin is patient-specific) and a
gzip header without file name or time. Before the folder is swapped in, every file in it is
searched for every patient id the stage knows (the split's cases, the synthetic cases' sources and
nearest training cases) and every internal case name; one found refuses the export
(:func:`identifier_problems`) and leaves the previous folder in place.

``reports/share.json`` (git-tracked, internal) holds the counts and which internal case became
which shared one; the report stage logs the counts and the card to the MLflow run.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctsynth.core.config import Params
from ctsynth.core.errors import InputError
from ctsynth.core.io import atomic_dir, save_nifti, write_csv, write_json, write_text
from ctsynth.core.labels import STRUCTURES
from ctsynth.data.masks import map_labels
from ctsynth.share import card as card_mod
from ctsynth.share import decisions

log = logging.getLogger("ctsynth.share")

MANIFEST_COLUMNS = ("case", "source", "image_file", "label_file")


def read_manifest(synthetic_dir: Path) -> pd.DataFrame:
    """``manifest.csv`` of the synthetic folder, checked (all problems at once)."""
    path = synthetic_dir / "manifest.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing (the synthesize stage writes it)")
    manifest = pd.read_csv(path, dtype={"case": str, "source": str})
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest]
    if missing:
        raise InputError(f"{path}: no column(s) {', '.join(missing)}")
    problems = [f"{synthetic_dir / f}: missing ({kind} of {c})" for c, i, lab in
                zip(manifest.case, manifest.image_file, manifest.label_file)
                for kind, f in (("image", i), ("label", lab)) if not (synthetic_dir / f).is_file()]
    if manifest.case.duplicated().any():
        problems.append(f"{path}: duplicate case(s) {sorted(set(manifest.case[manifest.case.duplicated()]))}")
    if problems:
        raise InputError(problems)
    return manifest


def case_hashes(synthetic_dir: Path, manifest: pd.DataFrame) -> dict[str, str]:
    """Each case's content hash (:func:`ctsynth.share.decisions.case_hash` of its image and label)."""
    return {c: decisions.case_hash(synthetic_dir / i, synthetic_dir / lab)
            for c, i, lab in zip(manifest.case, manifest.image_file, manifest.label_file)}


def privacy_verdicts(privacy_csv: Path, cases: list[str]) -> pd.DataFrame:
    """The privacy stage's per-case table for exactly ``cases`` (else an error naming the file)."""
    if not privacy_csv.is_file():
        raise InputError(f"{privacy_csv}: missing (the privacy stage writes it)")
    table = pd.read_csv(privacy_csv, dtype={"case": str, "source": str, "nearest_case": str})
    missing = [c for c in ("case", "verdict") if c not in table]
    if missing:
        raise InputError(f"{privacy_csv}: no column(s) {', '.join(missing)}")
    absent = sorted(set(cases) - set(table.case))
    extra = sorted(set(table.case) - set(cases))
    if absent or extra:
        raise InputError(f"{privacy_csv}: does not screen the synthetic dataset it is given "
                         f"(unscreened: {absent or 'none'}; unknown: {extra or 'none'}); rerun `dvc repro privacy`")
    return table.set_index("case").loc[cases].reset_index()


def select(manifest: pd.DataFrame, privacy: pd.DataFrame, reviews: dict, require_review: bool,
           min_accepts: int) -> pd.DataFrame:
    """One row per case: privacy verdict, review counts, ``shared`` and ``why`` (when not shared)."""
    rows = []
    for case, verdict, reason in zip(privacy.case, privacy.verdict, privacy.get("reason", [""] * len(privacy))):
        counts = decisions.verdicts(reviews, case)
        why = []
        if verdict != "pass":
            why.append(f"privacy: {reason}" if isinstance(reason, str) and reason else "privacy: withheld")
        if counts["rejects"]:
            why.append(f"rejected by {counts['rejects']} reviewer(s)")
        if require_review and counts["accepts"] < min_accepts:
            why.append(f"accepted by {counts['accepts']} of the {min_accepts} reviewer(s) required")
        rows.append({"case": case, "privacy": verdict, **counts, "shared": not why, "why": "; ".join(why)})
    out = pd.DataFrame(rows)
    return manifest[["case"]].merge(out, on="case", how="left")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(root: Path, name: str = "SHA256SUMS") -> int:
    """``<sha256>  <relative path>`` for every file under ``root`` (sorted), as ``sha256sum`` writes."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != name)
    lines = [f"{_sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]
    (root / name).write_text("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


SHARED_PREFIX = "case"
SHARED_COLUMNS = ("model_size", "effective_spacing_x_mm", "effective_spacing_y_mm")   # of the internal manifest


def shared_names(hashes: dict[str, str], cases: list[str]) -> dict[str, str]:
    """Internal case -> shared name ``case_<k>``, numbered in the order of the cases' content hashes:
    the internal number follows the training patients' order (case i warps patient i mod n), so it
    must not travel; the hash order is reproducible and says nothing about i."""
    width = max(4, len(str(len(cases))))
    return {c: f"{SHARED_PREFIX}_{k:0{width}d}" for k, c in enumerate(sorted(cases, key=lambda c: hashes[c]), 1)}


def centred_affine(affine: np.ndarray, shape) -> np.ndarray:
    """``affine`` with the origin moved so that the volume's centre sits at world (0, 0, 0): the same
    voxel size and orientation, none of the scanner position that is particular to the source scan."""
    out = np.array(affine, dtype=float)
    out[:3, 3] = -out[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2)
    return out


def write_shared_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    """A NIfTI with a fresh header (nothing carried over from the source file: no description, aux
    file or intent name) in units of mm, written by :func:`ctsynth.core.io.save_nifti` (nibabel's
    gzip stream holds neither a file name nor a time stamp: the same volume gives the same bytes)."""
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    save_nifti(path, data, affine, dtype=dtype, header=header)


def export_case(src_dir: Path, row, name: str, out: Path, suffixes: tuple[str, str], label_map: dict[int, str],
                *, nn_values: dict[int, int]) -> dict[str, dict]:
    """Write one case as ``name`` into ``pairs/`` and ``nnunet/`` (labels: ``nn_values``, structure
    index -> 1..K; structures not in it become background), anonymised by :func:`write_shared_nifti`
    on :func:`centred_affine`; return its per-structure statistics ({structure: {voxels, ml, hu_mean,
    hu_sd}})."""
    image_path, label_path = src_dir / row.image_file, src_dir / row.label_file
    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    raw = np.asarray(label.dataobj)
    index, _, problems = map_labels(raw, label_map, label_path,
                                    fix="the synthetic labels must use data.label_map's values")
    if problems:
        raise InputError(problems)
    affine = centred_affine(label.affine, label.shape)
    hu = np.asarray(image.dataobj)
    write_shared_nifti(out / "pairs" / f"{name}{suffixes[0]}", hu, affine, np.int16)
    write_shared_nifti(out / "pairs" / f"{name}{suffixes[1]}", raw, affine, np.int16)
    shutil.copyfile(out / "pairs" / f"{name}{suffixes[0]}", out / "nnunet" / "imagesTr" / f"{name}_0000.nii.gz")
    to_nnunet = np.zeros(len(STRUCTURES) + 1, np.int16)
    for idx, k in nn_values.items():
        to_nnunet[idx] = k
    write_shared_nifti(out / "nnunet" / "labelsTr" / f"{name}.nii.gz", to_nnunet[index], affine, np.int16)
    hu = hu.astype(np.float32)
    voxel_ml = float(abs(np.linalg.det(label.affine[:3, :3]))) / 1000.0
    stats = {}
    for idx in nn_values:
        inside = index == idx
        n = int(inside.sum())
        values = hu[inside]
        stats[STRUCTURES[idx - 1]] = {"voxels": n, "ml": round(n * voxel_ml, 2),
                                      "hu_mean": round(float(values.mean()), 1) if n else None,
                                      "hu_sd": round(float(values.std()), 1) if n else None}
    return stats


def shared_manifest(shared: pd.DataFrame, names: dict[str, str], table: pd.DataFrame, stats: dict,
                    suffixes: tuple[str, str]) -> pd.DataFrame:
    """``manifest.csv`` of the shared folder, built from an allow-list: per case its shared name, files,
    structure volumes (ml), the generator's effective resolution and the review counts. Never the
    source patient, the draw, the internal name or the nearest-slice search."""
    reviews = table.set_index("case")
    rows = []
    for row in shared.itertuples():
        name = names[row.case]
        rows.append({"case": name, "image_file": f"pairs/{name}{suffixes[0]}",
                     "label_file": f"pairs/{name}{suffixes[1]}",
                     **{c: getattr(row, c) for c in SHARED_COLUMNS if c in shared},
                     **{f"ml_{s}": v["ml"] for s, v in stats[row.case].items()},
                     "accepts": int(reviews.accepts[row.case]), "rejects": int(reviews.rejects[row.case])})
    return pd.DataFrame(rows, columns=None if rows else ["case", "image_file", "label_file"]).sort_values("case")


def linked_identifiers(manifest: pd.DataFrame, privacy: pd.DataFrame, privacy_dir: Path, split_path) -> set[str]:
    """Every name that would link a shared case to a patient: the internal case names, their sources,
    the privacy search's nearest training cases, and every case of the split (when given)."""
    ids = set(manifest.case) | set(manifest.get("source", pd.Series(dtype=str)).dropna())
    ids |= set(privacy.get("nearest_case", pd.Series(dtype=str)).dropna())
    slices = privacy_dir / "privacy_synthetic.csv"
    if slices.is_file():
        table = pd.read_csv(slices, dtype=str)
        for col in ("nn_case", "nearest_case", "source"):
            ids |= set(table[col].dropna()) if col in table else set()
    if split_path and Path(split_path).is_file():
        from ctsynth.data.split import load_split
        ids |= {c for cases in load_split(split_path).values() if isinstance(cases, list) for c in cases}
    return {str(i) for i in ids if str(i).strip()}


def _token_pattern(ids: list[str]) -> re.Pattern | None:
    """One regex for all ``ids`` as whole tokens (no letter or digit either side), case-insensitive."""
    if not ids:
        return None
    alternatives = b"|".join(re.escape(i.encode()) for i in sorted(ids, key=len, reverse=True))
    return re.compile(rb"(?<![A-Za-z0-9])(" + alternatives + rb")(?![A-Za-z0-9])", re.IGNORECASE)


def identifier_problems(root: Path, identifiers: Iterable[str]) -> list[str]:
    """``"<file>: names <id>, ..."`` for every file under ``root`` that holds one of ``identifiers``
    as a whole token (case-insensitive): in its path, and, for distinctive ids (4 characters or more,
    not only digits), in its bytes (of a NIfTI: the first 64 KiB, its gzip header, and the
    decompressed header and extensions, everything before the voxels). A short or numeric id such as
    ``7`` would match numbers in any text, so it is searched for in paths only."""
    ids = {i for i in identifiers if i}
    everywhere = _token_pattern([i for i in ids if len(i) >= 4 and not i.isdigit()])
    in_paths = _token_pattern(sorted(ids))
    if in_paths is None:
        return []
    problems = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        found = {m.group(1).decode() for m in in_paths.finditer(rel.encode())}
        if everywhere is not None:
            nifti = path.name.endswith((".nii", ".nii.gz"))
            with open(path, "rb") as fh:
                blobs = [fh.read(1 << 16) if nifti else fh.read()]
            if nifti:
                header = nib.load(str(path)).header                   # vox_offset may read 0: count it
                offset = max(int(header.get_data_offset()), 352 + sum(e.get_sizeondisk() for e in header.extensions))
                with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as fh:
                    blobs.append(fh.read(offset))
            found |= {m.group(1).decode(errors="replace") for blob in blobs for m in everywhere.finditer(blob)}
        if found:
            problems.append(f"{rel}: names {', '.join(sorted(found))}")
    return problems


def training_data_hash(processed_dir, split_path) -> str | None:
    """The hash the train stage records for its data (``ctsynth.data_hash`` in MLflow): the processed
    store's bytes and the training patients; None when either file is not given."""
    if not processed_dir or not split_path:
        return None
    from ctsynth.data.split import load_split
    from ctsynth.data.store import ProcessedStore

    return ProcessedStore(processed_dir).fingerprint(load_split(split_path, need=("train",))["train"])


def run(params: Params, synthetic_dir, privacy_dir, reviews_dir, metrics_path, model_path, *, run_file,
        out_dir, out_json, processed_dir=None, split_path=None) -> dict:
    """Write ``out_dir`` (the shared dataset) and ``out_json`` (its counts); return the counts."""
    from ctsynth.data.preprocess import kept_indices
    from ctsynth.synth.synthesize import output_values, write_dataset_json

    synthetic_dir, privacy_dir = Path(synthetic_dir), Path(privacy_dir)
    cfg = params.share
    manifest = read_manifest(synthetic_dir)
    cases = manifest.case.tolist()
    privacy = privacy_verdicts(privacy_dir / "privacy_cases.csv", cases)
    hashes = case_hashes(synthetic_dir, manifest)
    reviews = decisions.load(reviews_dir, hashes)
    table = select(manifest, privacy, reviews, cfg.require_review, cfg.min_accepts)
    keep = kept_indices(params.preprocess.structures)
    nn_values = output_values(keep, params.data.label_map, "nnunet")
    suffixes = (params.data.image_suffix, params.data.label_suffix)
    shared = manifest[table.shared.to_numpy()]
    names = shared_names(hashes, shared.case.tolist())
    forbidden = linked_identifiers(manifest, privacy, privacy_dir, split_path)
    with atomic_dir(out_dir) as tmp:
        for sub in ("pairs", "nnunet/imagesTr", "nnunet/labelsTr"):
            (tmp / sub).mkdir(parents=True)
        stats = {row.case: export_case(synthetic_dir, row, names[row.case], tmp, suffixes, params.data.label_map,
                                       nn_values=nn_values) for row in shared.itertuples()}
        write_dataset_json(tmp / "nnunet", nn_values, len(shared), {"structures": params.preprocess.structures,
                                                                      "image_size": params.preprocess.image_size,
                                                                      "modality": params.data.modality},
                           name=cfg.name)
        write_csv(tmp / "manifest.csv", shared_manifest(shared, names, table, stats, suffixes))
        card = card_mod.build(params, table=table, names=names, reviews=reviews, stats=stats,
                              privacy_dir=privacy_dir, metrics=_read_metrics(metrics_path), model_path=model_path,
                              run_file=run_file, data_hash=training_data_hash(processed_dir, split_path))
        write_json(tmp / "dataset_card.json", card)
        write_text(tmp / "DATASET.md", card_mod.markdown(card))
        n_files = write_checksums(tmp)
        leaks = identifier_problems(tmp, forbidden)
        if leaks:                               # a bug, not a user error: refuse rather than share it
            raise InputError([f"share: refusing to export files that name a patient or an internal case "
                              f"(searched for {len(forbidden)} names):"] + leaks)
    counts = {**card["counts"], "share_files": n_files}
    write_json(out_json, {"counts": counts, "require_review": cfg.require_review, "min_accepts": cfg.min_accepts,
                          "shared": shared.case.tolist(), "shared_as": names,
                          "not_shared": {c: w for c, w in zip(table.case, table.why) if w},
                          "stale": decisions.stale_decisions(reviews)})
    log.info("share: %d of %d synthetic cases shared -> %s (%d passed privacy, %d accepted, %d rejected by a "
             "reviewer, review %s); card: %s", counts["shared"], counts["made"], out_dir, counts["passed_privacy"],
             counts["accepted"], counts["rejected"], "required" if cfg.require_review else "not required",
             Path(out_dir) / "DATASET.md")
    return counts


def _read_metrics(path) -> dict:
    """``reports/metrics.json`` (the generator's test-patient metrics), {} when absent."""
    path = Path(path) if path else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}
