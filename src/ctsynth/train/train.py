"""Train the mask-conditioned cGAN (LSGAN + λ·L1) on one CPU, one GPU or many GPUs/nodes::

    python stages/train.py                      # one process (CPU or one GPU)
    torchrun --standalone --nproc-per-node N stages/train.py      # N processes (DDP)

``train.nproc`` > 1 or ``train.nnodes`` > 1 make ``stages/train.py`` start itself under torchrun
(:mod:`ctsynth.train.distributed`). ``train.batch_size`` is the global batch (split evenly over ranks);
``train.iterations`` counts generator steps. World size 1 runs the very same code without a
process group. Rank 0 alone writes files and talks to MLflow. SIGTERM / SIGINT (also when forwarded by
torchrun or DVC) finish the current step, save a checkpoint and exit with 128 + signal; rerunning resumes
from it (``train_run.resume: auto``) and ends with the weights an uninterrupted run gets (on CPU).
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from ctsynth.core.accel import autocast, resolve_channels_last, resolve_precision, runtime_record, runtime_summary
from ctsynth.core.config import Params, to_dict, with_training_seeds
from ctsynth.core.errors import ConfigError, InputError, TrainingError
from ctsynth.core.tracking import Tracker
from ctsynth.data.augment import build_batch_transform
from ctsynth.data.contrast import training_dataset
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore, SlabDataset, SliceDataset, condition_width, slabs_of, train_batches
from ctsynth.train.checkpoint import ckpt_files, load_latest_checkpoint, run_fingerprint, save_checkpoint, set_rng_state
from ctsynth.train.distributed import Dist, StopFlag, check_finite, compile_models, setup, sync_and_hash
from ctsynth.train.gan import (
    GanPair,
    LossWeights,
    gan_step,
    learning_rates,
    lr_factor,
    make_ema,
    make_optimizer,
    recalibrate_bn,
)
from ctsynth.train.history import LOSS_NAMES, LossHistory
from ctsynth.train.networks import build_discriminator, build_generator, describe, receptive_field, save_generator
from ctsynth.train.snapshots import Snapshots

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int                        # generator steps completed
    interrupted_by: int | None = None  # signal number when stopped early

    @property
    def exit_code(self) -> int:
        return 0 if self.interrupted_by is None else 128 + self.interrupted_by


@dataclass
class _Job:
    """Everything one training needs, set up once by :func:`_prepare`."""
    params: Params
    d: Dist
    store: ProcessedStore
    split: dict
    ds: SliceDataset
    batches_from: SliceDataset | SlabDataset   # what batches draw: ds, or its slabs (model.disc_slices > 1)
    in_ch: int
    batch: int                       # per process
    precision: str
    channels_last: bool
    fingerprint: str                 # of the trajectory (resume key, checkpoint folder)
    data_hash: str                   # of the processed training data
    G: torch.nn.Module
    D: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    G_ema: torch.nn.Module | None    # train.ema > 0: the weights' moving average (AveragedModel)

    @property
    def G_out(self) -> torch.nn.Module:
        """The generator saved and shown: the moving average with ``train.ema`` > 0, else G."""
        return self.G if self.G_ema is None else self.G_ema.module

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        mem = torch.channels_last if self.channels_last else torch.contiguous_format
        return t.to(self.d.device, non_blocking=self.d.device.type == "cuda").contiguous(memory_format=mem)


# --------------------------------------------------------------------------------------- setup

def _check_sizes(cfg, mcfg, d: Dist, n_rows: int, size: int, where: Path) -> None:
    if cfg.batch_size % d.world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be divisible by the {d.world} processes")
    if n_rows // d.world < cfg.batch_size // d.world:
        raise InputError(f"{where}: {n_rows} training slices, fewer than one batch "
                         f"({cfg.batch_size}) over {d.world} process(es)")
    if size % 2 ** mcfg.gen_depth or size % 2 ** mcfg.disc_layers:
        raise ConfigError(f"{where}: image size {size} not divisible by 2^gen_depth/2^disc_layers")
    if cfg.batch_size // d.world == 1 and size == 2 ** mcfg.gen_depth and not cfg.sync_bn:
        raise ConfigError("train.batch_size: 1 per process with a 1x1 bottleneck breaks BatchNorm; "
                          "raise batch_size or lower model.gen_depth")
    if cfg.sync_bn and d.ddp and d.device.type == "cpu":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA; set it false for CPU training")


def _prepare(params: Params, d: Dist, processed_dir: Path, split_path: Path) -> _Job:
    """Data of the split's train cases (never a test slice), models and optimizers."""
    cfg, mcfg = params.train, params.model
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train",))
    rows = store.rows_for_cases(split["train"])
    _check_sizes(cfg, mcfg, d, len(rows), store.image_size, split_path)
    in_ch = condition_width(store.structures, mcfg.encoding, mcfg.context_slices, mcfg.contrast_control, mcfg.anatomy)
    ds = training_dataset(store, rows, split["train"], mcfg, cfg.anatomy_drop)   # + contrast levels, anatomy
    precision = resolve_precision(cfg.precision, d.device)          # auto: bf16 only where native
    channels_last = resolve_channels_last(cfg.channels_last, d.device)
    data_hash = store.fingerprint(split["train"])
    fp = run_fingerprint(params, data_hash, d.world, d.device, precision)

    torch.manual_seed(params.train.seed)       # same init on every rank; DDP keeps them in step
    mem = torch.channels_last if channels_last else torch.contiguous_format
    G = build_generator(mcfg, in_ch).to(d.device, memory_format=mem)
    D = build_discriminator(mcfg, in_ch).to(d.device, memory_format=mem)
    if d.ddp and cfg.sync_bn:
        G, D = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    opt_g = make_optimizer(G.parameters(), cfg.lr_g, (cfg.beta1, cfg.beta2))
    opt_d = make_optimizer(D.parameters(), cfg.lr_d, (cfg.beta1, cfg.beta2))
    if d.is_main:
        log.info(describe(G, D, mcfg, store.image_size))
        log.info("%d training slices, batch %d (%d per process x %d), %s %s%s%s", len(rows), cfg.batch_size,
                 cfg.batch_size // d.world, d.world, d.device, precision,
                 " channels_last" if channels_last else "", " compile" if cfg.compile else "")
    batches_from = slabs_of(ds, mcfg.disc_slices, cfg.batch_size // d.world, split_path)   # k = 1: ds
    return _Job(params, d, store, split, ds, batches_from, in_ch, cfg.batch_size // d.world, precision,
                channels_last, fp, data_hash, G, D, opt_g, opt_d, make_ema(G, cfg.ema))


def _resume(job: _Job, ckpt_dir: Path) -> dict:
    """Load the newest checkpoint of this fingerprint into the job; the loop's starting state."""
    cfg, steer = job.params.train, job.params.train_run
    state = load_latest_checkpoint(ckpt_dir, job.fingerprint, cfg.iterations) if steer.resume == "auto" else None
    if state is None:
        if job.d.is_main:                      # e.g. a longer run's checkpoints after lowering iterations
            for old in ckpt_files(ckpt_dir):
                old.unlink()
        return {"step": 0, "losses": None, "snapshots": {}, "mlflow_run_id": None}
    for name in ("G", "D", "opt_g", "opt_d") + (("G_ema",) if job.G_ema is not None else ()):
        getattr(job, name).load_state_dict(state[name])
    set_rng_state(state["rng"])
    if job.d.is_main:
        log.info("resumed from %s at step %d", state["path"], state["step"])
    return state


def _open_tracking(job: _Job, run_file: Path, split_path: Path, state: dict, hist: LossHistory) -> Tracker:
    """Rank 0 opens the MLflow run before any training; every rank learns whether it worked."""
    tracker, problem = Tracker(), None
    if job.d.is_main:
        from ctsynth.core import tracking
        try:
            tracker = tracking.open_run(job.params, run_file, resume_run_id=state["mlflow_run_id"],
                                        split_path=split_path, data_hash=job.data_hash)
            if tracker.active and tracker.run_id != state["mlflow_run_id"]:   # new run: replay losses
                every = job.params.train_run.log_every
                for s in range(every, state["step"] + 1, every):
                    tracker.log_metrics(hist.mean(s - every, s), s)
            tracker.set_tags({f"ctsynth.{k}": v for k, v in dict(
                world_size=job.d.world, device=str(job.d.device), precision=job.precision, fingerprint=job.fingerprint,
                channels_last=job.channels_last, receptive_field_px=receptive_field(job.params.model),
                runtime=runtime_summary(runtime_record(job.d.device))).items()})
        except TrainingError as e:
            problem = e
    ok = job.d.all_ok(problem is None)
    if problem or not ok:
        raise problem or TrainingError("rank 0 could not open the MLflow tracking store")
    return tracker


# ------------------------------------------------------------------------------------ the loop

def run(params: Params, processed_dir: str | Path, split_path: str | Path, out_model: str | Path,
        ckpt_dir: str | Path, reports_dir: str | Path, *, run_file: str | Path,
        stop_after: int | None = None) -> TrainResult:
    """Train and write ``out_model`` (see :func:`ctsynth.train.networks.save_generator`),
    ``reports_dir/losses.csv``, ``reports_dir/snapshots/step_XXXXXXX.png`` and ``run_file``;
    checkpoints go to ``ckpt_dir/<fingerprint>/``.

    ``stop_after`` (tests): behave as if SIGTERM arrived once that many steps are done.
    Returns a :class:`TrainResult`; raises :class:`TrainingError` on a non-finite loss.
    """
    params = with_training_seeds(params)      # train.seed null -> the top-level seed, recorded as such everywhere
    d = setup(params.train.device)
    tracker = Tracker()
    try:
        job = _prepare(params, d, Path(processed_dir), Path(split_path))
        ckpts = Path(ckpt_dir) / job.fingerprint
        state = _resume(job, ckpts)
        hist = LossHistory(params.train.iterations, d, state["losses"])
        tracker = _open_tracking(job, Path(run_file), Path(split_path), state, hist)
        snaps = Snapshots(job.store, job.split, params.train, params.model, d.device, Path(reports_dir) / "snapshots",
                          tracker=tracker, taken=state["snapshots"], contrast_record=job.ds.contrast_record)
        result = _loop(job, tracker, hist, snaps, state["step"], ckpts, reports_dir=Path(reports_dir),
                       stop_after=stop_after)
        if result.interrupted_by:
            log.warning("interrupted at step %d; checkpoint saved in %s; rerun to resume", result.step, ckpts)
            tracker.close("KILLED")
        else:
            _finish(job, tracker, hist, Path(out_model), Path(reports_dir))
            tracker.close("FINISHED")
        return result
    except BaseException:
        tracker.close("FAILED")
        raise
    finally:
        d.close()


def _loop(job: _Job, tracker: Tracker, hist: LossHistory, snaps: Snapshots, step: int, ckpts: Path,
          *, reports_dir: Path, stop_after: int | None) -> TrainResult:
    cfg, steer, d = job.params.train, job.params.train_run, job.d
    Gm, Dm, Dg = d.wrap(job.G), d.wrap(job.D), job.D          # Dg: G's step calls D unwrapped
    Gm, Dm, Dg = compile_models(Gm, Dm, Dg) if cfg.compile else (Gm, Dm, Dg)
    nets, weights = GanPair(Gm, Dm, Dg, job.opt_g, job.opt_d), LossWeights.of(cfg)
    amp = autocast(job.precision, d.device)
    transform = build_batch_transform(job.params, job.ds.constant_channels, job.store.structures, d.rank,
                                      job.ds.noise_record, job.store.partial_volume > 1)    # noise, soft cond
    sampler = DistributedSampler(job.batches_from, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=job.params.train.seed, drop_last=True)
    batches = train_batches(job.batches_from, sampler, job.batch // job.params.model.disc_slices, step,   # slabs
                            num_workers=steer.num_workers, pin_memory=d.device.type == "cuda")
    if d.is_main:
        snaps.start(job.G_out, step)
        hist.write(reports_dir / "losses.csv", step, cfg.iterations, lambda s: learning_rates(s, cfg))
    first_bad = torch.full((len(LOSS_NAMES),), -1, dtype=torch.long, device=d.device)
    poll_every = 1 if d.device.type == "cpu" else steer.log_every     # GPU: no host sync per step
    last_log, t_log, interrupted = step, time.perf_counter(), 0
    with StopFlag() as flag:
        while step < cfg.iterations:
            for opt, base in ((job.opt_g, cfg.lr_g), (job.opt_d, cfg.lr_d)):   # linear decay, if any
                for group in opt.param_groups:
                    group["lr"] = base * lr_factor(step, cfg)
            cond, real, noise = transform(*map(job.to_device, next(batches)), step)   # (B, C|1, S, S), None
            losses = gan_step(nets, job.to_device(cond), job.to_device(real), weights, amp, fake_noise=noise)
            step += 1
            if job.G_ema is not None:
                job.G_ema.update_parameters(job.G)
            hist.record(step, losses)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses), step, first_bad)
            if stop_after is not None and step >= stop_after and not flag.signum:
                flag.signum = signal.SIGTERM
            log_now = step % steer.log_every == 0 or step == cfg.iterations
            ckpt_now = step % steer.checkpoint_every == 0 or step == cfg.iterations
            if step % poll_every == 0 or log_now or ckpt_now:          # every rank stops at one step
                interrupted = flag.agreed(d)
            if not (log_now or ckpt_now or interrupted or step in snaps.steps):
                continue
            check_finite(first_bad, d, LOSS_NAMES)
            hist.sync(step)
            if d.is_main and log_now:
                t_log = hist.log_window(last_log, step, t_log, cfg.batch_size, cfg.iterations,
                                        learning_rates(step - 1, cfg), tracker=tracker)
                last_log = step
                hist.write(reports_dir / "losses.csv", step, cfg.iterations, lambda s: learning_rates(s, cfg))
            if d.is_main:
                snaps.take(job.G_out, step)
            if d.is_main and (ckpt_now or interrupted):
                save_checkpoint(ckpts, step=step, fingerprint=job.fingerprint, G=job.G, D=job.D,
                                opt_g=job.opt_g, opt_d=job.opt_d, losses=hist.done(step),
                                snapshots=snaps.taken, run_id=tracker.run_id, G_ema=job.G_ema)
            if interrupted:
                return TrainResult(step, interrupted)
    return TrainResult(step)


def _finish(job: _Job, tracker: Tracker, hist: LossHistory, out_model: Path, reports_dir: Path) -> None:
    """Identical weights on every rank, then rank 0 writes the model and logs it."""
    cfg, d = job.params.train, job.d
    digests = sync_and_hash(d, job.G, job.D)
    if len(set(digests)) != 1:
        raise TrainingError(f"ranks ended with different weights: {digests}")
    if not d.is_main:
        return
    if d.world > 1:
        log.info("weights identical on all %d ranks (sha256 %s)", d.world, digests[0][:16])
    if job.G_ema is not None:                  # the average's own BatchNorm statistics, on the training slices
        recalibrate_bn(job.G_out, job.ds, cfg.batch_size, job.channels_last)
    step = cfg.iterations
    meta = {**job.store.model_meta(), "encoding": job.params.model.encoding, "contrast": job.ds.contrast_record,
            "anatomy": job.ds.anatomy_record, "noise": job.ds.noise_record}
    extra = {"step": step, "iterations": cfg.iterations, "world_size": d.world, "device": d.device.type,
             "precision": job.precision, "channels_last": job.channels_last, "seed": job.params.train.seed,
             "ema": cfg.ema,
             "rank_weight_hashes": digests, "receptive_field": receptive_field(job.D),
             "fingerprint": job.fingerprint, "runtime": runtime_record(d.device),
             "losses": {"step": step, **hist.mean(step - 1, step)}}
    save_generator(out_model, job.G_out, to_dict(job.params.model), job.in_ch, meta, extra)
    log.info("wrote %s", out_model)
    if job.params.tracking.log_model and tracker.active:
        t0 = time.perf_counter()
        example = torch.stack([job.ds[0][0], job.ds[len(job.ds) - 1][0]])
        tracker.log_generator(job.G_out, example, registered_model=job.params.tracking.registered_model)
        log.info("logged the generator to MLflow in %.1f s", time.perf_counter() - t0)
    tracker.log_artifact(reports_dir / "losses.csv")


__all__ = ["run", "TrainResult"]
