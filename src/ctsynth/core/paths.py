"""Every file and folder the pipeline passes between stages, in one table.

``PATHS[name] = (path, what)``: the path relative to the project root that ``dvc.yaml`` passes,
and one line saying what it holds (and which stage writes it). The stage scripts' path options
default to these (``ctsynth.core.runner.add_inputs`` / ``add_output``) and tracking looks the
training data up in dvc.lock by them. ``dvc.yaml`` spells the paths too (DVC needs them);
``tests/test_paths.py`` holds its commands and the scripts' defaults equal to this table.
"""
from __future__ import annotations

PATHS: dict[str, tuple[str, str]] = {
    "phantom": ("data/phantom", "procedural phantom cases, image/label NIfTI pairs (phantom)"),
    "interim": ("data/interim", "canonical volumes and manifest.csv (ingest)"),
    "manifest": ("data/interim/manifest.csv", "one row per ingested case (ingest)"),
    "processed": ("data/processed", "processed slice store (preprocess)"),
    "split": ("data/split.json", "patient-level train/val/test split (split)"),
    "model": ("models/generator.pt", "trained generator (train)"),
    "run_file": ("models/mlflow_run.json", "MLflow run id of the training (train)"),
    "train_reports": ("reports/train", "losses.csv and snapshots/ (train)"),
    "checkpoints": ("models/checkpoints", "training checkpoints; a working folder, not a DVC output (train)"),
    "segmenter": ("models/segmenter.pt", "segmentation network for FD/KID and Dice (segmenter)"),
    "generated": ("data/generated", "generated test set (generate)"),
    "synthetic": ("data/synthetic", "synthetic labelled cases (synthesize)"),
    "reviews": ("reviews", "expert decisions, one <reviewer>.jsonl per reviewer (ctsynth review; git-tracked)"),
    "metrics": ("reports/metrics.json", "every metric of the evaluation (evaluate)"),
    "share": ("data/share", "the shareable synthetic dataset with its card and checksums (share)"),
    "share_counts": ("reports/share.json", "what the share stage kept and why (share)"),
    "utility": ("reports/utility.json", "utility metrics, intervals and notes (utility)"),
    "utility_table": ("reports/utility.csv", "Dice per training set and structure (utility)"),
    "study_utility": ("studies/utility/published.json", "the utility study's sentence, curve and contrasts "
                      "(written by `./run repro studies/utility/dvc.yaml`; git-tracked, no stage's output)"),
    "study_lock": ("studies/utility/dvc.lock", "which generator the utility study's cells used (its DVC lock)"),
    "reports": ("reports", "metrics, intervals, notes, per-case tables and plots (evaluate)"),
    "report": ("reports/report.html", "the HTML report (report)"),
    "figures": ("reports/figures", "the report's figures as PNG files (report)"),
}

# inside the generated folder: which training made the slices, on what machine (generate -> evaluate)
GENERATED_PROVENANCE = "model.json"
# inside the generated folder's val/: the validation slices a model with anatomy draws without it (generate -> evaluate)
HEART_ONLY = "heart_only"


def pipeline_path(name: str) -> str:
    """The pipeline path of ``name`` (a key of :data:`PATHS`)."""
    return PATHS[name][0]
