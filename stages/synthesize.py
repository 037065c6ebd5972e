"""synthesize stage: new labelled cases from the *training* masks and the trained generator.

Writes ``data/synthetic/``: ``synthesize.cases`` image/label NIfTI pairs (``<id><image_suffix>`` +
``<id><label_suffix>``, the source's raw label values; the layout ingest reads, so the folder can be
used as ``data.raw_dir``) and ``manifest.csv`` (source case, draw seed and every drawn parameter).
Each label volume is a training mask warped by a random 3-D affine + smooth deformation (kornia);
each CT slice is drawn by the generator. The folder is replaced atomically.

    python stages/synthesize.py --model models/generator.pt --interim data/interim \\
        --split data/split.json --out data/synthetic
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.synth import synthesize
    synthesize.run(params, model_path=args.model, interim_dir=args.interim, split_path=args.split,
                   out_dir=args.out)
    return 0


def add_args(p):
    add_inputs(p, "model", "interim", "split")
    add_output(p, "synthetic", help="synthetic labelled cases, replaced atomically")


if __name__ == "__main__":
    stage_main("synthesize", main, __doc__, add_args=add_args)
