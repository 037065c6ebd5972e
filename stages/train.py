"""train stage: the mask-conditioned cGAN (LSGAN + λ·L1), one process or DDP via torchrun.

    python stages/train.py                                   # one CPU / one GPU
    .venv/bin/torchrun --standalone --nproc-per-node 2 stages/train.py   # 2 GPUs (or 2 CPU procs)

Writes the generator (weights + model config + preprocessing, no params.yaml needed to run it),
checkpoints (persist: resume after an interruption), reports/train/losses.csv and evolution
snapshots, and the MLflow run id for the later stages. SIGTERM / Ctrl-C save a checkpoint and
exit with 143 / 130; rerunning resumes.
"""
from __future__ import annotations

from ctsynth.runner import add_inputs, stage_main


def add_args(parser) -> None:
    add_inputs(parser, "processed", "split")
    parser.add_argument("--model", default="models/generator.pt", help="output generator file")
    parser.add_argument("--checkpoints", default="models/checkpoints", help="checkpoint folder")
    parser.add_argument("--reports", default="reports/train", help="losses.csv and snapshots/")
    parser.add_argument("--run-file", default="models/mlflow_run.json", help="MLflow run id file")


def main(args, params) -> int:
    from ctsynth.train import train

    result = train(params, processed_dir=args.processed, split_path=args.split, out_model=args.model,
                   ckpt_dir=args.checkpoints, reports_dir=args.reports, run_file=args.run_file)
    return result.exit_code


if __name__ == "__main__":
    stage_main("train", main, __doc__, add_args=add_args)
