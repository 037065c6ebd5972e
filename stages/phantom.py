"""phantom stage: write the procedural thoracic CT phantom (MM-WHS layout) when
``data.source: phantom``; with ``data.source: nifti`` it writes only a note, and ingest reads
``data.raw_dir`` instead.

    python stages/phantom.py --out data/phantom
"""
from ctsynth.core.runner import stage_main


def main(args, params):
    from ctsynth.data import phantom
    phantom.run(params, args.out)
    return 0


def cli(argv=None):
    stage_main("phantom", main, __doc__, argv=argv,
               add_args=lambda p: p.add_argument("--out", default="data/phantom"))


if __name__ == "__main__":
    cli()
