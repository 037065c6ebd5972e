"""Training checkpoints: atomic ``step_XXXXXXX.pt`` files holding models, optimizers, RNG states,
the per-step loss record and the run fingerprint; resume picks the newest loadable one of the same
run. Training keeps one folder per fingerprint (``<checkpoints>/<fingerprint>/``), a working folder
outside DVC's outputs, so runs of different configurations -- queued experiments too -- never
touch each other's checkpoints.

Everything is stored as tensors and plain values so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ctsynth.core.config import TrainCfg, fingerprint_exempt, to_dict
from ctsynth.core.errors import TrainingError
from ctsynth.core.imports import source_hash
from ctsynth.core.io import save_torch

log = logging.getLogger(__name__)

CKPT_FORMAT = "ctsynth-checkpoint-2"     # 2: per-step loss record instead of logged means
KEEP_CHECKPOINTS = 2

# train.* keys that do not shape the weights, declared with `not_in_fingerprint` next to their
# fields in ctsynth.core.config (nproc, nnodes and device enter the fingerprint resolved, as world
# size and device type): every other train key must match to resume. Keys that change none of
# train's outputs are not in `train` at all but in `train_run` (not hashed, not a DVC param).
NOT_IN_FINGERPRINT = fingerprint_exempt(TrainCfg)


def run_fingerprint(params, data_fp: str, world: int, device: torch.device, precision: str) -> str:
    """Hash of everything that shapes the trained weights -- params, data, world size, device,
    precision and the training code itself -- so a run resumes only into the same run."""
    tr = {k: v for k, v in to_dict(params.train).items() if k not in NOT_IN_FINGERPRINT}
    if params.train.lr_decay_start is None:
        tr.pop("iterations")                 # no decay: more iterations = the same run, longer
    blob = {"seed": params.seed, "model": to_dict(params.model), "train": tr, "data": data_fp,
            "world": world, "device": device.type, "precision": precision, "code": source_hash("train/train.py")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def rng_state() -> dict:
    """python/numpy/torch RNG states as tensors and plain values (``weights_only`` loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def ckpt_files(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files, newest (highest step) first."""
    return sorted(ckpt_dir.glob("step_*.pt"), reverse=True) if ckpt_dir.is_dir() else []


def save_checkpoint(ckpt_dir: Path, *, step: int, fingerprint: str, G, D, opt_g, opt_d,
                    losses: torch.Tensor, snapshots: dict, run_id: str | None, G_ema=None) -> Path:
    """Atomically write ``step_XXXXXXX.pt`` (never with non-finite weights); keep the newest 2."""
    finite = torch.stack([torch.isfinite(p).all() for m in (G, D) for p in m.parameters()]).all()
    if not finite:
        raise TrainingError(f"non-finite weights at step {step}; checkpoint not written, the last good "
                            f"one is kept")
    blob = {"format": CKPT_FORMAT, "step": step, "fingerprint": fingerprint,
            "G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "G_ema": None if G_ema is None else G_ema.state_dict(),
            "rng": rng_state(), "losses": losses, "snapshots": {str(k): v for k, v in snapshots.items()},
            "mlflow_run_id": run_id}
    path = ckpt_dir / f"step_{step:07d}.pt"
    save_torch(path, blob)
    for old in ckpt_files(ckpt_dir)[KEEP_CHECKPOINTS:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(ckpt_dir: Path, fingerprint: str, iterations: int) -> dict | None:
    """Newest loadable checkpoint of *this* run (same fingerprint, step <= iterations), else None."""
    for path in ckpt_files(ckpt_dir):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, OSError, EOFError, ValueError) as e:
            log.warning("%s: unreadable checkpoint (%s); trying an older one", path, e)
            continue
        if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
            log.warning("%s: not a ctsynth checkpoint; ignored", path)
            continue
        if blob["fingerprint"] != fingerprint or blob["step"] > iterations:
            log.info("%s: from a different configuration; training starts fresh", path)
            return None
        blob["path"] = str(path)
        blob["snapshots"] = {int(k): v for k, v in blob["snapshots"].items()}
        return blob
    return None
