"""What every stage script and CLI command shares: argument parsing, logging, seeding and the
"one clean line per problem, non-zero exit, no traceback" error policy.

A stage script is::

    def main(args, params):            # params: validated ctsynth.config.Params
        ingest.run(params, out=args.out)

    if __name__ == "__main__":
        stage_main("ingest", main, __doc__, add_args=lambda p: p.add_argument("--out"))
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from typing import Callable

import numpy as np

from ctsynth.core.errors import CtsynthError

log = logging.getLogger("ctsynth")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(debug: bool = False) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format=f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("matplotlib", "PIL", "urllib3", "alembic", "mlflow", "git", "filelock", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; make torch CPU ops deterministic."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def report_error(err: CtsynthError, where: str) -> None:
    for problem in err.problems:
        print(f"ctsynth {where}: {err.kind}: {problem}", file=sys.stderr)


def guarded(where: str, fn: Callable[[], int | None], debug: bool) -> int:
    """Run ``fn``; map expected failures to a clean message and exit code."""
    try:
        return int(fn() or 0)
    except CtsynthError as err:
        if debug:
            raise
        report_error(err, where)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"ctsynth {where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# Files one stage writes and later stages read, with the paths dvc.yaml passes: every stage script
# declares the ones it reads with add_inputs(parser, "processed", "split", ...).
STAGE_INPUTS = {
    "interim": ("data/interim", "canonical volumes and manifest.csv (ingest)"),
    "processed": ("data/processed", "processed slice store (preprocess)"),
    "split": ("data/split.json", "patient-level train/val/test split (split)"),
    "model": ("models/generator.pt", "trained generator (train)"),
    "segmenter": ("models/segmenter.pt", "segmentation network for FD/KID and Dice (segmenter)"),
    "generated": ("data/generated", "generated test set (generate)"),
    "synthetic": ("data/synthetic", "synthetic labelled cases (synthesize)"),
}


def add_inputs(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--<name>`` for each stage input in ``names``, defaulting to its pipeline path."""
    for name in names:
        default, what = STAGE_INPUTS[name]
        parser.add_argument(f"--{name}", default=default, help=f"{what}; default {default}")


def stage_main(name: str, main: Callable, doc: str | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None) -> None:
    """Entry point of ``stages/<name>.py``: parse args, load params, run, exit."""
    from ctsynth.core.config import load_params

    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.iterations=10 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    def run():
        params = load_params(args.params, args.set)
        seed_everything(params.seed)
        return main(args, params)

    sys.exit(guarded(name, run, args.debug))
