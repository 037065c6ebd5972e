"""preprocess stage: canonical volumes -> resized, HU-windowed axial slices and structure
masks in memory-mapped arrays (``data/processed``).

    python stages/preprocess.py --interim data/interim --out data/processed
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.data import preprocess
    preprocess.run(params, interim_dir=args.interim, out_dir=args.out)
    return 0


def add_args(p):
    add_inputs(p, "interim")
    add_output(p, "processed")


if __name__ == "__main__":
    stage_main("preprocess", main, __doc__, add_args=add_args, uses_torch=False)
