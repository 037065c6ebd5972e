"""The dataset card of a shared synthetic dataset: ``dataset_card.json`` and ``DATASET.md``.

Fields after medigan's model cards and the "datasheets for datasets" practice: what made the data
(generator file hash, training fingerprint and seed, MLflow run, git commit), what it was trained
on (the processed store's fingerprint of the training patients), how many cases each step kept
(made / passed privacy / accepted / shared), who reviewed and when, the privacy rule and the
distribution of the nearest-training similarity, per-structure statistics of the shared cases, the
generator's measured performance on the held-out test patients, intended use, limitations, and a
license the user fills in (``share.license``). Everything in it is read from files the stage
depends on, so the card changes exactly when its inputs do. It names cases by their shared names
only, and holds no patient id, no internal case name and no per-case privacy score: distributions
over cases only (see ``ctsynth.share.share``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ctsynth.core.config import Params
from ctsynth.core.labels import STRUCTURES
from ctsynth.share import decisions

INTENDED_USE = ("Research on segmentation of cardiac structures in {modality}: extra labelled training data, method "
                "development and teaching. Not for diagnosis, not for clinical decisions, not as a substitute for "
                "real patient data in validating a clinical product.")
LIMITATIONS = (
    "Each axial slice is drawn independently by a 2-D generator: along z the texture is not as consistent as a real "
    "scan (see flicker_ratio), and in-plane detail is that of the generator's grid (manifest: effective_spacing_*).",
    "Anatomy comes from warped training masks: every case inherits the topology of its source patient.",
    "Contrast and noise follow the training scans' average; the spread of contrast between patients is smaller "
    "than real (contrast_spread_ratio).",
    "The privacy screening is a nearest-neighbour check on image similarity, calibrated on unseen patients; it is "
    "evidence against copies, not a formal privacy guarantee (no differential privacy).",
)
PERFORMANCE_KEYS = (   # the generator on the held-out test patients (reports/metrics.json)
    "ssim", "mae_hu", "mse", "fid_inception", "fd_seg", "fd_seg_floor", "c2st_auc", "dice_generated_mean",
    "dice_real_mean", "flicker_ratio", "texture_std_ratio", "utility_dice_real", "utility_dice_synthetic",
    "utility_dice_mixed", "utility_gain_mixed",
)


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generator(model_path, run_file, params: Params) -> dict:
    out = {"file": str(model_path), "sha256": _file_sha256(Path(model_path))}
    if Path(model_path).is_file():
        from ctsynth.train.networks import load_generator
        _, meta = load_generator(model_path)
        extra = meta.get("extra", {})
        out.update({"training_fingerprint": extra.get("fingerprint"), "seed": extra.get("seed"),
                    "steps": extra.get("step"), "precision": extra.get("precision"),
                    "structures": meta["preprocess"].get("structures"),
                    "image_size": meta["preprocess"].get("image_size"),
                    "hu_window": meta["preprocess"].get("hu_window")})
    run = json.loads(Path(run_file).read_text()) if run_file and Path(run_file).is_file() else {}
    if run.get("run_id"):
        out["mlflow"] = {"run_id": run["run_id"], "experiment": run.get("experiment"),
                         "model_uri": f"runs:/{run['run_id']}/generator"}
    from ctsynth.core.tracking import git_commit
    out["git_commit"] = git_commit()
    return out


def _quantiles(values) -> dict | None:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    qs = (0, 5, 25, 50, 75, 95, 100)
    return {"n": int(v.size), **{f"p{q}": round(float(np.percentile(v, q)), 4) for q in qs}}


def _privacy(privacy_dir: Path, shared: list[str]) -> dict:
    summary_path, slices_path = privacy_dir / "privacy_synthetic.json", privacy_dir / "privacy_synthetic.csv"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    out = {"rule": summary.get("rule"), "distance": summary.get("distance"),
           "threshold": summary.get("privacy_threshold"), "max_mask_dice": summary.get("max_mask_dice")}
    if slices_path.is_file():
        slices = pd.read_csv(slices_path, dtype={"case": str})
        out["similarity_all_cases"] = _quantiles(slices.similarity)
        out["similarity_shared_cases"] = _quantiles(slices.similarity[slices.case.isin(shared)])
    return out


def _reviews(reviews: dict) -> dict:
    """Per reviewer: counts, first and last decision, reasons; stale decisions without their case (an
    internal name: reports/share.json lists them)."""
    people = []
    for name, per_case in sorted(reviews.items()):
        current = [d for d, is_stale in per_case.values() if not is_stale]
        times = sorted(d.time for d, _ in per_case.values())
        people.append({"reviewer": name, "accepted": sum(d.decision == "accept" for d in current),
                       "rejected": sum(d.decision == "reject" for d in current),
                       "stale": sum(s for _, s in per_case.values()),
                       "first": times[0] if times else None, "last": times[-1] if times else None,
                       "reasons": dict(pd.Series([d.reason for d in current if d.reason]).value_counts())})
    for p in people:
        p["reasons"] = {k: int(v) for k, v in p["reasons"].items()}
    stale = [{k: v for k, v in d.items() if k != "case"} for d in decisions.stale_decisions(reviews)]
    return {"reviewers": people, "stale_decisions": stale}


def _structures(stats: dict[str, dict]) -> dict:
    out = {}
    present = {s for per_case in stats.values() for s in per_case}
    names = [s for s in STRUCTURES if s in present]
    for s in names:
        rows = [per_case[s] for per_case in stats.values() if s in per_case]
        ml = [r["ml"] for r in rows]
        hu = [r["hu_mean"] for r in rows if r["hu_mean"] is not None]
        out[s] = {"cases_present": sum(r["voxels"] > 0 for r in rows),
                  "ml_mean": round(float(np.mean(ml)), 2) if ml else None,
                  "ml_min": round(float(np.min(ml)), 2) if ml else None,
                  "ml_max": round(float(np.max(ml)), 2) if ml else None,
                  "hu_mean": round(float(np.mean(hu)), 1) if hu else None,
                  "hu_mean_sd_between_cases": round(float(np.std(hu)), 1) if len(hu) > 1 else None}
    return out


def build(params: Params, *, table: pd.DataFrame, names: dict[str, str], reviews: dict, stats: dict,
          privacy_dir: Path, metrics: dict, model_path, run_file, data_hash: str | None = None) -> dict:
    """The card as a JSON-able dict (see the module docstring); ``names``: internal case -> shared name."""
    cfg = params.share
    shared = table.case[table.shared].tolist()
    counts = {"made": int(len(table)), "passed_privacy": int((table.privacy == "pass").sum()),
              "accepted": int((table.accepts > 0).sum()), "rejected": int((table.rejects > 0).sum()),
              "stale_decisions": int(table.stale.sum()), "shared": len(shared)}
    from ctsynth.data.modality import unit
    kind = params.data.modality.upper()
    return {
        "name": cfg.name,
        "modality": kind,
        "unit": unit(params.data.modality),
        "description": (f"Synthetic cardiac {kind} volumes with labels: training masks warped in 3-D, {kind} drawn "
                        "slice by slice by a mask-conditioned GAN (ctsynth), screened for copies of training patients"
                        + (" and reviewed by experts" if cfg.require_review else "") + "."),
        "license": cfg.license or "UNSET: fill in share.license in params.yaml before you share this dataset",
        "intended_use": INTENDED_USE.format(modality=kind),
        "limitations": list(LIMITATIONS),
        "counts": counts,
        "selection": {"privacy": "passed the privacy stage (reports/privacy_cases.csv verdict 'pass')",
                      "review_required": cfg.require_review, "min_accepts": cfg.min_accepts,
                      "rule": ("no current rejection, and at least share.min_accepts acceptances"
                               if cfg.require_review else
                               "no current rejection (review NOT required: unreviewed cases are shared)")},
        "cases": sorted(names[c] for c in shared),
        "generator": _generator(model_path, run_file, params),
        "training_data": {"data_hash": data_hash,
                          "about": "hash of the processed store's bytes and the training patients (the train "
                                   "stage's ctsynth.data_hash); the generator's training_fingerprint adds every "
                                   "param that shaped it",
                          "label_map": {str(k): v for k, v in params.data.label_map.items()},
                          "structures": list(params.preprocess.structures)},
        "reviews": _reviews(reviews),
        "privacy": _privacy(Path(privacy_dir), shared),
        "structures": _structures({c: stats[c] for c in shared if c in stats}),
        "performance": {"set": "held-out test patients (reports/metrics.json)",
                        **{k: metrics.get(k) for k in PERFORMANCE_KEYS if k in metrics}},
        "layouts": {"pairs": "pairs/<case>" + params.data.image_suffix + " + <case>" + params.data.label_suffix,
                    "nnunet": "nnunet/imagesTr, nnunet/labelsTr, nnunet/dataset.json (labels 1..K)"},
        "checksums": "SHA256SUMS (sha256sum -c SHA256SUMS)",
    }


def markdown(card: dict) -> str:
    """``DATASET.md``: the card for people."""
    c, g, p = card["counts"], card["generator"], card["privacy"]
    lines = [f"# {card['name']}", "", card["description"], "",
             f"**License:** {card['license']}", "", "## Intended use", "", card["intended_use"], "",
             "## Counts", "", "| made | passed privacy | accepted by a reviewer | rejected by a reviewer | shared |",
             "|---|---|---|---|---|",
             f"| {c['made']} | {c['passed_privacy']} | {c['accepted']} | {c['rejected']} | {c['shared']} |", "",
             f"Selection: {card['selection']['rule']}.", ""]
    if c["stale_decisions"]:
        lines += [f"{c['stale_decisions']} review decision(s) are stale (made on a case whose files have changed "
                  f"since) and were not applied.", ""]
    lines += ["## Generator", "",
              f"- model file `{g['file']}` sha256 `{g.get('sha256')}`",
              f"- training data hash `{card['training_data']['data_hash']}` (processed store + training patients); "
              f"training fingerprint `{g.get('training_fingerprint')}` (data + every param), seed {g.get('seed')}, "
              f"{g.get('steps')} steps ({g.get('precision')}), {g.get('image_size')}² slices, window "
              f"{g.get('hu_window')} {card.get('unit', 'HU')}",
              f"- git commit `{g.get('git_commit')}`"]
    if g.get("mlflow"):
        m = g["mlflow"]
        lines.append(f"- MLflow run `{m['run_id']}` (experiment {m['experiment']}), model `{m['model_uri']}` (a "
                     f"registered version, with tracking.registered_model, is in that run's model registry entry)")
    lines += ["", "## Reviews", ""]
    people = card["reviews"]["reviewers"]
    if people:
        lines += ["| reviewer | accepted | rejected | stale | first | last |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['reviewer']} | {r['accepted']} | {r['rejected']} | {r['stale']} | {r['first']} | "
                  f"{r['last']} |" for r in people]
    else:
        lines.append("No expert has reviewed these cases (`ctsynth review`).")
    lines += ["", "## Privacy", "", f"- rule: {p.get('rule')}", f"- similarity: {p.get('distance')}"]
    for key, label in (("similarity_all_cases", "all synthetic slices"), ("similarity_shared_cases", "shared slices")):
        q = p.get(key)
        if q:
            lines.append(f"- nearest-training similarity of {label} (n {q['n']}): median {q['p50']}, 95th "
                         f"percentile {q['p95']}, max {q['p100']}")
    lines += ["", "## Structures of the shared cases", ""]
    if card["structures"]:
        unit = card.get("unit", "HU")
        lines += [f"| structure | cases | volume ml (mean, min-max) | mean {unit} (sd between cases) |",
                  "|---|---|---|---|"]
        lines += [f"| {s} | {v['cases_present']} | {v['ml_mean']} ({v['ml_min']}-{v['ml_max']}) | {v['hu_mean']} "
                  f"({v['hu_mean_sd_between_cases']}) |" for s, v in card["structures"].items()]
    else:
        lines.append("No case is shared.")
    perf = {k: v for k, v in card["performance"].items() if k != "set"}
    lines += ["", f"## Performance of the generator, on the {card['performance']['set']}", ""]
    lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in perf.items()]
    lines += ["", "## Limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", "## Files", "", f"- {card['layouts']['pairs']}", f"- {card['layouts']['nnunet']}",
              "- manifest.csv: per case its files, structure volumes, effective resolution and review counts "
              "(which patient a case was made from, and how, is not shared)",
              f"- {card['checksums']}", ""]
    return "\n".join(lines)
