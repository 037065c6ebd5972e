"""What every stage script and CLI command shares: argument parsing, logging, seeding and the
"one clean line per problem, non-zero exit, no traceback" error policy.

A stage script is::

    def main(args, params):            # params: validated ctsynth.core.config.Params
        ingest.run(params, out=args.out)

    if __name__ == "__main__":
        stage_main("ingest", main, __doc__, add_args=lambda p: add_output(p, "interim"))

Path options default to the pipeline's paths (``ctsynth.core.paths``): ``add_inputs`` for what a
stage reads, ``add_output`` for what it writes.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Callable

import numpy as np

from ctsynth.core.errors import CtsynthError
from ctsynth.core.paths import PATHS

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


def seed_everything(seed: int, torch: bool = True) -> None:
    """Seed python, numpy and (``torch``: for stages that use it) torch; make torch ops deterministic.

    The deterministic flag is set with ``torch._C._set_deterministic_algorithms``, the call
    ``torch.use_deterministic_algorithms`` makes after importing ``torch._inductor.config`` (which
    pulls in the whole compiler stack: ~4 s of every stage's start on a 2-core CPU, for a setting
    only ``torch.compile`` reads); training sets the compiler's flag too when it compiles."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch:
        import torch as _torch

        _torch.manual_seed(seed)
        _torch._C._set_deterministic_algorithms(True, warn_only=True)


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


def add_path(parser: argparse.ArgumentParser, name: str, flag: str | None = None, *,
             optional: bool = False, help: str | None = None) -> argparse.Action:
    """Add the option ``flag`` (default ``--<name>``) for the pipeline path ``name``
    (:data:`ctsynth.core.paths.PATHS`), defaulting to that path -- or, with ``optional``, to
    None (the option is then off unless given). The action's ``pipeline_name`` is ``name``."""
    default, what = PATHS[name]
    flag = flag or "--" + name.replace("_", "-")
    text = f"{help or what}; " + (f"off unless given (the pipeline passes {default})" if optional
                                  else f"default {default}")
    action = parser.add_argument(flag, default=None if optional else default, help=text)
    action.pipeline_name = name
    return action


def add_inputs(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--<name>`` for each pipeline path in ``names`` a stage reads, defaulting to it."""
    for name in names:
        add_path(parser, name)


def add_output(parser: argparse.ArgumentParser, name: str, flag: str = "--out", help: str | None = None) -> None:
    """Add ``--out`` (or ``flag``) for the pipeline path ``name`` a stage writes, defaulting to it."""
    add_path(parser, name, flag, help=help)


def stage_main(name: str, main: Callable, doc: str | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, uses_torch: bool = True) -> None:
    """Entry point of ``stages/<name>.py``: parse args, load params, run, exit. ``uses_torch=False``
    (stages that never touch torch) skips importing and seeding it: seconds per stage."""
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
        seed_everything(params.seed, torch=uses_torch)
        return main(args, params)

    sys.exit(guarded(name, run, args.debug))
