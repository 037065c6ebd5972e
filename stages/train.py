"""train stage: the mask-conditioned cGAN (LSGAN + λ·L1), one process or DDP.

    python stages/train.py            # train.nproc x train.nnodes processes (1: no torchrun)

With ``train.nproc`` > 1 (GPUs, or CPU processes with gloo) this script starts itself under
``torchrun --standalone``; with ``train.nnodes`` > 1 under torchrun's c10d rendezvous at
``train_run.rdzv_endpoint`` (run the same command on every node).

Writes the generator (weights + model config + preprocessing, no params.yaml needed to run it),
reports/train/losses.csv and evolution snapshots, and the MLflow run id for the later stages.
Checkpoints go to <checkpoints>/<fingerprint>/, a working folder of the repository (not a DVC
output; under `dvc exp run --queue/--temp` the user's repository, not the temporary copy).
SIGTERM / Ctrl-C save a checkpoint and exit with 143 / 130; rerunning resumes.
"""
from __future__ import annotations

import os
import sys

from ctsynth.core.runner import add_inputs, add_output, stage_main


def add_args(parser) -> None:
    add_inputs(parser, "processed", "split")
    add_output(parser, "model", "--model")
    add_output(parser, "checkpoints", "--checkpoints",
               help="checkpoint working folder; relative to the project root ($DVC_ROOT)")
    add_output(parser, "train_reports", "--reports")
    add_output(parser, "run_file", "--run-file")


def main(args, params) -> int:
    from ctsynth.core.io import project_root
    from ctsynth.train.distributed import torchrun_argv

    cfg = params.train
    argv = torchrun_argv(cfg.nproc, cfg.nnodes, params.train_run.rdzv_endpoint, __file__, sys.argv[1:])
    if argv:                                   # become torchrun: signals reach it directly
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)
    from ctsynth.train import train
    ckpts = project_root() / args.checkpoints   # an absolute --checkpoints stays as given
    result = train.run(params, processed_dir=args.processed, split_path=args.split, out_model=args.model,
                       ckpt_dir=ckpts, reports_dir=args.reports, run_file=args.run_file)
    return result.exit_code


if __name__ == "__main__":
    stage_main("train", main, __doc__, add_args=add_args)
