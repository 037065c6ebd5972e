"""report stage: one self-contained HTML report plus its figures as PNG files.

Reads (all optional except params): reports/metrics.json, metrics_notes.json, per_case.csv,
per_structure.csv, privacy.csv, utility.csv; data/generated/grids; data/processed/meta.json; data/split.json;
data/interim/manifest.csv; reports/train/losses.csv and snapshots; data/synthetic (one
synthetic case). It renders files only: it never loads or runs a model. Writes
reports/report.html and reports/figures/*.png atomically, then logs them with all metrics into the training run named in --run-file (if tracking is on).

    python stages/report.py --out reports/report.html --figures reports/figures \\
        [--run-file models/mlflow_run.json]
"""
import logging
from pathlib import Path

from ctsynth.core.runner import add_inputs, stage_main

log = logging.getLogger("ctsynth.report.html")


def main(args, params):
    from ctsynth.report import html as report
    files = report.run(params, reports_dir=args.reports, generated_dir=args.generated,
                       processed_dir=args.processed, train_reports_dir=args.train_reports,
                       out_html=args.out, figures_dir=args.figures, split_path=args.split,
                       manifest_path=args.manifest,
                       synthetic_dir=args.synthetic)
    if args.run_file is None or not Path(args.run_file).exists():
        log.info("no MLflow run file (%s): report not logged to MLflow", args.run_file)
        return 0
    from ctsynth.core.tracking import log_evaluation

    # metrics.json + its intervals as <metric>_ci95_lo/_hi, the report and its figures
    log_evaluation(args.run_file, params, report.logged_numbers(Path(args.reports) / "metrics.json"), files)
    return 0


def add_args(p):
    p.add_argument("--reports", default="reports", help="evaluate outputs (metrics.json, csv files)")
    add_inputs(p, "generated", "processed", "split", "synthetic")
    p.add_argument("--manifest", default="data/interim/manifest.csv")
    p.add_argument("--train-reports", default="reports/train", help="losses.csv and snapshots/")
    p.add_argument("--out", default="reports/report.html")
    p.add_argument("--figures", default="reports/figures")
    p.add_argument("--run-file", default=None, help="MLflow run file written by train (optional)")


if __name__ == "__main__":
    stage_main("report", main, __doc__, add_args=add_args)
