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
* ``manifest.csv``: one row per shared case: the draw that made it, its privacy scores, its
  review counts;
* ``dataset_card.json`` and ``DATASET.md``: what the dataset is (generator, training data,
  counts per step, reviewers, privacy rule and score distribution, per-structure statistics,
  performance of the generator, intended use, limitations, license);
* ``SHA256SUMS``: the SHA-256 of every other file (``sha256sum -c SHA256SUMS`` checks them).

``reports/share.json`` (git-tracked) holds the counts; the report stage logs them and the card
to the MLflow run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ctsynth.core.config import Params
from ctsynth.core.errors import InputError
from ctsynth.core.io import atomic_dir, write_csv, write_json, write_text
from ctsynth.core.labels import STRUCTURES
from ctsynth.data.masks import map_labels
from ctsynth.share import card as card_mod
from ctsynth.share import reviews as rv

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
    """Each case's content hash (:func:`ctsynth.share.reviews.case_hash` of its image and label)."""
    return {c: rv.case_hash(synthetic_dir / i, synthetic_dir / lab)
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
        counts = rv.verdicts(reviews, case)
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


def export_case(src_dir: Path, row, out: Path, suffixes: tuple[str, str], label_map: dict[int, str],
                nn_values: dict[int, int]) -> dict[str, dict]:
    """Copy one case into ``pairs/`` and ``nnunet/`` (labels: ``nn_values``, structure index -> 1..K;
    structures not in it become background); return its per-structure statistics
    ({structure: {voxels, ml, hu_mean, hu_sd}})."""
    image_path, label_path = src_dir / row.image_file, src_dir / row.label_file
    shutil.copyfile(image_path, out / "pairs" / f"{row.case}{suffixes[0]}")
    shutil.copyfile(label_path, out / "pairs" / f"{row.case}{suffixes[1]}")
    shutil.copyfile(image_path, out / "nnunet" / "imagesTr" / f"{row.case}_0000.nii.gz")
    label = nib.load(str(label_path))
    index, _, problems = map_labels(np.asanyarray(label.dataobj), label_map, label_path,
                                    fix="the synthetic labels must use data.label_map's values")
    if problems:
        raise InputError(problems)
    to_nnunet = np.zeros(len(STRUCTURES) + 1, np.int16)
    for idx, k in nn_values.items():
        to_nnunet[idx] = k
    img = nib.Nifti1Image(to_nnunet[index], label.affine, label.header)
    img.set_data_dtype(np.int16)
    nib.save(img, str(out / "nnunet" / "labelsTr" / f"{row.case}.nii.gz"))
    hu = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
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


def training_data_hash(processed_dir, split_path) -> str | None:
    """The hash the train stage records for its data (``ctsynth.data_hash`` in MLflow): the processed
    store's bytes and the training patients; None when either file is not given."""
    if not processed_dir or not split_path:
        return None
    from ctsynth.data.split import load_split
    from ctsynth.data.store import ProcessedStore

    return ProcessedStore(processed_dir).fingerprint(load_split(split_path, need=("train",))["train"])


def run(params: Params, synthetic_dir, privacy_dir, reviews_dir, metrics_path, model_path, run_file,
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
    reviews = rv.load(reviews_dir, hashes)
    table = select(manifest, privacy, reviews, cfg.require_review, cfg.min_accepts)
    keep = kept_indices(params.preprocess.structures)
    nn_values = output_values(keep, params.data.label_map, "nnunet")
    suffixes = (params.data.image_suffix, params.data.label_suffix)
    shared = manifest[table.shared.to_numpy()]
    with atomic_dir(out_dir) as tmp:
        for sub in ("pairs", "nnunet/imagesTr", "nnunet/labelsTr"):
            (tmp / sub).mkdir(parents=True)
        stats = {row.case: export_case(synthetic_dir, row, tmp, suffixes, params.data.label_map, nn_values)
                 for row in shared.itertuples()}
        write_dataset_json(tmp / "nnunet", nn_values, len(shared), {"structures": params.preprocess.structures,
                                                                      "image_size": params.preprocess.image_size,
                                                                      "modality": params.data.modality},
                           name=cfg.name)
        merged = shared.merge(privacy.drop(columns=["source"], errors="ignore"), on="case", how="left").merge(
            table[["case", "accepts", "rejects", "stale"]], on="case", how="left")
        merged.insert(1, "case_sha256", [hashes[c] for c in merged.case])
        write_csv(tmp / "manifest.csv", merged)
        card = card_mod.build(params, table=table, reviews=reviews, stats=stats, privacy_dir=privacy_dir,
                              metrics=_read_metrics(metrics_path), model_path=model_path,
                              run_file=run_file, data_hash=training_data_hash(processed_dir, split_path))
        write_json(tmp / "dataset_card.json", card)
        write_text(tmp / "DATASET.md", card_mod.markdown(card))
        n_files = write_checksums(tmp)
    counts = {**card["counts"], "share_files": n_files}
    write_json(out_json, {"counts": counts, "require_review": cfg.require_review, "min_accepts": cfg.min_accepts,
                          "shared": shared.case.tolist(),
                          "not_shared": {c: w for c, w in zip(table.case, table.why) if w},
                          "stale": card["reviews"]["stale_decisions"]})
    log.info("share: %d of %d synthetic cases shared -> %s (%d passed privacy, %d accepted, %d rejected by a "
             "reviewer, review %s); card: %s", counts["shared"], counts["made"], out_dir, counts["passed_privacy"],
             counts["accepted"], counts["rejected"], "required" if cfg.require_review else "not required",
             Path(out_dir) / "DATASET.md")
    return counts


def _read_metrics(path) -> dict:
    """``reports/metrics.json`` (the generator's test-patient metrics), {} when absent."""
    path = Path(path) if path else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}
