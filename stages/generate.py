"""generate stage: the trained generator on every selected slice of every *test* case.

Writes ``data/generated/``: ``fake.npy`` + ``index.npy`` (aligned with the processed store),
``grids/<case>.png`` (mask | real | generated | |difference|) and ``<case>_synth.nii.gz``
(synthetic CT in HU on the case's original grid and affine). The folder is replaced atomically.

    python stages/generate.py --model models/generator.pt --processed data/processed \\
        --split data/split.json --interim data/interim --out data/generated
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.synth import generate
    generate.run(params, model_path=args.model, processed_dir=args.processed,
                 split_path=args.split, interim_dir=args.interim, out_dir=args.out)
    return 0


def add_args(p):
    add_inputs(p, "model", "processed", "split", "interim")
    add_output(p, "generated", help="generated test set, replaced atomically")


if __name__ == "__main__":
    stage_main("generate", main, __doc__, add_args=add_args)
