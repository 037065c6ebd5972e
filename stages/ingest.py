"""ingest stage: find and validate image/label NIfTI pairs under ``data.raw_dir``, reorient
to canonical RAS+, map label values through ``data.label_map`` and write
``data/interim`` (volumes + manifest.csv).

    python stages/ingest.py --out data/interim
"""
from ctsynth.core.runner import add_output, stage_main


def main(args, params):
    from ctsynth.data import ingest
    ingest.run(params, out_dir=args.out, raw_dir=args.raw)
    return 0


def add_args(p):
    p.add_argument("--raw", default=None, help="folder of pairs (default: data.raw_dir)")
    add_output(p, "interim")


if __name__ == "__main__":
    stage_main("ingest", main, __doc__, add_args=add_args, uses_torch=False)
