"""report stage: one self-contained HTML report plus its figures as PNG files.

Reads (all optional except params): reports/metrics.json, metrics_notes.json, per_case.csv,
per_structure.csv, privacy.csv, utility.csv; data/generated/grids; data/processed/meta.json; data/split.json;
data/interim/manifest.csv; reports/train/losses.csv and snapshots; data/synthetic (one
synthetic case); reports/share.json and the card of data/share (logged to MLflow); the utility
study's studies/utility/published.json (the summary leads with its sentence). It renders
files only: it never loads or runs a model. Writes
reports/report.html and reports/figures/*.png atomically, then logs them with all metrics into
the training run named in --run-file (if tracking is on).

    python stages/report.py --out reports/report.html --figures reports/figures \\
        [--run-file models/mlflow_run.json]
"""
import json
import logging
from pathlib import Path

from ctsynth.core.runner import add_inputs, add_output, add_path, stage_main

log = logging.getLogger("ctsynth.report.report")


def main(args, params):
    from ctsynth.report import report
    files = report.run(params, reports_dir=args.reports, generated_dir=args.generated,
                       processed_dir=args.processed, train_reports_dir=args.train_reports,
                       out_html=args.out, figures_dir=args.figures, split_path=args.split,
                       manifest_path=args.manifest,
                       synthetic_dir=args.synthetic, study_path=args.study_utility,
                       generator_path=args.model, study_lock=args.study_lock)
    if args.run_file is None or not Path(args.run_file).exists():
        log.info("no MLflow run file (%s): report not logged to MLflow", args.run_file)
        return 0
    from ctsynth.core.tracking import log_evaluation
    from ctsynth.evaluate.results import Results
    from ctsynth.privacy.privacy import mlflow_metrics

    # every metric and interval under its registry name (headline first), the privacy stage's
    # screening of the synthetic dataset, the share stage's counts and card, the report and its figures
    results = Results.read(Path(args.reports))
    log_evaluation(args.run_file, params, {**(results.mlflow() if results else {}), **mlflow_metrics(args.reports),
                                           **share_counts(args.share_counts)}, files,
                   artifacts={**{str(Path(args.share) / name): "share" for name in ("dataset_card.json", "DATASET.md")},
                              **{str(Path(args.reports) / name): "metrics" for name in ("metrics.json",
                                                                                         "metrics_ci.json")}})
    return 0


def share_counts(path) -> dict:
    """The share stage's counts (reports/share.json) under MLflow names ``share/<key>``; {} when absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    counts = json.loads(path.read_text()).get("counts", {})
    return {f"share/{k}": v for k, v in counts.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def add_args(p):
    add_inputs(p, "reports", "generated", "processed", "split", "synthetic", "manifest", "train_reports", "share",
               "share_counts", "study_utility", "study_lock", "model")
    add_output(p, "report")
    add_output(p, "figures", "--figures")
    add_path(p, "run_file", optional=True, help="MLflow run file written by train: log the report there")


if __name__ == "__main__":
    stage_main("report", main, __doc__, add_args=add_args)
