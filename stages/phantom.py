"""phantom stage: write the procedural thoracic CT phantom (MM-WHS layout) when
``data.source: phantom``; with ``data.source: nifti`` it writes only a note, and ingest reads
``data.raw_dir`` instead.

    python stages/phantom.py --out data/phantom
"""
from ctsynth.core.runner import add_output, stage_main


def main(args, params):
    from ctsynth.data import phantom
    phantom.run(params, args.out)
    return 0


def add_args(p):
    add_output(p, "phantom")


if __name__ == "__main__":
    stage_main("phantom", main, __doc__, add_args=add_args, uses_torch=False)
