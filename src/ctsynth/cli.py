"""The `ctsynth` command.

    ctsynth phantom --out data/my_phantom --cases 4 --seed 1
    ctsynth generate --model models/generator.pt --mask mask.nii.gz --out synth.nii.gz
    ctsynth synthesize --labels data/phantom --pattern '*_label.nii.gz' --out synth/ --cases 50 [--layout nnunet]
    ctsynth review --reviewer alice [--port 8765] [--no-browser]
    ctsynth study utility-cell --n 2 --draw 1 --out cells/n2-d1.json   (run by studies/utility/dvc.yaml)
    ctsynth check-params [--params params/paper.yaml]
    ctsynth preset paper [--params params.yaml] [--out params.yaml]
    ctsynth bench [--quick] [--paths fp32_cl,compile]
    ctsynth compare run --set model.context_slices=0,1 --seeds 1,2,3 [--name ctx] [--jobs 2] [--dry-run]
    ctsynth compare show [--name ctx ...] [--metrics val_ssim] [--baseline model.context_slices=0] [--out F] [--test]

Pipeline stages are run by DVC (`dvc repro`), not from here; see README.
"""
from __future__ import annotations

import argparse
import sys

from ctsynth.core.config import GenerateCfg, Params, PhantomCfg, SynthesizeCfg
from ctsynth.core.paths import pipeline_path
from ctsynth.core.runner import guarded, setup_logging


def _phantom(args) -> int:
    from ctsynth.data.phantom import write_dataset

    ids = write_dataset(args.out, cases=args.cases, seed=args.seed, shape=tuple(args.shape),
                        spacing=tuple(args.spacing), modality=args.modality)
    print(f"wrote {len(ids)} phantom cases to {args.out}")
    return 0


def _generate(args) -> int:
    from ctsynth.synth.inference import generate_file

    stats = generate_file(args.model, args.mask, args.out, structures=args.structures,
                          label_map=args.label_map, contrast_hu=args.contrast, anatomy=args.anatomy,
                          anatomy_map=args.anatomy_map, seed=None if args.no_noise else args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _synthesize(args) -> int:
    from ctsynth.synth.synthesize import synthesize_folder

    manifest = synthesize_folder(args.model, args.labels, args.out, cases=args.cases, seed=args.seed,
                                 label_map=args.label_map, layout=args.layout, pattern=args.pattern,
                                 structures=args.structures, contrast_hu=args.contrast,
                                 anatomy_suffix=args.anatomy_suffix, label_suffix=args.label_suffix,
                                 anatomy_map=args.anatomy_map)
    print(f"wrote {len(manifest)} synthetic cases ({args.layout} layout) from "
          f"{manifest.source.nunique()} label volumes to {args.out}; draws in {args.out}/manifest.csv")
    return 0


SYNTHESIZE_HELP = """New labelled cases from a folder of label NIfTIs: each case warps one of them (in turn) by a
random 3-D affine (rotation, anisotropic scale, translation) and a smooth deformation (kornia),
redrawn when a structure vanishes or splits; the trained generator draws its CT slice by slice
(int16 HU on the label's grid and affine). Layouts: 'pairs' (<id>_image.nii.gz + <id>_label.nii.gz
with the input's label values, the layout `ingest` reads: use the folder as data.raw_dir) or
'nnunet' (imagesTr/<id>_0000.nii.gz, labelsTr/<id>.nii.gz with labels 1..K, dataset.json; put it
in nnUNet_raw/DatasetXXX_Name). manifest.csv records each case's source and draw. The ranges
are params.yaml's synthesize defaults; the pipeline's `synthesize` stage uses params.yaml itself."""


REVIEW_HELP = """A local web page on which an expert reviews the synthetic cases (data/synthetic): CT and mask in
axial, coronal and sagittal views with slice sliders, the privacy screening with the nearest
training slice beside each screened slice, and the draw that made the case. Accept, or reject with
a reason, by click or key (a, 1-4; j/k next/previous). Each decision is saved at once to
reviews/<reviewer>.jsonl with the case's content hash: commit that file, and `dvc repro share`
applies it (a decision on a case that has changed since is stale and not applied). Served on
127.0.0.1 unless --host says otherwise; the page makes no external request."""


def _review(args) -> int:
    import getpass

    from ctsynth.core.config import load_params
    from ctsynth.tools.review import ReviewData, serve

    params = load_params(args.params)
    reviewer = args.reviewer or getpass.getuser()
    data = ReviewData(args.synthetic, args.reviews, reviewer, params.data.label_map,
                      hu_window=params.preprocess.hu_window, privacy_dir=args.reports, processed_dir=args.processed)
    serve(data, host=args.host, port=args.port, open_browser=not args.no_browser)
    return 0


def _study(args) -> int:
    from ctsynth.core.config import load_params
    from ctsynth.tools import utility_study

    if args.study_command == "utility-summary":
        summary = utility_study.summarize(args.cells, args.out, args.study, load_params(args.params), args.publish)
        print(summary["sentence"])
        return 0
    utility_study.run_cell(load_params(args.params), args.study, args.n, args.draw, args.processed, args.split,
                     interim_dir=args.interim, model_path=args.model, out_json=args.out)
    return 0


def _study_parser(sub) -> None:
    p = sub.add_parser("study", help="steps of the on-demand studies (run them with dvc repro studies/<name>/dvc.yaml)")
    verbs = p.add_subparsers(dest="study_command", required=True)
    c = verbs.add_parser("utility-cell", help="one cell of the utility study: n real patients, one draw")
    c.add_argument("--n", type=int, required=True, help="real training patients (0: all)")
    c.add_argument("--draw", type=int, required=True, help="which draw of n patients (1, 2, ...)")
    c.add_argument("--out", required=True, help="the cell's JSON (written atomically)")
    c.add_argument("--study", default="studies/utility/params.yaml", help="the study's params (its study section)")
    c.add_argument("--params", default="params.yaml", help="the pipeline's params (segmenter, synthesize, ...)")
    for name in ("processed", "split", "interim", "model"):
        c.add_argument(f"--{name}", default=pipeline_path(name), help=f"default {pipeline_path(name)}")
    s = verbs.add_parser("utility-summary", help="the utility study's table, figure and sentence from its cells")
    s.add_argument("--cells", required=True, help="folder of cell JSON files")
    s.add_argument("--out", required=True, help="output folder: curve.csv, contrasts.csv, summary.json, ...")
    s.add_argument("--study", default="studies/utility/params.yaml", help="the study's params")
    s.add_argument("--params", default="params.yaml", help="the pipeline's params (tracking: where MLflow logs)")
    s.add_argument("--publish", default=None,
                   help="also write the sentence, curve and contrasts the pipeline's report leads with here "
                        "(studies/utility/published.json)")
    p.set_defaults(func=_study)


def _check_params(args) -> int:
    from ctsynth.core.config import load_params

    load_params(args.params, args.set)
    print(f"{args.params}: ok")
    return 0


def _preset(args) -> int:
    from ctsynth.tools.presets import apply_preset

    expanded = apply_preset(args.preset, args.params, args.out)
    print(f"{args.out}: {args.params} + {expanded.overlay}: {len(expanded.changed)} values changed, "
          f"validated")
    for key, (old, new) in expanded.changed.items():
        print(f"  {key}: {old!r} -> {new!r}")
    return 0


PRESET_HELP = """Merge a preset into a params file: an overlay holding only the keys it sets (params/<NAME>.yaml,
e.g. paper = params/paper.yaml, or any YAML file) is merged key by key into --params, every comment
kept; the result is validated like `ctsynth check-params` and written atomically to --out. An
overlay key that params.yaml does not define is an error (all of them at once); nothing is written
then. Prints the values that changed."""


def _bench(args) -> int:
    from ctsynth.tools.bench.suite import main as bench_main

    paths = tuple(n for n in args.paths.split(",") if n) + (("compile",) if args.compile else ())
    return bench_main(quick=args.quick, out=args.out, device=args.device, paths=paths, repeats=args.repeats,
                      threads=args.threads)


BENCH_PATHS = ("fp32_cl", "nchw_fused", "nchw_foreach", "cl_fused", "nchw_nomkldnn", "cl_nomkldnn",
               "nchw_compile", "bf16_cl", "nondet", "compile")
BENCH_HELP = """Time the paper architecture (7/7 UNet, 5-layer PatchGAN, LSGAN + L1) on this machine: training
images/s at 256² batch 1 and 4 and 128² batch 8 for a plain baseline (fp32, NCHW, eager, unfused
Adam) and for the pipeline's default path (params.yaml's train section), their ratio, generation
slices/s at 256², loader slices/s, and peak memory of training and evaluate. It also measures
the fp32 and bf16 matrix-product rates and the work per image, and prints the throughput ceiling
they imply. Prints a table, writes reports/bench.json ({"machine", "records"}). On a GPU it
measures the GPU. The full run takes about 10 minutes on 2 CPU cores; --quick about one."""


def _compare_run(args) -> int:
    from ctsynth.tools.compare import run

    return run(args.set, args.seeds, seed_key=args.seed_key, name=args.name, jobs=args.jobs, dry_run=args.dry_run)


def _compare_show(args) -> int:
    from ctsynth.tools.compare import show

    show(name=args.name, metrics=args.metrics, baseline=args.baseline, out=args.out, seed_key=args.seed_key,
         rev=args.rev, test=args.test)
    return 0


COMPARE_HELP = """Training-seed spread of a comparison, on top of `dvc exp` (docs/compare.md).
'run' trains every combination of the --set values with every seed as queued DVC experiments
(<name>-<i>), skipping the points that already are finished experiments with exactly those params
(a rerun resumes), then runs the queue (`dvc queue start -j N`) and waits for it. 'show' groups the
finished experiments by the params that differ between them but the seed key and reports, per
metric, mean +- sd over seeds and the paired per-seed difference to a baseline configuration with
a t-interval over seeds: training noise on the same patients, not a patient-level interval."""


def _compare_parser(sub) -> None:
    """``ctsynth compare run|show`` (ctsynth.tools.compare)."""
    from ctsynth.tools.compare import DEFAULT_NAME, DEFAULT_SEED_KEY

    p = sub.add_parser("compare", help="seed grids of DVC experiments: run them, compare configurations over seeds",
                       description=COMPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="compare_command", required=True)
    seed_help = f"params key(s) the seed is set with, comma-separated (default {DEFAULT_SEED_KEY})"
    r = verbs.add_parser("run", help="queue and run the grid x seeds as DVC experiments, wait for them")
    r.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid key and its values (repeatable; the grid is their product)")
    r.add_argument("--seeds", required=True, metavar="S1,S2,...", help="training seeds, e.g. 1,2,3")
    r.add_argument("--seed-key", default=DEFAULT_SEED_KEY, help=seed_help)
    r.add_argument("--name", default=DEFAULT_NAME, help=f"study name: experiments <name>-<i> (default {DEFAULT_NAME})")
    r.add_argument("--jobs", type=int, default=1, help="experiments run at once (dvc queue start -j; default 1)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and the dvc commands, run nothing")
    r.set_defaults(func=_compare_run)
    s = verbs.add_parser("show", help="mean +- sd over seeds and paired differences to a baseline, per metric")
    s.add_argument("--name", action="append", default=None,
                   help="study name (experiments <name>-<i>; repeatable: a grid that reused another study's runs; "
                        "default: every experiment)")
    s.add_argument("--metrics", default=None, metavar="A,B,...",
                   help="metrics (default: every validation metric, val_*; with --test every numeric one)")
    s.add_argument("--test", action="store_true",
                   help="also show the test-patient metrics (to report: defaults are chosen on validation)")
    s.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="the baseline configuration (repeatable; default: the workspace's params)")
    s.add_argument("--seed-key", default=DEFAULT_SEED_KEY, help=seed_help)
    s.add_argument("--out", default=None, help="also write the table: .csv (every field) or .md")
    s.add_argument("--rev", action="append", default=None, metavar="COMMIT",
                   help="the experiments of that commit (default: HEAD's; `dvc exp show` lists only those); "
                        "repeatable for commits with the same dvc.lock, dvc.yaml and params.yaml")
    s.set_defaults(func=_compare_show)


def _model_options(p: argparse.ArgumentParser, structures_help: str) -> None:
    """--model, --structures and --label-map: the trained generator and how masks map onto it."""
    p.add_argument("--model", default=pipeline_path("model"), help="trained generator file")
    p.add_argument("--structures", nargs="+", default=None,
                   help=f"{structures_help} (default: those the model was trained with)")
    p.add_argument("--label-map", default=None,
                   help="mask value -> structure: a preset (mmwhs, totalsegmentator-heartchambers), inline "
                        'JSON (\'{"1": "LV"}\') or a JSON/YAML file (default: the model\'s training map)')


def _contrast_option(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--contrast", type=float, default=None, metavar="HU",
                   help="contrast level (median HU of the blood pools) for a model trained with "
                        "model.contrast_control; must lie in the range the model was trained on, which the "
                        f"error names (default: {default_help})")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="turn a label NIfTI into a synthetic CT NIfTI")
    p.add_argument("--mask", required=True, help="label NIfTI (any orientation)")
    p.add_argument("--out", required=True, help="output CT NIfTI (HU, same grid as the mask)")
    _model_options(p, "structures to condition on")
    _contrast_option(p, "the training cases' mean level")
    p.add_argument("--anatomy", default=None,
                   help="anatomy label NIfTI on the mask's grid: body / lung / bone around the heart, for a model "
                        "trained with model.anatomy (without it such a model draws from the heart alone if it was "
                        "trained with train.anatomy_drop > 0, else it refuses)")
    p.add_argument("--anatomy-map", default="ctsynth",
                   help="values of --anatomy: a preset (default ctsynth: 1 body, 2 lung, 3 bone), inline JSON or a "
                        "JSON/YAML file; it must name a body value, since without the CT the body outline cannot be "
                        "derived (the totalsegmentator-total preset names none)")
    p.add_argument("--seed", type=int, default=GenerateCfg.seed,
                   help=f"a model trained with model.noise nps: slice z gets the noise of (seed, z) (default "
                        f"{GenerateCfg.seed}); other models are deterministic and ignore it")
    p.add_argument("--no-noise", action="store_true",
                   help="a model with model.noise nps: write the noise-free slice (the conditional mean) instead")
    p.set_defaults(func=_generate)


def _synthesize_parser(sub) -> None:
    p = sub.add_parser("synthesize", help="new labelled cases (warped masks + generated CT) from label NIfTIs",
                       description=SYNTHESIZE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="folder of label NIfTIs (searched recursively)")
    p.add_argument("--pattern", default="*.nii*",
                   help="file name pattern of the label files (default '*.nii*'; e.g. '*_label.nii.gz' "
                        "for a folder of image/label pairs)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--cases", type=int, default=SynthesizeCfg.cases,
                   help=f"number of new cases (default {SynthesizeCfg.cases})")
    p.add_argument("--seed", type=int, default=SynthesizeCfg.seed,
                   help=f"case i draws from default_rng([seed, i]) (default {SynthesizeCfg.seed})")
    p.add_argument("--layout", default="pairs", help="pairs (ingestible, default) | nnunet")
    _model_options(p, "structures to keep and draw")
    _contrast_option(p, "each case draws one from the training cases' distribution, recorded in manifest.csv")
    p.add_argument("--anatomy-suffix", metavar="SUFFIX",
                   help="a model with anatomy: each label file <id><label-suffix> has its body / lung / bone labels "
                        "beside it as <id>SUFFIX, warped with it (e.g. _anatomy.nii.gz; default: none, the model "
                        "draws from the heart alone)")
    p.add_argument("--label-suffix", metavar="SUFFIX",
                   help="the part of the label file names after <id> (e.g. _label.nii.gz; default: .nii[.gz])")
    p.add_argument("--anatomy-map", default="ctsynth",
                   help="anatomy value -> body|lung|bone: a preset (ctsynth, totalsegmentator-total), inline JSON "
                        "or a JSON/YAML file naming a body value (default ctsynth: 1 body, 2 lung, 3 bone)")
    p.set_defaults(func=_synthesize)


def _review_parser(sub) -> None:
    p = sub.add_parser("review", help="review synthetic cases in the browser: accept or reject, saved per reviewer",
                       description=REVIEW_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reviewer", default=None,
                   help="your name: decisions go to reviews/<reviewer>.jsonl (default: the login name)")
    p.add_argument("--synthetic", default=pipeline_path("synthetic"),
                   help=f"synthetic dataset (default {pipeline_path('synthetic')})")
    p.add_argument("--reviews", default=pipeline_path("reviews"),
                   help=f"folder of review files (default {pipeline_path('reviews')})")
    p.add_argument("--reports", default="reports",
                   help="folder of the privacy stage's privacy_cases.csv, privacy_synthetic.csv (default reports)")
    p.add_argument("--processed", default=pipeline_path("processed"),
                   help=f"processed store: the training slices shown beside the synthetic ones "
                        f"(default {pipeline_path('processed')})")
    p.add_argument("--params", default="params.yaml", help="params file: label map, HU window (default params.yaml)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    p.set_defaults(func=_review)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctsynth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a procedural thoracic CT (or MR) phantom (MM-WHS layout)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    ph, seed = PhantomCfg(), Params().seed              # the defaults of params.yaml
    p.add_argument("--cases", type=int, default=ph.cases, help=f"number of cases (default {ph.cases})")
    p.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")
    p.add_argument("--shape", type=int, nargs=3, default=list(ph.shape), metavar=("X", "Y", "Z"),
                   help=f"voxels (default {' '.join(map(str, ph.shape))})")
    p.add_argument("--spacing", type=float, nargs=3, default=list(ph.spacing), metavar=("SX", "SY", "SZ"),
                   help=f"mm (default {' '.join(map(str, ph.spacing))})")
    p.add_argument("--modality", choices=("ct", "mr"), default="ct",
                   help="ct (default) or mr: bright-blood cardiac MR of the same anatomy (mr_train_1001_image.nii.gz, "
                        "...)")
    p.set_defaults(func=_phantom)

    _generate_parser(sub)

    _synthesize_parser(sub)

    _review_parser(sub)
    _study_parser(sub)

    p = sub.add_parser("check-params", help="validate a params file and exit")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_check_params)

    p = sub.add_parser("preset", help="merge a preset overlay (e.g. paper) into params.yaml, comments kept",
                       description=PRESET_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", metavar="NAME_OR_FILE",
                   help="preset name (paper: params/paper.yaml of this checkout) or an overlay YAML file")
    p.add_argument("--params", default="params.yaml", help="base params file (default params.yaml)")
    p.add_argument("--out", default="params.yaml", help="merged params file, written atomically (default params.yaml)")
    p.set_defaults(func=_preset)

    p = sub.add_parser("bench", help="measure training/generation/loader speed and memory",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the 256² batch-4 pair and generation")
    p.add_argument("--out", default="reports/bench.json", help="JSON results (default reports/bench.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--paths", default="", metavar="NAME,...",
                   help="extra training paths timed beside the pair: " + ", ".join(BENCH_PATHS))
    p.add_argument("--compile", action="store_true", help="also time the default path with torch.compile")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.set_defaults(func=_bench)

    _compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    sys.exit(guarded(args.command, lambda: args.func(args), args.debug))


if __name__ == "__main__":
    main()
