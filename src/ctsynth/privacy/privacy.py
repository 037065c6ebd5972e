"""privacy stage: is any case of the synthetic dataset a copy of a training patient?

``data/synthetic`` is made from lightly warped *training* masks, the likeliest place for copies, and
it is what users share. Every case is checked twice:

* **slices**: every labelled slice (read the way the pipeline reads any data: ``ingest`` +
  ``preprocess`` into a temporary folder, so at the store's size and orientation) against the
  training slices with the evaluation's in-body SSIM search (:class:`ctsynth.evaluate.nearest.
  NearestTrainingSearch`: exhaustive while ``privacy.exhaustive_budget`` allows), withheld above
  the evaluate stage's threshold (:func:`ctsynth.evaluate.nearest.privacy_rule`: the
  ``privacy.quantile`` of the real validation slices' own nearest-training similarity, capped by
  ``privacy.max_similarity``);
* **volume**: the whole-heart Dice of the case's mask with the mask of the training case it was
  warped from (``source`` in ``manifest.csv``; resampled onto the case's grid, nearest neighbour,
  when the grids differ), so a near-identity draw is caught even where the generator draws a new
  image; withheld above ``privacy.max_mask_dice``.

A case passes when no larger share of its slices is above the threshold than any validation
patient has (``privacy.case_rule: reference``; ``any``: when none is), none is above the hard cap
``privacy.max_similarity``, and its mask overlap is at most ``privacy.max_mask_dice``.
The rule is calibrated in sample (on every validation patient); how often it withholds a real
patient it was *not* calibrated on is measured twice (:func:`held_out_rates`): each validation
patient left out of the calibration in turn, and the test patients (never used to calibrate)
under the full rule. Target: at most 5 % of such patients withheld. The synthetic cases are
themselves the positive controls of warped copies (each a training patient's label warped with
the synthesize ranges and drawn by the generator): ``privacy_control_warped_withheld``, the share
withheld (target: at least 95 %).
Outputs (atomic): ``reports/privacy_synthetic.csv`` (one row per slice: case, z, similarity, nearest
training case and slice, above), ``reports/privacy_cases.csv`` (one row per case: the scores,
the nearest training case and slice of its closest slice, the verdict and why),
``reports/privacy_calibration.csv`` (one row per held-out real patient: the threshold and allowance
it was judged by, its share of slices above, withheld) and ``reports/privacy_synthetic.json`` (the
rules, counts, held-out rates; git-tracked).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from ctsynth.core.config import Params
from ctsynth.core.errors import InputError
from ctsynth.core.io import write_csv, write_json
from ctsynth.core.progress import quiet
from ctsynth.data import modality
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.nearest import NearestTrainingSearch, privacy_rule, reference_similarities
from ctsynth.utility.utility import synthetic_store

log = logging.getLogger("ctsynth.privacy.privacy")

PASS, WITHHELD = "pass", "withheld"
CALIBRATION_COLUMNS = ["case", "threshold", "allowed", "share_above", "withheld"]   # privacy_calibration.csv


def mask_overlap(case_label: Path, source_label: Path) -> float:
    """Whole-heart Dice (every non-zero label value) of two label volumes; the source is resampled
    onto the case's grid (nearest neighbour) when their shapes or affines differ."""
    case, source = nib.load(str(case_label)), nib.load(str(source_label))
    if case.shape != source.shape or not np.allclose(case.affine, source.affine, atol=1e-3):
        from nibabel.processing import resample_from_to
        source = resample_from_to(source, case, order=0)
    a, b = np.asanyarray(case.dataobj) > 0, np.asanyarray(source.dataobj) > 0
    total = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / total) if total else 0.0


def _manifest(synthetic_dir: Path, interim_dir: Path, train: list[str]) -> pd.DataFrame:
    """The synthesize manifest, checked: every case names a training source whose interim label exists
    (all problems at once)."""
    path = synthetic_dir / "manifest.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing (the synthesize stage writes it: case, source, label_file, ...)")
    manifest = pd.read_csv(path, dtype={"case": str, "source": str})
    missing_cols = [c for c in ("case", "source", "label_file") if c not in manifest]
    if missing_cols:
        raise InputError(f"{path}: no column(s) {missing_cols}")
    problems = []
    for row in manifest.itertuples():
        if row.source not in train:
            problems.append(f"{path}: case {row.case}: source {row.source!r} is not a training case of the split")
        elif not (interim_dir / f"{row.source}_label.nii").is_file():
            problems.append(f"{interim_dir / (row.source + '_label.nii')}: missing (source of {row.case})")
        if not (synthetic_dir / row.label_file).is_file():
            problems.append(f"{synthetic_dir / row.label_file}: missing (label of {row.case})")
    if problems:
        raise InputError(problems)
    return manifest


def reference_share_above(sims: np.ndarray, cases: np.ndarray, threshold: float) -> float | None:
    """The largest share of slices above ``threshold`` that any one unseen (validation) patient has:
    how many too-close slices a case may have and still be no closer to training than every unseen
    patient. None without validation slices."""
    if len(sims) == 0:
        return None
    frame = pd.DataFrame({"case": cases, "above": np.asarray(sims) > threshold})
    return float(frame.groupby("case").above.mean().max())


def case_table(slices: pd.DataFrame, manifest: pd.DataFrame, overlaps: dict[str, float], threshold: float,
               max_mask_dice: float | None, max_share_above: float = 0.0,
               *, hard_cap: float | None = None) -> pd.DataFrame:
    """One row per case of ``manifest`` from the per-slice rows (case, z, similarity, nn_case, nn_z,
    above): scores, the nearest training slice of its closest slice, verdict and reason. A case is
    withheld when more than ``max_share_above`` of its slices are above ``threshold`` (0: any slice),
    or when any slice is above ``hard_cap`` (a near-copy withholds its case whatever the share)."""
    rows = []
    for case, source in zip(manifest.case, manifest.source):
        mine = slices[slices.case == case]
        dice = overlaps.get(case)
        reasons = []
        share = float(mine.above.mean()) if len(mine) else 0.0
        too_many, capped = image_rule(mine.above.to_numpy(), mine.similarity.max() if len(mine) else 0.0,
                                      max_share_above, hard_cap)
        if too_many:
            reasons.append(f"{int(mine.above.sum())} slice(s) above {threshold:.4f}"
                           + (f" ({share:.0%} of its slices; no validation patient has more than "
                              f"{max_share_above:.0%})" if max_share_above > 0 else ""))
        if capped:
            reasons.append(f"a slice at {mine.similarity.max():.4f} is above the cap privacy.max_similarity "
                           f"{hard_cap:g}")
        if max_mask_dice is not None and dice is not None and dice > max_mask_dice:
            reasons.append(f"mask Dice with {source} {dice:.3f} > {max_mask_dice:g}")
        if not len(mine):
            reasons.append("no labelled slice to check")
        top = mine.loc[mine.similarity.idxmax()] if len(mine) else None
        rows.append({"case": case, "source": source, "n_slices": len(mine),
                     "similarity_max": None if top is None else round(float(top.similarity), 4),
                     "similarity_mean": round(float(mine.similarity.mean()), 4) if len(mine) else None,
                     "nearest_case": None if top is None else top.nn_case,
                     "nearest_z": None if top is None else int(top.nn_z),
                     "slices_above": int(mine.above.sum()), "share_above": round(share, 4),
                     "mask_dice_source": None if dice is None else round(dice, 4),
                     "verdict": WITHHELD if reasons else PASS, "reason": "; ".join(reasons)})
    return pd.DataFrame(rows)


def image_rule(above: np.ndarray, top: float, allowed: float, cap: float | None) -> tuple[bool, bool]:
    """The image rule on one case's (or patient's) slices, ``above``: each above the slice threshold;
    ``top``: the highest similarity. → (a larger share above than ``allowed``, a slice above the
    hard ``cap``); either withholds. Nothing to judge without slices: (False, False)."""
    if not len(above):
        return False, False
    return float(np.mean(above)) > allowed, cap is not None and top > cap


def case_allowance(case_rule: str, reference: np.ndarray, reference_cases: np.ndarray, threshold: float) -> float:
    """The share of a case's slices that may lie above the slice threshold: ``any`` 0 (a single
    slice withholds the case); ``reference`` the most any validation patient has (0 without them)."""
    if case_rule == "any":
        return 0.0
    ref = reference_share_above(reference, reference_cases, threshold)
    return 0.0 if ref is None else ref


def held_out_rates(sims: np.ndarray, cases: np.ndarray, quantile: float | None, cap: float | None,
                   case_rule: str) -> pd.DataFrame:
    """The rule's false withholding on patients it was not calibrated on: each validation patient
    left out in turn, the slice threshold (:func:`ctsynth.evaluate.nearest.privacy_rule`) and the
    case allowance (:func:`case_allowance`) calibrated on the others and applied to the one left
    out, a real unseen patient that should pass. One row per patient: case, threshold, allowed,
    share_above, withheld. Empty with fewer than 2 patients."""
    sims, cases = np.asarray(sims, np.float64), np.asarray(cases)
    rows = []
    patients = sorted(set(cases.tolist()))
    for case in patients if len(patients) >= 2 else []:
        own, rest = cases == case, cases != case
        rule = privacy_rule(sims[rest], quantile, cap)
        allowed = case_allowance(case_rule, sims[rest], cases[rest], rule.threshold)
        rows.append({"case": case, **judge(sims[own], rule.threshold, allowed, cap)})
    return pd.DataFrame(rows, columns=CALIBRATION_COLUMNS)


def judge(sims: np.ndarray, threshold: float, allowed: float, cap: float | None) -> dict:
    """The image rule's verdict (:func:`image_rule`, as :func:`case_table` judges a case) on one
    real patient's slice similarities ``sims``."""
    sims = np.asarray(sims, np.float64)
    share = float(np.mean(sims > threshold)) if len(sims) else 0.0
    withheld = any(image_rule(sims > threshold, float(sims.max(initial=0.0)), allowed, cap))
    return {"threshold": round(float(threshold), 5), "allowed": round(float(allowed), 4),
            "share_above": round(share, 4), "withheld": bool(withheld)}


def calibration_summary(loo: pd.DataFrame, test: pd.DataFrame) -> dict:
    """``privacy_heldout_*``: the false-withhold rates (cases and slices) of real patients the rule was
    not calibrated on: validation patients left out in turn, and the test patients under the rule
    calibrated on every validation patient."""
    out = {}
    for name, frame in (("val_loo", loo), ("test", test)):
        out[f"privacy_heldout_{name}_n_patients"] = len(frame)
        out[f"privacy_heldout_{name}_case_withhold"] = float(frame.withheld.mean()) if len(frame) else None
        out[f"privacy_heldout_{name}_slice_withhold"] = float(frame.share_above.mean()) if len(frame) else None
    return out


def describe_case_rule(case_rule: str, allowed: float) -> str:
    if case_rule == "any" or allowed == 0:
        return "a case is withheld when any of its slices is above the threshold" + (
            "" if case_rule == "any" else " (no validation patient has a slice above it)")
    return (f"a case is withheld when more than {allowed:.1%} of its slices are above the threshold: the most "
            f"that any validation patient (unseen by the generator) has")


def run(params: Params, synthetic_dir, processed_dir, split_path, interim_dir, out_dir) -> dict:
    """Screen every case of ``synthetic_dir``; write the three outputs; return the summary."""
    synthetic_dir, interim_dir, out = Path(synthetic_dir), Path(interim_dir), Path(out_dir)
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train",))
    manifest = _manifest(synthetic_dir, interim_dir, list(split["train"]))
    pv = params.privacy
    overlaps = ({c: mask_overlap(synthetic_dir / f, interim_dir / f"{s}_label.nii")
                 for c, s, f in zip(manifest.case, manifest.source, manifest.label_file)}
                if pv.max_mask_dice is not None else {})
    with tempfile.TemporaryDirectory(prefix="ctsynth-privacy-") as tmp:
        synth = synthetic_store(params, synthetic_dir, Path(tmp))
        if synth.image_size != store.image_size:
            raise InputError(f"{synthetic_dir}: preprocessed to {synth.image_size}², the real store is "
                             f"{store.image_size}²")
        val_rows = store.rows_for_cases(split.get("val") or [])
        test_rows = store.rows_for_cases(split.get("test") or [])          # never calibrated on
        n = len(synth.slices)
        search = NearestTrainingSearch(store.images, store.rows_for_cases(split["train"]), pv.downsample,
                                       pv.candidates, hu_window=store.meta["hu_window"],
                                       budget=pv.exhaustive_budget,
                                       n_queries=n + val_rows.size + test_rows.size,
                                       body_hu=modality.body_level(store.meta))
        reference = reference_similarities(search, store.images, val_rows)
        rule = privacy_rule(reference, pv.quantile, pv.max_similarity)
        val_cases = store.slices.case.to_numpy()[val_rows]
        allowed = case_allowance(pv.case_rule, reference, val_cases, rule.threshold)
        loo = held_out_rates(reference, val_cases, pv.quantile, pv.max_similarity, pv.case_rule)
        test_sims = reference_similarities(search, store.images, test_rows)
        test_cases = store.slices.case.to_numpy()[test_rows]
        held_test = pd.DataFrame([{"case": c, **judge(test_sims[test_cases == c], rule.threshold, allowed,
                                                      pv.max_similarity)} for c in sorted(set(test_cases.tolist()))],
                                 columns=CALIBRATION_COLUMNS)
        case_of, z_of = store.slices.case.to_numpy(), store.slices.z.to_numpy()
        parts, bs = [], params.evaluate.batch_size
        for s in tqdm(range(0, n, bs), desc="privacy (synthetic)", disable=quiet(), unit="batch"):
            nn_rows, sims = search.query(np.asarray(synth.images[s:s + bs], dtype=np.float32))
            parts.append(pd.DataFrame({"case": synth.slices.case.to_numpy()[s:s + bs],
                                       "z": synth.slices.z.to_numpy()[s:s + bs],
                                       "similarity": sims.round(5), "nn_case": case_of[nn_rows],
                                       "nn_z": z_of[nn_rows], "above": sims > rule.threshold}))
    slices = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["case", "z", "similarity", "nn_case", "nn_z", "above"])
    cases = case_table(slices, manifest, overlaps, rule.threshold, pv.max_mask_dice, allowed,
                       hard_cap=pv.max_similarity)
    summary = {**rule.summary(), "privacy_synthetic_n_cases": len(cases),
               "privacy_synthetic_n_pass": int((cases.verdict == PASS).sum()),
               "privacy_synthetic_n_slices": len(slices),
               "privacy_synthetic_case_share_allowed": allowed,
               "privacy_synthetic_share_above": float(slices.above.mean()) if len(slices) else None,
               "privacy_synthetic_similarity_mean": float(slices.similarity.mean()) if len(slices) else None,
               "privacy_synthetic_similarity_max": float(slices.similarity.max()) if len(slices) else None,
               "privacy_synthetic_mask_dice_max": max(overlaps.values()) if overlaps else None,
               # positive controls: every case here is a training patient's label warped with the synthesize
               # ranges and drawn by the generator, so the share withheld is the rule's hit rate on warped copies
               "privacy_control_warped_withheld": float((cases.verdict == WITHHELD).mean()) if len(cases) else None,
               **calibration_summary(loo, held_test)}
    write_csv(out / "privacy_synthetic.csv", slices)
    write_csv(out / "privacy_cases.csv", cases)
    write_csv(out / "privacy_calibration.csv", pd.concat([loo.assign(held_out="val_loo"),
                                                         held_test.assign(held_out="test")], ignore_index=True))
    write_json(out / "privacy_synthetic.json", {**summary, "rule": rule.describe(), "distance": search.distance,
                                                "case_rule": describe_case_rule(pv.case_rule, allowed),
                                                "max_mask_dice": pv.max_mask_dice})
    log.info("privacy: %d of %d synthetic cases pass (%d of %d slices above %.4f; mask Dice with the source max "
             "%s); %s", summary["privacy_synthetic_n_pass"], len(cases), int(slices.above.sum()), len(slices),
             rule.threshold, "n/a" if not overlaps else f"{max(overlaps.values()):.3f}", rule.describe())
    return summary


def mlflow_metrics(reports_dir) -> dict[str, float]:
    """The numbers of ``privacy_synthetic.json`` under MLflow names (``privacy/<key>``); {} when absent."""
    path = Path(reports_dir) / "privacy_synthetic.json"
    if not path.is_file():
        return {}
    return {f"privacy/{k}": v for k, v in json.loads(path.read_text()).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith("privacy_synthetic_")}
