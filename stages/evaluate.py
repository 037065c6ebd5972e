"""evaluate stage: metrics of the generated test set -> ``reports/``.

Writes ``headline.json`` and ``validation.json`` (dvc metrics: the test patients' headline, to
report; the validation patients' ``val_*`` scores, to choose defaults and variants on),
``metrics.json``, ``metrics_ci.json``, ``metrics_notes.json`` (definitions, reasons for null
metrics), ``per_case.csv``, ``per_structure.csv``, ``privacy.csv``, ``shareable.json`` and
``plots/*.csv`` (see ``ctsynth.evaluate``).

    python stages/evaluate.py --processed data/processed --split data/split.json \\
        --generated data/generated --segmenter models/segmenter.pt --out reports

The metrics reach MLflow through the report stage, which logs them with the report into the
training run.
"""
from ctsynth.core.runner import add_inputs, add_output, add_path, stage_main


def main(args, params):
    from ctsynth.evaluate import evaluate
    evaluate.run(params, processed_dir=args.processed, split_path=args.split,
                 generated_dir=args.generated, segmenter_path=args.segmenter, out_dir=args.out,
                 utility_path=args.utility)
    return 0


def add_args(p):
    add_inputs(p, "processed", "split", "generated", "segmenter")
    add_path(p, "utility", optional=True, help="the utility stage's results, merged into metrics.json / "
                                               "metrics_ci.json")
    add_output(p, "reports")


if __name__ == "__main__":
    stage_main("evaluate", main, __doc__, add_args=add_args)
