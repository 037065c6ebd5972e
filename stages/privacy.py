"""privacy stage: screen every case of the synthetic dataset for copies of training patients.

Each labelled slice of ``data/synthetic`` against every training slice (in-body SSIM, withheld
above the threshold calibrated on the validation patients, as in the evaluate stage), and each
case's mask against the training mask it was warped from. Writes ``reports/privacy_cases.csv``
(one row per case: scores, nearest training case and slice, verdict, reason),
``reports/privacy_synthetic.csv`` (one row per slice) and ``reports/privacy_synthetic.json``
(the rules and counts). See ``ctsynth.privacy.privacy``.

    python stages/privacy.py --synthetic data/synthetic --processed data/processed \\
        --split data/split.json --interim data/interim --out reports
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.privacy import privacy
    privacy.run(params, synthetic_dir=args.synthetic, processed_dir=args.processed, split_path=args.split,
                  interim_dir=args.interim, out_dir=args.out)
    return 0


def add_args(p):
    add_inputs(p, "synthetic", "processed", "split", "interim")
    add_output(p, "reports")


if __name__ == "__main__":
    stage_main("privacy", main, __doc__, add_args=add_args)
