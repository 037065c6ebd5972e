"""params.yaml as typed, validated dataclasses.

Every key of params.yaml is a field below; unknown keys, wrong types and out-of-range values
are all collected and raised together as one :class:`ConfigError` before any work starts.

    cfg = load_params("params.yaml")              # whole file, validated
    cfg = load_params("params.yaml", overrides=["train.lr_g=1e-4"])
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ctsynth.core.errors import ConfigError
from ctsynth.core.labels import ALL_CONDITIONS, MMWHS_LABEL_MAP, parse_anatomy_map, parse_label_map

# ------------------------------------------------------------------- roles of the train keys
# Every `train.*` key is a DVC param of the train stage (dvc.yaml lists the whole section): it
# changes train's outputs. Most also shape the trained weights and so enter the checkpoint
# fingerprint (ctsynth.train.checkpoint.run_fingerprint): a run resumes only into the same run.
# The few that do not are marked here, next to their typed field, and nowhere else. Keys that
# change none of train's outputs do not belong in `train` at all: they live in `train_run`.

def not_in_fingerprint(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING):
    """A train field that changes train's outputs (a DVC param) but not the weights' trajectory,
    so a checkpoint of the same run stays resumable when it changes (it may also enter the
    fingerprint in resolved form, e.g. ``nproc`` x ``nnodes`` as the world size)."""
    return field(default=default, default_factory=default_factory, metadata={"fingerprint": False})


def fingerprint_exempt(cls) -> frozenset[str]:
    """Names of the fields of dataclass ``cls`` declared with :func:`not_in_fingerprint`."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("fingerprint", True) is False)


MR_RANGE = (-1000.0, 1000.0)   # MR: normalised units (nu) the 0.5 / 99.5 % intensity percentiles map to


@dataclass
class AnatomyCfg:
    """The anatomy around the heart, written at ingest (docs/anatomy.md)."""
    #: derived: rules on the image | supplied: label files | none
    source: Literal["derived", "supplied", "none"] = "derived"
    #: supplied: the anatomy label file beside each image, <case><label_suffix>
    label_suffix: str = "_anatomy.nii.gz"
    #: supplied: value -> body|lung|bone, or a preset: ctsynth | totalsegmentator-total
    label_map: dict | str = "ctsynth"
    #: derived: body = largest component above this, holes filled; lung = air inside it
    body_hu: float = -500.0
    #: derived: bone = above this inside the body, outside the heart labels
    bone_hu: float = 200.0


@dataclass
class DataCfg:
    """Where the image/label pairs come from and how their labels read."""
    #: phantom: generate the embedded phantom | nifti: use raw_dir as it is
    source: Literal["phantom", "nifti"] = "phantom"
    raw_dir: str = "data/phantom"                    # folder searched recursively for image/label pairs
    label_suffix: str = "_label.nii.gz"              # partner label file: <case><label_suffix> beside the image
    image_suffix: str = "_image.nii.gz"              # case id = file name minus this suffix
    #: raw value -> structure (MM-WHS 2017) or a preset: mmwhs | totalsegmentator-heartchambers
    label_map: dict | str = field(default_factory=lambda: dict(MMWHS_LABEL_MAP))
    unknown_labels: Literal["error", "background"] = "error"  # error | background: label values missing from label_map
    on_error: Literal["fail", "skip"] = "fail"       # fail | skip: report bad cases and go on with the rest
    #: ct (HU) | mr (each volume's 0.5/99.5 % percentiles map to -1000/+1000: docs/anatomy.md)
    modality: Literal["ct", "mr"] = "ct"
    anatomy: AnatomyCfg = field(default_factory=AnatomyCfg)


@dataclass
class PhantomCfg:
    """The embedded procedural phantom (data.source: phantom)."""
    #: synthetic patients, split by split.* (12 / 10 / 10 by default: enough to decide on)
    cases: int = 32
    shape: list = field(default_factory=lambda: [128, 128, 40])  # voxels x, y, z
    spacing: list = field(default_factory=lambda: [2.6, 2.6, 4.0])  # mm; anisotropic like clinical CT


@dataclass
class PreprocessCfg:
    """HU window, slices and their size; the conditions' structures."""
    hu_window: list = field(default_factory=lambda: [-1000.0, 1000.0])  # HU mapped linearly to [-1, 1], clipped
    image_size: int = 64                             # slices resized to image_size² (paper: 256)
    #: any subset of Myo LA LV RA RV Ao PA WH (WH: their union)
    structures: list = field(default_factory=lambda: ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"])
    slices: Literal["all", "structures"] = "structures"  # all | structures: only slices holding a selected structure
    margin: int = 2                                  # extra slices kept above and below the structures
    #: k > 1: condition pixels are area fractions of k x k sub-pixels; 1: classes
    partial_volume: int = 1


@dataclass
class SplitCfg:
    """Patient-level train/val/test split: fractions, or explicit case lists."""
    #: share of the patients for training (12 of the phantom's 32; MM-WHS's 20 CT: 8 / 6 / 6)
    train: float = 0.375
    val: float = 0.3125                                 # share for validation: defaults and variants are chosen here
    test: float = 0.3125                                # share for the test: scored only to report
    #: explicit lists instead, e.g. {train: [ct_train_1001, ...], val: [...], test: [...]}
    cases: dict | None = None


@dataclass
class ModelCfg:
    """Generator and discriminator (pix2pix); why each default: docs/experiments/defaults.md."""
    #: onehot: one channel per structure | index: one channel of label indices (authors)
    encoding: Literal["onehot", "index"] = "onehot"
    gen_depth: int = 6                               # stride-2 conv down / transposed conv up (paper: 7 at 256²)
    ngf: int = 16                                    # generator first-layer filters (paper: 64)
    ndf: int = 16                                    # discriminator first-layer filters (paper: 64)
    #: stride-2 discriminator blocks before the final stride-1 conv (paper: 4)
    disc_layers: int = 3
    skip_connections: bool = True                    # UNet skips (paper text: UNet; authors' config: off; README)
    #: transpose (paper) | resize (upsample + conv, no checkerboard)
    upsample: Literal["transpose", "resize"] = "transpose"
    dropout: float = 0.0                             # generator dropout (paper: none, deterministic)
    output: Literal["tanh", "sigmoid"] = "tanh"      # tanh ([-1, 1]) | sigmoid
    #: 2.5-D: the condition holds k stored neighbour slices each side; 0: one slice
    context_slices: int = 0
    #: + a channel: the case's contrast level, measured in training, set at generation
    contrast_control: bool = False
    #: + 3 channels: body outline, lungs, bone (data.anatomy); false: the heart only (paper)
    anatomy: bool = True
    #: none | nps: D judges the slice plus CT noise of the training noise power spectrum
    noise: Literal["none", "nps"] = "none"
    output_blur: float = 0.0                         # sigma (px) of a fixed Gaussian low-pass on the output; 0: off
    #: 3x3 convs at full resolution reading the condition again; 0: pix2pix
    head_layers: int = 1
    #: > 1: D judges that many consecutive slices of a case together; 1: pix2pix
    disc_slices: int = 1
    #: > 1: pix2pixHD's multi-scale D (each scale 2x coarser); 1: pix2pix
    disc_scales: int = 1


@dataclass
class TrainCfg:
    """What training computes: every key is a DVC param of the train stage. Keys declared with
    :func:`not_in_fingerprint` leave the checkpoint fingerprint alone; all others enter it."""
    #: generator init, batch order, augmentation; null: the top-level seed
    seed: int | None = None
    #: processes per node (GPUs, or CPU processes with gloo); > 1 runs torchrun
    nproc: int = not_in_fingerprint(1)
    #: nodes; > 1: run `dvc repro train` on every node (train_run.rdzv_endpoint)
    nnodes: int = not_in_fingerprint(1)
    device: Literal["auto", "cpu", "cuda"] = not_in_fingerprint("auto")  # auto | cpu | cuda
    #: auto (bf16 autocast where native: CUDA, CPUs with AMX or AVX512_BF16) | fp32 | bf16
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: true: NHWC | false: NCHW | auto: NHWC on CUDA only (docs/performance.md)
    channels_last: Literal["auto", True, False] = True
    compile: bool = False                            # torch.compile the models
    #: generator steps (paper: 100000); the default fits the 15-minute run
    iterations: int = 1250
    batch_size: int = 8                              # slices per step, over all processes
    lr_g: float = 2e-4                               # Adam step size of the generator (paper preset: 1.3e-4)
    lr_d: float = 2e-4                               # Adam step size of the discriminator (paper preset: 1.5e-4)
    beta1: float = 0.5                               # Adam beta1 (pix2pix: 0.5)
    beta2: float = 0.999                             # Adam beta2
    #: weight of the L1 reconstruction term against the LSGAN term (pix2pix: 100)
    lambda_l1: float = 100.0
    #: weight of pix2pixHD feature matching on D's block features; 0: off (paper)
    lambda_fm: float = 10.0
    #: weight of the log radial power spectrum term (Durall et al. 2020); 0: off
    lambda_spectral: float = 0.0
    #: model.anatomy: share of slices trained with blank anatomy (heart-only too); 0: none
    anatomy_drop: float = 0.25
    #: > 0: save the moving average of the generator's weights, this decay; 0: the last step's
    ema: float = 0.0
    #: none | affine (same warp of image and mask) | affine+intensity
    augment: Literal["none", "affine", "affine+intensity"] = "affine"
    #: fraction of training after which the lr decays linearly to 0; null: constant
    lr_decay_start: float | None = None
    sync_bn: bool = False                            # SyncBatchNorm across processes
    #: fractions of training for evolution snapshots (paper Fig. 5)
    snapshot_at: list = not_in_fingerprint(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
    snapshot_count: int = not_in_fingerprint(4)      # validation masks shown in each snapshot


@dataclass
class TrainRunCfg:
    """How a training run is steered: never changes the model, so no DVC param of train."""
    #: steps between checkpoints (models/checkpoints/<fingerprint>/, resumable)
    checkpoint_every: int = 500
    #: steps between console/MLflow loss logs (losses.csv: <= 200 rows, always)
    log_every: int = 25
    resume: Literal["auto", "never"] = "auto"        # auto: continue from the newest compatible checkpoint | never
    num_workers: int = 0                             # DataLoader workers (memory-mapped reads; 0 is enough on CPU)
    rdzv_endpoint: str | None = None                 # host:port of torchrun's c10d rendezvous (train.nnodes > 1)


@dataclass
class SegmenterCfg:
    """Small UNet on real training slices: FD/KID features, Dice, the utility stage's arms."""
    #: init and batches of the segmenter and utility stages' UNets; null: the top-level seed
    seed: int | None = None
    iterations: int = 300                            # Adam steps
    batch_size: int = 16                             # slices per step
    #: Adam step size (lower left the smallest structure unlearnt in 300 steps)
    lr: float = 3e-3
    width: int = 16                                  # channels of the first level
    #: the model is the moving average of the weights, this decay; 0: the last step's
    ema: float = 0.95
    #: none | affine | affine+intensity | classic (nnU-Net-style: the baseline to beat)
    augment: Literal["none", "affine", "affine+intensity", "classic"] = "none"
    #: auto (bf16 autocast where native: CPUs with AMX or AVX512_BF16) | fp32 | bf16
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class GenerateCfg:
    """The generate stage: every selected slice of every test case."""
    batch_size: int = 32                             # slices per generator forward pass
    #: model.noise nps: slice z of case c gets the noise of (seed, c, z), in any batching
    seed: int = 0
    grid_slices: int = 6                             # slices per case in data/generated/grids/<case>.png


@dataclass
class SynthesizeCfg:
    """New labelled cases: training masks warped in 3-D, CT drawn by the generator."""
    #: image/label pairs written to data/synthetic (ingestible as data.raw_dir)
    cases: int = 24
    #: case i draws from numpy default_rng([seed, i]); the internal manifest records it
    seed: int = 1
    #: max |rotation| about x, y, z (canonical RAS axes), degrees
    rotation_deg: list = field(default_factory=lambda: [5.0, 5.0, 12.0])
    scale: list = field(default_factory=lambda: [0.9, 1.1])  # per-axis scale factor range (anisotropic)
    shift_mm: list = field(default_factory=lambda: [10.0, 10.0, 8.0])  # max |translation| per axis, mm
    deform_mm: float = 6.0                           # max displacement of the smooth deformation, mm; 0: affine only
    deform_grid_mm: float = 50.0                     # control-point spacing of the deformation, mm (larger: smoother)
    #: redraws per case when a structure vanishes or splits into new pieces
    max_attempts: int = 20
    #: model.contrast_control: contrast level in HU of every case; null: drawn per case
    contrast: float | None = None


@dataclass
class EvaluateCfg:
    """The evaluate stage: feature distances and patient-level intervals."""
    #: auto: standard FID Inception weights (hub cache, else download) | a file | null
    inception_weights: str | None = "auto"
    batch_size: int = 32                             # feature-extraction batch
    kid_subset_size: int = 50                        # KID subset size (capped at the number of slices)
    #: 95 % intervals over patients: jackknife (t, valid for few) | bootstrap
    interval_method: Literal["jackknife", "bootstrap"] = "jackknife"
    #: resamples of the bootstrap and of per-case intervals; 0: no intervals
    bootstrap: int = 1000


@dataclass
class PrivacyCfg:
    """A slice is withheld when its in-body SSIM to the nearest training slice is too high."""
    #: threshold: this quantile of unseen (validation) real slices' own similarity; null: cap
    quantile: float | None = 0.99
    max_similarity: float | None = 0.95              # ... or this hard cap, whichever is smaller; null: no cap
    #: reference: a case is withheld above any validation patient's share | any: one slice
    case_rule: Literal["reference", "any"] = "reference"
    #: a case whose heart mask overlaps its source mask more is withheld; null: off
    max_mask_dice: float | None = 0.9
    #: exhaustive search while queries x training slices x pixels <= this
    exhaustive_budget: int = 10_000_000_000
    #: above the budget: resolution of the L2 nearest-neighbour pre-filter
    downsample: int = 32
    #: above the budget: pre-filter candidates re-scored with in-body SSIM
    candidates: int = 50


@dataclass
class RealismCfg:
    """The classifier two-sample test: can a small CNN tell generated from real slices?"""
    c2st_steps: int = 300                            # Adam steps of each classifier (seeded by the top-level seed)
    c2st_batch_size: int = 32                        # slices per step, half real, half generated
    c2st_lr: float = 0.001                           # Adam step size
    c2st_width: int = 16                             # channels of its first conv (then 2x, 4x)
    c2st_repeats: int = 3                            # classifiers (seeds seed, seed + 1, ...) whose AUCs are averaged
    #: positive control: real slices vs themselves blurred by this Gaussian sigma (px)
    control_blur_px: float = 0.5


@dataclass
class VerdictCfg:
    """The realism verdict: a check passes when its 95 % interval lies inside its margin."""
    #: ratios (texture, flicker, contrast spread; each structure too): inside [1/m, m]
    margin_ratio: float = 1.25
    margin_bias_hu: float = 20.0                     # contrast bias of each structure's mean HU: inside [-m, +m]
    margin_auc: float = 0.6                          # classifier test: the interval of its ROC area below this


@dataclass
class ShareCfg:
    """data/share: the cases that passed privacy (and review), with a dataset card."""
    name: str = "ctsynth-synthetic-cardiac-ct"       # the dataset's name (card, nnU-Net dataset.json)
    #: true: only cases reviewers accepted (`ctsynth review`); a rejection always withholds
    require_review: bool = False
    min_accepts: int = 1                             # with require_review: how many reviewers must accept a case
    #: the license you share under; the card says UNSET until you fill it in
    license: str | None = None


@dataclass
class TrackingCfg:
    """MLflow."""
    #: MLflow tracking URI; null: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db
    uri: str | None = None
    experiment: str = "ctsynth"                      # MLflow experiment of the training runs
    log_model: bool = True                           # log the generator with mlflow.pytorch.log_model
    #: e.g. ctsynth-generator: each trained generator becomes a new version
    registered_model: str | None = None
    enabled: bool = True                             # false: no MLflow at all


@dataclass
class Params:
    #: phantom, split, evaluation resamples; the default of train.seed and segmenter.seed
    seed: int = 42
    data: DataCfg = field(default_factory=DataCfg)
    phantom: PhantomCfg = field(default_factory=PhantomCfg)
    preprocess: PreprocessCfg = field(default_factory=PreprocessCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    train_run: TrainRunCfg = field(default_factory=TrainRunCfg)
    segmenter: SegmenterCfg = field(default_factory=SegmenterCfg)
    generate: GenerateCfg = field(default_factory=GenerateCfg)
    synthesize: SynthesizeCfg = field(default_factory=SynthesizeCfg)
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)
    privacy: PrivacyCfg = field(default_factory=PrivacyCfg)
    realism: RealismCfg = field(default_factory=RealismCfg)
    verdict: VerdictCfg = field(default_factory=VerdictCfg)
    share: ShareCfg = field(default_factory=ShareCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)


# ------------------------------------------------------------------------------- seeds
# The top-level `seed` draws the data (phantom, patient split) and the evaluation's resamples, and
# is the default of the training seeds. `train.seed` and `segmenter.seed` draw only what a training
# draws (init, batch order, augmentation), so a sweep over them (`ctsynth compare run --seeds ...`)
# retrains on the very same patients. Null means the top-level seed: a file without them trains
# exactly as before.

def with_training_seeds(params: Params) -> Params:
    """A copy of ``params`` whose ``train.seed`` and ``segmenter.seed`` hold the seeds trainings
    use (null: the top-level ``seed``): what the checkpoint fingerprint, MLflow and the model file
    then record is the seed itself, and a null seed and its value resume the same run."""
    return dataclasses.replace(
        params,
        train=dataclasses.replace(params.train, seed=params.seed if params.train.seed is None else params.train.seed),
        segmenter=dataclasses.replace(params.segmenter,
                                      seed=params.seed if params.segmenter.seed is None else params.segmenter.seed))


# ---------------------------------------------------------------------------- building

def _type_ok(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """Return (ok, coerced value, description of the allowed values)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        return value in allowed, value, "one of " + ", ".join(map(repr, allowed))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return True, None, ""
        checks = [_type_ok(value, a) for a in args]
        ok, v, _ = next((c for c in checks if c[0]), checks[0])
        desc = " or ".join(c[2] for c in checks)
        return ok, v, desc + (" or null" if type(None) in typing.get_args(tp) else "")
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    if tp is list:
        return isinstance(value, list), value, "a list"
    if tp is dict:
        return isinstance(value, dict), value, "a mapping"
    return True, value, ""


def _build(cls, raw: Any, path: str, problems: list[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path or 'params'}: must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"{path}{key}: unknown key; allowed keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp, value = hints[f.name], raw[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, f"{path}{f.name}.", problems)
            continue
        ok, coerced, desc = _type_ok(value, tp)
        if ok:
            kwargs[f.name] = coerced
        else:
            problems.append(f"{path}{f.name}: got {value!r}; expected {desc}")
    return cls(**kwargs)


def _check_ranges(p: Params, problems: list[str]) -> None:
    """Every out-of-range value, appended to ``problems`` (all of them, not the first)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    _check_data(p, need, problems)
    _check_model_and_split(p, need)
    _check_train(p.train, p.train_run, need)
    _check_synthesize(p.synthesize, need)
    _check_evaluation_and_paths(p, need)
    _check_seeds(p, need)


def _check_seeds(p: Params, need) -> None:
    """Seeds feed numpy's default_rng, which refuses negative ones (torch would take them)."""
    for key, value in (("seed", p.seed), ("train.seed", p.train.seed), ("segmenter.seed", p.segmenter.seed)):
        need(value is None or value >= 0,
             f"{key}: must be >= 0{'' if key == 'seed' else ' or null (null: the top-level seed)'}, got {value}")


def _check_synthesize(s: SynthesizeCfg, need) -> None:
    def numbers(v, n):
        return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)

    need(s.cases >= 1, f"synthesize.cases: must be >= 1, got {s.cases}")
    need(numbers(s.rotation_deg, 3) and all(0 <= x <= 45 for x in s.rotation_deg),
         "synthesize.rotation_deg: three angles in [0, 45] (max |rotation| about x, y, z, degrees)")
    need(numbers(s.scale, 2) and 0 < s.scale[0] <= s.scale[1] <= 3,
         "synthesize.scale: [low, high] with 0 < low <= high <= 3")
    need(numbers(s.shift_mm, 3) and all(x >= 0 for x in s.shift_mm),
         "synthesize.shift_mm: three non-negative numbers (max |translation| per axis, mm)")
    need(s.deform_mm >= 0 and s.deform_grid_mm > 0,
         "synthesize.deform_mm must be >= 0 and synthesize.deform_grid_mm > 0")
    need(s.max_attempts >= 1, "synthesize.max_attempts: must be >= 1")


def _check_data(p: Params, need, problems: list[str]) -> None:
    need(p.phantom.cases >= 3, "phantom.cases: must be >= 3 (train, val and test need a case each)")
    need(len(p.phantom.shape) == 3 and all(isinstance(v, int) and v >= 16 for v in p.phantom.shape),
         "phantom.shape: must be three integers >= 16")
    need(len(p.phantom.spacing) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in p.phantom.spacing),
         "phantom.spacing: must be three positive numbers (mm)")
    w = p.preprocess.hu_window
    need(len(w) == 2 and all(isinstance(v, (int, float)) for v in w) and w[0] < w[1],
         "preprocess.hu_window: must be [low, high] with low < high (HU)")
    need(p.preprocess.margin >= 0, "preprocess.margin: must be >= 0")
    try:
        label_map = parse_label_map(p.data.label_map)
        p.data.label_map = label_map
    except ConfigError as e:
        problems.extend(e.problems)
        label_map = {}
    a = p.data.anatomy
    need(a.body_hu < a.bone_hu, f"data.anatomy: body_hu {a.body_hu:g} must be below bone_hu {a.bone_hu:g}")
    if p.data.modality == "mr":                      # MR has no Hounsfield units: nothing may be set in HU
        need(len(w) == 2 and [float(v) for v in w] == list(MR_RANGE),
             f"data.modality mr: preprocess.hu_window {list(w)} is a window in HU, which MR does not have; MR "
             f"intensities are normalised per volume to {list(MR_RANGE)} nu (leave the window at that)")
        need(not p.model.contrast_control, "data.modality mr: model.contrast_control sets a blood-pool level in HU, "
                                           "which MR does not have; set it false")
        need(p.synthesize.contrast is None, "data.modality mr: synthesize.contrast is a level in HU; set it null")
        need(p.model.noise == "none", "data.modality mr: model.noise nps samples CT's additive, signal-independent "
                                      "noise; MR noise is Rician (signal-dependent): set it none")
    if a.source == "supplied":
        try:
            a.label_map = parse_anatomy_map(a.label_map)
        except ConfigError as e:
            problems.extend(e.problems)
    need(not (p.model.anatomy and a.source == "none"),
         "model.anatomy: true needs anatomy from ingest; data.anatomy.source is none (use derived or supplied)")
    structs = p.preprocess.structures
    bad = [s for s in structs if s not in ALL_CONDITIONS]
    if bad or not structs or len(set(structs)) != len(structs):
        problems.append(f"preprocess.structures: got {structs}; must be a non-empty list without "
                        f"duplicates drawn from {', '.join(ALL_CONDITIONS)}")
    elif label_map:
        available = set(label_map.values())
        missing = [s for s in structs if s != "WH" and s not in available]
        if missing:
            problems.append(f"preprocess.structures: {missing} not in data.label_map "
                            f"(which names {sorted(available)})")


def _check_model_and_split(p: Params, need) -> None:
    m = p.model
    need(1 <= m.gen_depth <= 8, "model.gen_depth: must be in 1..8")
    need(1 <= m.disc_layers <= 6, "model.disc_layers: must be in 1..6")
    need(m.ngf >= 1 and m.ndf >= 1, "model.ngf/model.ndf: must be >= 1")
    need(0.0 <= m.dropout < 1.0, "model.dropout: must be in [0, 1)")
    need(0.0 <= m.output_blur <= 4.0, "model.output_blur: a Gaussian sigma in px, 0 (off) to 4")
    need(0 <= m.context_slices <= 8, "model.context_slices: must be in 0..8")
    need(0 <= m.head_layers <= 4, "model.head_layers: 3x3 convs at full resolution, 0 (pix2pix) to 4")
    need(1 <= m.disc_slices <= 4, "model.disc_slices: consecutive slices the discriminator judges together, "
         "1 (pix2pix) to 4")
    need(1 <= m.disc_scales <= 3, "model.disc_scales: discriminators at 1, 1/2, 1/4 of the slice size, 1 (pix2pix) "
         "to 3")
    need(m.disc_slices == 1 or p.train.batch_size % m.disc_slices == 0,
         f"model.disc_slices {m.disc_slices}: train.batch_size {p.train.batch_size} must be whole slabs "
         f"(a multiple of it)")
    need(m.disc_slices == 1 or m.noise == "none",
         f"model.disc_slices {m.disc_slices} with model.noise {m.noise}: the noise is drawn per slice, so the "
         f"discriminator would see generated slabs by their noise alone; use model.noise none")
    need(not (m.contrast_control and "intensity" in p.train.augment),
         f"model.contrast_control with train.augment {p.train.augment}: the intensity jitter changes the contrast the "
         f"condition states; use train.augment affine or none")
    size = p.preprocess.image_size
    need(1 <= p.preprocess.partial_volume <= 8, "preprocess.partial_volume: sub-pixels per side, 1 (nearest "
         "classes) to 8")
    need(size >= 16 and size % (2 ** m.gen_depth) == 0,
         f"preprocess.image_size: {size} must be >= 16 and divisible by 2^model.gen_depth = {2 ** m.gen_depth}")
    coarse = 2 ** (m.disc_layers + max(1, m.disc_scales) - 1)
    need(size % coarse == 0, f"preprocess.image_size: {size} must be divisible by 2^(model.disc_layers + "
         f"model.disc_scales - 1) = {coarse}")
    s = p.split
    if s.cases is None:
        need(s.train > 0 and s.val >= 0 and s.test > 0 and abs(s.train + s.val + s.test - 1) < 1e-6,
             f"split: train/val/test fractions must be > 0 (val >= 0) and sum to 1; got "
             f"{s.train}/{s.val}/{s.test}")
    else:
        bad_keys = set(s.cases) - {"train", "val", "test"}
        need(not bad_keys and s.cases.get("train") and s.cases.get("test"),
             "split.cases: must map train and test (and optionally val) to non-empty case lists")


def _check_train(t: TrainCfg, run: TrainRunCfg, need) -> None:
    for name in ("lr_g", "lr_d", "lambda_l1", "lambda_fm", "lambda_spectral"):
        weight = name.startswith("lambda")
        need(getattr(t, name) >= 0 if weight else getattr(t, name) > 0,
             f"train.{name}: must be {'>= 0' if weight else '> 0'}, got {getattr(t, name)}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2: must be in [0, 1)")
    need(0 <= t.ema < 1, f"train.ema: must be in [0, 1) (0: the last step's weights), got {t.ema}")
    need(t.iterations >= 1, "train.iterations: must be >= 1")
    need(t.batch_size >= 1, "train.batch_size: must be >= 1")
    need(t.nproc >= 1 and t.nnodes >= 1, "train.nproc/nnodes: must be >= 1")
    ep = run.rdzv_endpoint
    need(ep is None or (ep.rpartition(":")[0] and ep.rpartition(":")[2].isdigit()),
         f"train_run.rdzv_endpoint: expected host:port, got {ep!r}")
    need(t.nnodes == 1 or ep is not None, "train_run.rdzv_endpoint: host:port is required when train.nnodes > 1")
    need(run.checkpoint_every >= 1 and run.log_every >= 1, "train_run.checkpoint_every/log_every: must be >= 1")
    need(t.lr_decay_start is None or 0 <= t.lr_decay_start < 1, "train.lr_decay_start: must be in [0, 1) or null")
    need(all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in t.snapshot_at),
         "train.snapshot_at: fractions of training in [0, 1]")
    need(run.num_workers >= 0, "train_run.num_workers: must be >= 0")


def _check_evaluation_and_paths(p: Params, need) -> None:
    need(p.segmenter.iterations >= 1 and p.segmenter.batch_size >= 1 and p.segmenter.lr > 0,
         "segmenter: iterations, batch_size must be >= 1 and lr > 0")
    need(0 <= p.segmenter.ema < 1, f"segmenter.ema: must be in [0, 1) (0: no weight average), got {p.segmenter.ema}")
    need(p.generate.batch_size >= 1 and p.evaluate.batch_size >= 1, "generate/evaluate.batch_size: must be >= 1")
    need(p.evaluate.kid_subset_size >= 2, "evaluate.kid_subset_size: must be >= 2")
    need(p.evaluate.bootstrap >= 0, "evaluate.bootstrap: must be >= 0 (0: no intervals)")
    pv = p.privacy
    need(pv.max_similarity is None or 0 < pv.max_similarity <= 1, "privacy.max_similarity: must be in (0, 1] or null")
    need(pv.quantile is None or 0 < pv.quantile <= 1, "privacy.quantile: must be in (0, 1] or null")
    need(pv.quantile is not None or pv.max_similarity is not None,
         "privacy.quantile and privacy.max_similarity: at least one must be set (no threshold otherwise)")
    need(pv.max_mask_dice is None or 0 < pv.max_mask_dice <= 1, "privacy.max_mask_dice: must be in (0, 1] or null")
    need(p.privacy.downsample >= 8, "privacy.downsample: must be >= 8")
    need(p.privacy.candidates >= 1, "privacy.candidates: must be >= 1")
    need(p.realism.c2st_steps >= 1 and p.realism.c2st_batch_size >= 2 and p.realism.c2st_width >= 1,
         "realism.c2st_steps/c2st_width: must be >= 1, realism.c2st_batch_size: >= 2")
    need(p.realism.c2st_lr > 0, "realism.c2st_lr: must be > 0")
    need(1 <= p.realism.c2st_repeats <= 20, "realism.c2st_repeats: must be in 1..20")
    need(p.realism.control_blur_px > 0, "realism.control_blur_px: must be > 0")
    v = p.verdict
    need(v.margin_ratio > 1 and v.margin_bias_hu > 0 and 0.5 < v.margin_auc <= 1,
         "verdict: margin_ratio must be > 1, margin_bias_hu > 0, margin_auc in (0.5, 1]")
    need(p.share.min_accepts >= 1, f"share.min_accepts: must be >= 1, got {p.share.min_accepts}")
    need(bool(p.share.name.strip()), "share.name: must not be empty")
    need(p.privacy.exhaustive_budget >= 0, "privacy.exhaustive_budget: must be >= 0 (0: always pre-filter)")
    weights = p.evaluate.inception_weights
    for key, value in (("data.raw_dir", p.data.raw_dir),
                       ("evaluate.inception_weights", None if weights == "auto" else weights)):
        if value is not None and not os.path.isabs(value):
            root = Path.cwd().resolve()
            resolved = (root / value).resolve()
            need(root in resolved.parents or resolved == root,
                 f"{key}: relative path {value!r} escapes the repository; give an absolute path to use "
                 f"a folder outside it deliberately")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)


def params_from_dict(raw: dict, source: str = "params") -> Params:
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if not problems:
        _check_ranges(params, problems)
    if problems:
        raise ConfigError([f"{source}: {msg}" for msg in problems])
    return params


def load_params(path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, merge and validate params. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for item in overrides or []:
        _apply_override(raw, item)
    return params_from_dict(raw, str(path))


def to_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr_g': 1}} -> {'train.lr_g': 1} (for MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_path(value: str | os.PathLike) -> Path:
    """Params paths are relative to the working directory (the repo root, where DVC runs stages)."""
    p = Path(value)
    return p if p.is_absolute() else Path.cwd() / p


def project_relative(path: str | os.PathLike) -> str:
    """The inverse of :func:`resolve_path` for what outputs record: a path under the working directory
    (the repo root) relative to it, so an output does not change with the clone's location; any other
    path absolute."""
    p = Path(path).absolute()
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(p)
