"""preprocess stage: canonical volumes -> resized, HU-windowed axial slices and structure
masks in memory-mapped arrays (``data/processed``).

    python stages/preprocess.py --interim data/interim --out data/processed
"""
from ctsynth.core.runner import add_inputs, stage_main


def main(args, params):
    from ctsynth.data import preprocess
    preprocess.run(params, interim_dir=args.interim, out_dir=args.out)
    return 0


def add_args(p):
    add_inputs(p, "interim")
    p.add_argument("--out", default="data/processed")


def cli(argv=None):
    stage_main("preprocess", main, __doc__, add_args=add_args, argv=argv)


if __name__ == "__main__":
    cli()
