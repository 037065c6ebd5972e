"""DDP plumbing for training: launching torchrun, the process group, reductions, a stop flag
that every rank agrees on, and the end-of-run weight check.

One process (no torchrun) runs the same code with ``ddp=False``: every helper here is then the
identity or a no-op, so the training loop has a single code path (as in nanoGPT).

Launch (``stages/train.py`` does this itself when ``train.nproc``/``train.nnodes`` ask for it)::

    torchrun --standalone --nproc-per-node N stages/train.py ...              # one machine
    torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d \\
             --rdzv-endpoint HOST:PORT --rdzv-id ctsynth stages/train.py ...  # on every node
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ctsynth.core.accel import pick_device
from ctsynth.core.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

RDZV_ID = "ctsynth"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ


def torchrun_argv(nproc: int, nnodes: int, rdzv_endpoint: str | None, script: str,
                  script_args: Sequence[str]) -> list[str] | None:
    """The torchrun command that runs ``script`` with ``nproc`` processes on each of ``nnodes``
    nodes, or None when one plain process is enough (1 x 1, or already under torchrun).

    One node without an endpoint uses ``--standalone``; otherwise torchrun's own c10d rendezvous
    at ``rdzv_endpoint`` (every node runs the same command; the first to arrive hosts the store).
    """
    if launched_by_torchrun() or nproc * nnodes == 1:
        return None
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc)]
    if rdzv_endpoint:                     # config validation requires one when nnodes > 1
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", RDZV_ID]
    else:
        argv.append("--standalone")
    return [*argv, script, *script_args]


@dataclass
class Dist:
    """Where this process sits: ``ddp`` (a process group exists), ``rank``, ``world`` and device."""
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def reduce(self, t: torch.Tensor, op: Any = None) -> torch.Tensor:
        """all_reduce (default SUM) in place under DDP; identity otherwise."""
        if self.ddp:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def all_ok(self, ok: bool) -> bool:
        """True iff ``ok`` on every rank."""
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        return bool(self.reduce(flag, dist.ReduceOp.MIN if self.ddp else None).item())

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.ddp:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_choice: str) -> Dist:
    """DDP iff launched by torchrun with more than one process in total; ``torchrun
    --nproc-per-node 1`` runs exactly like plain ``python`` (no process group)."""
    ddp = launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_cuda = pick_device(device_choice).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if not ddp:
        return Dist(False, 0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Dist(True, dist.get_rank(), dist.get_world_size(), device)


class StopFlag:
    """SIGTERM/SIGINT set a flag (the loop stops after the current step). A torchrun worker
    also stops when its agent disappears (torchrun SIGKILLed): workers, grandchildren of DVC,
    never train on as orphans. (A plain ``nohup python ...`` run may outlive its shell.)"""

    def __init__(self) -> None:
        self.signum = 0
        self._ppid = os.getppid() if launched_by_torchrun() else None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
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

    def agreed(self, d: Dist) -> int:
        """The signal any rank received (0: none): every rank stops at the same step."""
        if not d.ddp:
            return self.poll()
        return int(d.reduce(torch.tensor([self.poll()], device=d.device), dist.ReduceOp.MAX))


def check_finite(first_bad: torch.Tensor, d: Dist, names: Sequence[str]) -> None:
    """Raise TrainingError naming the first non-finite loss and its step, agreed over ranks
    (``first_bad``: per loss of ``names``, the first step with a non-finite value; -1: none)."""
    bad = first_bad.clone()
    if d.ddp:
        big = torch.iinfo(torch.long).max
        bad = torch.where(bad < 0, big, bad)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad = torch.where(bad == big, -1, bad)
    hits = [(s, n) for s, n in zip(bad.tolist(), names) if s >= 0]
    if hits:
        s, name = min(hits)
        raise TrainingError(f"non-finite {name} loss at step {s}; stopped; the last good checkpoint "
                            f"is kept (lower the learning rates or check the data)")


def compile_models(*models: torch.nn.Module) -> tuple:
    """``torch.compile`` each model, with inductor's kernels deterministic too (the stages' seeding
    sets torch's flag without importing the compiler: :func:`ctsynth.core.runner.seed_everything`)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    return tuple(torch.compile(m) for m in models)


def weights_hash(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def sync_and_hash(d: Dist, *modules: torch.nn.Module) -> list[str]:
    """Give every rank rank 0's buffers (BN running stats; DDP keeps the params in step), then
    the weight hash of every rank; a training whose ranks disagree is not written."""
    if d.ddp:
        for m in modules:
            for buf in m.buffers():
                dist.broadcast(buf, 0)
    digest = weights_hash(*modules)
    digests: list = [digest]
    if d.ddp:
        digests = [None] * d.world
        dist.all_gather_object(digests, digest)
    return digests
