"""utility stage: does the synthetic labelled data help segmentation?

The segmenter (same architecture, budget and seed as the segmenter stage) trained on real training
slices only (the segmenter stage's model, reused), on ``data/synthetic`` only, and on both; Dice
per structure on the *real* test slices with patient-level 95 % intervals. Writes
``reports/utility.json`` (merged into ``metrics.json`` by the evaluate stage) and
``reports/utility.csv`` (the report's bar chart). See ``ctsynth.utility.utility``.

    python stages/utility.py --synthetic data/synthetic --processed data/processed \\
        --split data/split.json --segmenter models/segmenter.pt --out reports/utility.json
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.utility import utility
    utility.run(params, synthetic_dir=args.synthetic, processed_dir=args.processed, split_path=args.split,
                segmenter_path=args.segmenter, out_json=args.out, out_csv=args.table)
    return 0


def add_args(p):
    add_inputs(p, "synthetic", "processed", "split", "segmenter")
    add_output(p, "utility")
    add_output(p, "utility_table", "--table")


if __name__ == "__main__":
    stage_main("utility", main, __doc__, add_args=add_args)
