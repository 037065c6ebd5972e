"""share stage: the synthetic cases that may be shared, with a dataset card and checksums.

A case of ``data/synthetic`` is shared when it passed the privacy stage, no reviewer's current
decision (``reviews/<reviewer>.jsonl``, from ``ctsynth review``) rejects it and, with
``share.require_review``, at least ``share.min_accepts`` reviewers accepted it. Writes
``data/share/`` (pairs and nnU-Net layouts, manifest.csv, dataset_card.json, DATASET.md,
SHA256SUMS; atomically) and ``reports/share.json`` (the counts). See ``ctsynth.share.share``.

    python stages/share.py --synthetic data/synthetic --reports reports --reviews reviews \\
        --metrics reports/metrics.json --model models/generator.pt --run-file models/mlflow_run.json \\
        --processed data/processed --split data/split.json --out data/share --counts reports/share.json
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.share import share
    share.run(params, synthetic_dir=args.synthetic, privacy_dir=args.reports, reviews_dir=args.reviews,
               metrics_path=args.metrics, model_path=args.model, run_file=args.run_file, out_dir=args.out,
               out_json=args.counts, processed_dir=args.processed, split_path=args.split)
    return 0


def add_args(p):
    add_inputs(p, "synthetic", "reports", "reviews", "metrics", "model", "run_file", "processed", "split")
    add_output(p, "share")
    add_output(p, "share_counts", "--counts")


if __name__ == "__main__":
    stage_main("share", main, __doc__, add_args=add_args, uses_torch=False)
