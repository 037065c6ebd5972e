"""segmenter stage: a small UNet trained on REAL training slices -> ``models/segmenter.pt``.

Its encoder features give ``fd_seg``/``kid_seg`` and its predictions the segmentation-consistency
Dice in the evaluate stage (see ``ctsynth.segmenter.segmenter``).

    python stages/segmenter.py --processed data/processed --split data/split.json --out models/segmenter.pt
"""
from ctsynth.core.runner import add_inputs, add_output, stage_main


def main(args, params):
    from ctsynth.segmenter import segmenter
    segmenter.run(params, processed_dir=args.processed, split_path=args.split, out_path=args.out)
    return 0


def add_args(p):
    add_inputs(p, "processed", "split")
    add_output(p, "segmenter")


if __name__ == "__main__":
    stage_main("segmenter", main, __doc__, add_args=add_args)
