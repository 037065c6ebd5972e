"""split stage: patient-level train/val/test split -> ``data/split.json``.

    python stages/split.py --processed data/processed --out data/split.json
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.data import split
    split.run(params, processed_dir=args.processed, out_path=args.out)
    return 0


def add_args(p):
    add_inputs(p, "processed")
    add_output(p, "split")


if __name__ == "__main__":
    stage_main("split", main, __doc__, add_args=add_args)
