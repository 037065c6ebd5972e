"""Train the mask-conditioned cGAN (LSGAN + λ·L1) on one CPU, one GPU or many GPUs.

One process (CPU or one GPU)::

    python stages/train.py --processed data/processed --split data/split.json \\
        --model models/generator.pt --checkpoints models/checkpoints --reports reports/train \\
        --run-file models/mlflow_run.json

Distributed data parallel (N GPUs with NCCL, or N CPU processes with gloo)::

    .venv/bin/torchrun --standalone --nproc-per-node N stages/train.py <same arguments>

``train.batch_size`` is the global batch (split evenly over ranks); ``train.iterations`` counts
generator steps. World size 1 runs the very same code without a process group. Rank 0 alone
writes files and talks to MLflow. SIGTERM / SIGINT (also when forwarded by torchrun or DVC)
finish the current step, save a checkpoint and exit with 128 + signal; rerunning resumes from
it (``train.resume: auto``) and ends with the weights an uninterrupted run gets (on CPU).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .accel import autocast, pick_device, resolve_channels_last, resolve_precision
from .checkpoint import ckpt_files, load_latest_checkpoint, save_checkpoint, set_rng_state
from .config import Params, to_dict
from .data import ProcessedStore, SliceDataset
from .errors import ConfigError, InputError, TrainingError
from .io import write_csv
from .labels import condition_channels
from .models import build_discriminator, build_generator, count_parameters, receptive_field, save_generator
from .snapshots import render_snapshot, snapshot_images, snapshot_rows
from .split import load_split

log = logging.getLogger(__name__)

LOSS_NAMES = ("g_adv", "g_l1", "d_real", "d_fake", "d_acc_real", "d_acc_fake")
# train.* keys that do not change the trained weights (everything else must match to resume)
_NOT_TRAJECTORY = {"nproc", "device", "checkpoint_every", "log_every", "resume", "snapshot_at",
                   "snapshot_count", "num_workers"}


@dataclass
class TrainResult:
    step: int                        # generator steps completed
    interrupted_by: int | None = None  # signal number when stopped early

    @property
    def exit_code(self) -> int:
        return 0 if self.interrupted_by is None else 128 + self.interrupted_by


class _StopFlag:
    """SIGTERM/SIGINT set a flag (the loop stops after the current step). A torchrun worker
    also stops when its agent disappears (torchrun SIGKILLed): workers, grandchildren of DVC,
    never train on as orphans. (A plain ``nohup python ...`` run may outlive its shell.)"""

    def __init__(self) -> None:
        self.signum = 0
        self._ppid = os.getppid() if "RANK" in os.environ else None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if not self.signum:
            log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def poll(self) -> int:
        if not self.signum and self._ppid is not None and os.getppid() != self._ppid:
            log.warning("parent process exited: stopping after this step")
            self.signum = signal.SIGTERM
        return self.signum


# --------------------------------------------------------------------------------------- setup

def _setup_distributed(cfg) -> tuple[bool, int, int, torch.device]:
    """(ddp, rank, world_size, device). DDP iff launched by torchrun with more than one process;
    ``torchrun --nproc-per-node 1`` runs exactly like plain ``python`` (no process group)."""
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = pick_device(cfg.device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if not ddp:
        return False, 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return True, dist.get_rank(), dist.get_world_size(), device


def _reduce(t: torch.Tensor, ddp: bool, op: Any = None) -> torch.Tensor:
    """all_reduce (default SUM) in place under DDP; identity otherwise."""
    if ddp:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _data_fingerprint(store: ProcessedStore, train_cases: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in ("meta.json", "slices.csv", "images.npy", "masks.npy"):
        with open(store.root / name, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    h.update(json.dumps(sorted(train_cases)).encode())
    return h.hexdigest()


def _fingerprint(params: Params, data_fp: str, world: int, device: torch.device, precision: str) -> str:
    """Hash of everything that shapes the trained weights: resume only into the same run."""
    tr = {k: v for k, v in to_dict(params.train).items() if k not in _NOT_TRAJECTORY}
    if params.train.lr_decay_start is None:
        tr.pop("iterations")                 # no decay: more iterations = the same run, longer
    blob = {"seed": params.seed, "model": to_dict(params.model), "train": tr, "data": data_fp,
            "world": world, "device": device.type, "precision": precision}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _batches(ds, sampler: DistributedSampler, batch: int, start_step: int,
             **loader_kw) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (cond, image) batches; batch k of epoch e depends only on (seed, e, k), so a
    resumed run continues exactly where it stopped (the sampler position is the step)."""
    per_epoch = len(sampler) // batch
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = list(sampler)[skip * batch: per_epoch * batch]
        yield from DataLoader(Subset(ds, idx), batch_size=batch, shuffle=False, drop_last=True,
                              **loader_kw)
        epoch, skip = epoch + 1, 0


def _lr_factor(step: int, cfg) -> float:
    """Linear decay to 0 from ``lr_decay_start`` (fraction of iterations); 1 without decay."""
    if cfg.lr_decay_start is None:
        return 1.0
    start = int(cfg.lr_decay_start * cfg.iterations)
    return 1.0 if step < start else max(0.0, 1.0 - (step - start) / max(1, cfg.iterations - start))


def make_optimizer(params, lr: float, betas: tuple[float, float], device: torch.device,
                   fused: bool = True) -> torch.optim.Adam:
    """Adam; ``fused`` (one kernel for all params) is measurably faster on CPU and GPU alike."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


# --------------------------------------------------------------------------------- losses

def write_losses(path: Path, history: list, names: tuple[str, ...]) -> None:
    import pandas as pd
    frame = pd.DataFrame(history, columns=["step", *names, "lr_g", "lr_d"])
    frame["step"] = frame["step"].astype(int)
    write_csv(path, frame)


# ---------------------------------------------------------------------------------------- step

def gan_step(G, D, raw_D, opt_g, opt_d, cond: torch.Tensor, real: torch.Tensor,
             lambda_l1: float, amp: torch.autocast) -> torch.Tensor:
    """One discriminator and one generator update (pix2pix order). Returns detached losses
    (6,) in ``LOSS_NAMES`` order, on the device (no host sync).

    D: 0.5·[MSE(D(real,c), 1) + MSE(D(fake,c), 0)]  G: MSE(D(fake,c), 1) + λ·|fake - real|₁
    The G step calls the unwrapped D with its parameters frozen (no DDP sync, no D grads).
    """
    with amp:
        fake = G(cond)                                              # (B, 1, S, S)
        p_real = D(real, cond).float()                              # (B, 1, P, P)
        p_fake = D(fake.detach(), cond).float()                     # (B, 1, P, P)
    d_real = F.mse_loss(p_real, torch.ones_like(p_real))
    d_fake = F.mse_loss(p_fake, torch.zeros_like(p_fake))
    opt_d.zero_grad(set_to_none=True)
    (0.5 * (d_real + d_fake)).backward()
    opt_d.step()

    raw_D.requires_grad_(False)
    with amp:
        p_gen = raw_D(fake, cond).float()                           # (B, 1, P, P)
    g_adv = F.mse_loss(p_gen, torch.ones_like(p_gen))
    g_l1 = F.l1_loss(fake.float(), real)
    opt_g.zero_grad(set_to_none=True)
    (g_adv + lambda_l1 * g_l1).backward()
    opt_g.step()
    raw_D.requires_grad_(True)
    acc_real = (p_real.detach() > 0.5).float().mean()
    acc_fake = (p_fake.detach() < 0.5).float().mean()
    return torch.stack([g_adv, g_l1, d_real, d_fake, acc_real, acc_fake]).detach()


def _weights_hash(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ the loop

def train(params: Params, processed_dir: str | Path, split_path: str | Path, out_model: str | Path,
          ckpt_dir: str | Path, reports_dir: str | Path, run_file: str | Path,
          stop_after: int | None = None) -> TrainResult:
    """Train and write ``out_model`` (see :func:`ctsynth.models.save_generator`), checkpoints,
    ``reports_dir/losses.csv`` and ``reports_dir/snapshots/step_XXXXXXX.png``.

    ``stop_after`` (tests): behave as if SIGTERM arrived once that many steps are done.
    Returns a :class:`TrainResult`; raises :class:`TrainingError` on a non-finite loss.
    """
    cfg, mcfg = params.train, params.model
    ddp, rank, world, device = _setup_distributed(cfg)
    is_main, opened = rank == 0, []
    try:
        return _train(params, cfg, mcfg, ddp, rank, world, device, is_main, Path(processed_dir),
                      Path(split_path), Path(out_model), Path(ckpt_dir), Path(reports_dir),
                      Path(run_file), stop_after, opened)
    except BaseException:
        for tracker in opened:                                  # mark the MLflow run failed
            tracker.close("FAILED")
        raise
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(params, cfg, mcfg, ddp, rank, world, device, is_main, processed_dir, split_path,
           out_model, ckpt_dir, reports_dir, run_file, stop_after, opened: list) -> TrainResult:
    # -- data: train cases of the split, never a test slice -------------------------------------
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train",))
    rows = store.rows_for_cases(split["train"])
    batch = cfg.batch_size // world
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be divisible by the {world} processes")
    if len(rows) // world < batch:
        raise InputError(f"{split_path}: {len(rows)} training slices, fewer than one batch "
                         f"({cfg.batch_size}) over {world} process(es)")
    size, depth = store.image_size, mcfg.gen_depth
    if size % 2 ** depth or size % 2 ** mcfg.disc_layers:
        raise ConfigError(f"{processed_dir}: image size {size} not divisible by 2^gen_depth/2^disc_layers")
    if batch == 1 and size == 2 ** depth and not cfg.sync_bn:
        raise ConfigError("train.batch_size: 1 per process with a 1x1 bottleneck breaks BatchNorm; "
                          "raise batch_size or lower model.gen_depth")
    if cfg.sync_bn and ddp and device.type == "cpu":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA; set it false for CPU training")
    ds = SliceDataset(store, rows, mcfg.encoding)
    in_ch = condition_channels(store.structures, mcfg.encoding)
    precision = resolve_precision(cfg.precision, device)          # auto: bf16 only where it is native
    channels_last = resolve_channels_last(cfg.channels_last, device)
    fp = _fingerprint(params, _data_fingerprint(store, split["train"]), world, device, precision)

    # -- models and optimizers (same seed on every rank, DDP then keeps them in step) ---------------
    torch.manual_seed(params.seed)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    G = build_generator(mcfg, in_ch).to(device, memory_format=mem)
    D = build_discriminator(mcfg, in_ch).to(device, memory_format=mem)
    if ddp and cfg.sync_bn:
        G, D = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    betas = (cfg.beta1, cfg.beta2)
    opt_g = make_optimizer(G.parameters(), cfg.lr_g, betas, device)
    opt_d = make_optimizer(D.parameters(), cfg.lr_d, betas, device)
    rf = receptive_field(D)
    if is_main:
        log.info("generator: %s parameters, depth %d, skips %s, receptive field %d px; discriminator: "
                 "%s parameters, %d patches of %d px receptive field", f"{count_parameters(G):,}", depth,
                 mcfg.skip_connections, receptive_field(mcfg, "generator"), f"{count_parameters(D):,}",
                 (size // 2 ** mcfg.disc_layers) ** 2, rf)
        log.info("%d training slices, batch %d (%d per process x %d), %s %s%s%s", len(rows),
                 cfg.batch_size, batch, world, device, precision,
                 " channels_last" if channels_last else "", " compile" if cfg.compile else "")

    # -- resume ---------------------------------------------------------------------------------
    state = load_latest_checkpoint(ckpt_dir, fp, cfg.iterations) if cfg.resume == "auto" else None
    step, history, snaps, run_id = 0, [], {}, None
    acc, acc_n = torch.zeros(len(LOSS_NAMES), device=device), 0      # loss sums since the last log
    if state is not None:
        G.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])
        step, history, snaps = state["step"], state["history"], state["snapshots"]
        acc, acc_n, run_id = state["acc"].to(device), state["acc_n"], state["mlflow_run_id"]
        if is_main:
            log.info("resumed from %s at step %d", state["path"], step)

    # -- tracking: open the store before any training (rank 0; the others learn the outcome) ----
    tracker, problem = None, None
    if is_main:
        from . import tracking
        try:
            tracker = tracking.open_run(params, run_file, resume_run_id=run_id, split_path=split_path)
            opened.append(tracker)
            if tracker.active and tracker.run_id != run_id:       # a new run: replay earlier losses
                for row in history:
                    tracker.log_metrics(dict(zip(LOSS_NAMES, row[1:1 + len(LOSS_NAMES)])), int(row[0]))
            tracker.set_tags({"ctsynth.world_size": world, "ctsynth.device": str(device),
                              "ctsynth.precision": precision, "ctsynth.channels_last": channels_last,
                              "ctsynth.fingerprint": fp, "ctsynth.receptive_field_px": receptive_field(mcfg)})
        except TrainingError as e:
            problem = e
    ok = _reduce(torch.tensor([0.0 if problem else 1.0], device=device), ddp, dist.ReduceOp.MIN if ddp else None)

    if problem:
        raise problem
    if not ok.item():
        raise TrainingError("rank 0 could not open the MLflow tracking store")
    if state is None and is_main:                              # stale checkpoints of another run
        for old in ckpt_files(ckpt_dir):
            old.unlink()

    Gm = DDP(G, device_ids=[device.index] if device.type == "cuda" else None) if ddp else G
    Dm = DDP(D, device_ids=[device.index] if device.type == "cuda" else None) if ddp else D
    raw_G, raw_D = G, D
    Dg = raw_D
    if cfg.compile:
        Gm, Dm, Dg = torch.compile(Gm), torch.compile(Dm), torch.compile(raw_D)
    amp = autocast(precision, device)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=params.seed,
                                 drop_last=True)
    on_cuda = device.type == "cuda"
    batches = _batches(ds, sampler, batch, step, num_workers=cfg.num_workers, pin_memory=on_cuda)

    # -- evolution snapshots: fixed validation masks at fractions of training --------------------
    snap_steps = sorted({int(round(f * cfg.iterations)) for f in cfg.snapshot_at})
    snap_rows = snapshot_rows(store, split, cfg.snapshot_count)
    snap_dir = reports_dir / "snapshots"
    meta = {"image_size": size, "hu_window": store.meta["hu_window"], "structures": store.structures,
            "label_map": store.meta["label_map"], "encoding": mcfg.encoding}

    def take_snapshot(at: int) -> None:
        if len(snap_rows) == 0:
            return
        if at not in snaps:
            snaps[at] = snapshot_images(raw_G, store, snap_rows, mcfg.encoding, device)
        png = render_snapshot(snap_dir / f"step_{at:07d}.png", store, snap_rows, snaps[at], at, cfg.iterations)
        tracker.log_artifact(png, "snapshots")

    def dump_losses() -> None:
        write_losses(reports_dir / "losses.csv", history, LOSS_NAMES)

    if is_main:
        for at in sorted(snaps):                              # re-render after a resume
            if at in snap_steps:
                take_snapshot(at)
        if 0 in snap_steps and step == 0:
            take_snapshot(0)
        dump_losses()

    # -- the loop ---------------------------------------------------------------------------------
    first_bad = torch.full((len(LOSS_NAMES),), -1, dtype=torch.long, device=device)
    t_log, t_first = time.perf_counter(), None
    stop_every = 1 if device.type == "cpu" else cfg.log_every
    interrupted = 0
    with _StopFlag() as flag:
        while step < cfg.iterations:
            lr = _lr_factor(step, cfg)
            for opt, base in ((opt_g, cfg.lr_g), (opt_d, cfg.lr_d)):
                for group in opt.param_groups:
                    group["lr"] = base * lr
            cond, real = next(batches)                        # (B, C, S, S), (B, 1, S, S)
            cond = cond.to(device, non_blocking=on_cuda).contiguous(memory_format=mem)
            real = real.to(device, non_blocking=on_cuda).contiguous(memory_format=mem)
            t0 = time.perf_counter() if t_first is None else None
            losses = gan_step(Gm, Dm, Dg, opt_g, opt_d, cond, real, cfg.lambda_l1, amp)
            step += 1
            if t0 is not None:
                t_first = time.perf_counter() - t0
                if is_main:
                    log.info("first step took %.2f s%s", t_first, " (includes torch.compile)" if cfg.compile else "")
            acc += losses
            acc_n += 1
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses), step, first_bad)
            if stop_after is not None and step >= stop_after and not flag.signum:
                flag.signum = signal.SIGTERM
            log_now = step % cfg.log_every == 0 or step == cfg.iterations
            ckpt_now = step % cfg.checkpoint_every == 0 or step == cfg.iterations
            if not ddp:
                interrupted = flag.poll()
            elif step % stop_every == 0 or log_now or ckpt_now:   # every rank stops at the same step
                interrupted = int(_reduce(torch.tensor([flag.poll()], device=device), ddp, dist.ReduceOp.MAX))
            if not (log_now or ckpt_now or interrupted or step in snap_steps):
                continue
            _check_finite(first_bad, ddp)
            if log_now:
                means = (_reduce(acc.clone(), ddp) / (max(acc_n, 1) * world)).tolist()
                history.append([step, *means, cfg.lr_g * lr, cfg.lr_d * lr])
                acc.zero_()
                acc_n = 0
                if is_main:
                    dt = time.perf_counter() - t_log
                    n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                    t_log = time.perf_counter()
                    log.info("step %d/%d | g_adv %.4f g_l1 %.4f | d_real %.4f d_fake %.4f | acc real "
                             "%.2f fake %.2f | %.3f s/step %.1f img/s", step, cfg.iterations, *means,
                             dt / n, n * cfg.batch_size / dt)
                    dump_losses()
                    tracker.log_metrics({**dict(zip(LOSS_NAMES, means)), "lr_g": cfg.lr_g * lr,
                                         "s_per_step": dt / n, "img_per_s": n * cfg.batch_size / dt}, step)
            if is_main and step in snap_steps:
                take_snapshot(step)
            if (ckpt_now or interrupted) and is_main:
                save_checkpoint(ckpt_dir, step=step, fingerprint=fp, G=raw_G, D=raw_D, opt_g=opt_g, opt_d=opt_d,
                                history=history, acc=acc, acc_n=acc_n, snapshots=snaps, run_id=tracker.run_id)
            if interrupted:
                break

    if interrupted:
        msg = f"interrupted at step {step}; checkpoint saved in {ckpt_dir}; rerun to resume"
        if is_main:
            log.warning(msg)
            tracker.close("KILLED")
            opened.clear()
        return TrainResult(step, interrupted)

    # -- finish: identical weights on every rank, then rank 0 writes the model -------------------
    if ddp:
        for m in (raw_G, raw_D):
            for buf in m.buffers():
                dist.broadcast(buf, 0)        # BN running stats: rank 0's (params are DDP-synced)
    digest = _weights_hash(raw_G, raw_D)
    digests = [None] * world
    if ddp:
        dist.all_gather_object(digests, digest)
    else:
        digests = [digest]
    if len(set(digests)) != 1:
        raise TrainingError(f"ranks ended with different weights: {digests}")
    if is_main:
        if world > 1:
            log.info("weights identical on all %d ranks (sha256 %s)", world, digest[:16])
        extra = {"step": step, "iterations": cfg.iterations, "world_size": world, "device": device.type,
                 "precision": precision, "channels_last": channels_last, "seed": params.seed, "rank_weight_hashes": digests,
                 "receptive_field": rf, "fingerprint": fp, "mlflow_run_id": tracker.run_id,
                 "losses": dict(zip(["step", *LOSS_NAMES], history[-1][:1 + len(LOSS_NAMES)])) if history else {}}
        save_generator(out_model, raw_G, to_dict(mcfg), in_ch, meta, extra)
        log.info("wrote %s", out_model)
        if params.tracking.log_model and tracker.active:
            t0 = time.perf_counter()
            cond, _ = ds[0]
            tracker.log_generator(raw_G, torch.stack([cond, ds[len(ds) - 1][0]]))
            log.info("logged the generator to MLflow in %.1f s", time.perf_counter() - t0)
        tracker.log_artifact(reports_dir / "losses.csv")
        tracker.close("FINISHED")
        opened.clear()
    return TrainResult(step)


def _check_finite(first_bad: torch.Tensor, ddp: bool) -> None:
    """Raise TrainingError naming the first non-finite loss and its step (synced over ranks)."""
    bad = first_bad.clone()
    if ddp:
        bad = torch.where(bad < 0, torch.iinfo(torch.long).max, bad)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)
    bad = bad.tolist()
    hits = [(s, n) for s, n in zip(bad, LOSS_NAMES) if s >= 0]
    if hits:
        s, name = min(hits)
        raise TrainingError(f"non-finite {name} loss at step {s}; stopped; the last good checkpoint "
                            f"is kept (lower the learning rates or check the data)")


__all__ = ["train", "gan_step", "make_optimizer", "TrainResult", "LOSS_NAMES"]
