"""The training side of ``ctsynth bench``, shared with its memory child (:mod:`ctsynth.tools.bench.memory`):
the paper preset, the timed training paths, synthetic slices and stores, and a trainer closure
that runs one real :func:`ctsynth.train.gan.gan_step`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ctsynth.core.accel import autocast, resolve_channels_last, resolve_precision
from ctsynth.core.config import Params
from ctsynth.core.errors import ConfigError
from ctsynth.tools.presets import PRESETS_DIR, expand

PAPER_PRESET = PRESETS_DIR / "paper.yaml"


@cache
def paper_preset() -> tuple[dict, dict]:
    """(model section, optimiser settings) of ``params/paper.yaml`` expanded onto the defaults,
    as ``ctsynth preset paper`` expands it: the bench times exactly the paper preset's
    architecture, so the two cannot drift apart."""
    if not PAPER_PRESET.is_file():
        raise ConfigError(f"{PAPER_PRESET}: the paper preset is missing (run the bench from a checkout)")
    p = expand(PAPER_PRESET).params
    hp = {"lr_g": p.train.lr_g, "lr_d": p.train.lr_d, "betas": (p.train.beta1, p.train.beta2),
          "lambda_l1": p.train.lambda_l1}
    return dataclasses.asdict(p.model), hp
STRUCTURES = ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"]


@dataclass(frozen=True)
class TrainPath:
    name: str
    channels_last: bool = False
    precision: str = "fp32"
    compile: bool = False
    adam: str = "plain"            # plain | foreach | fused | default (train.make_optimizer)
    sync: bool = True              # host reads the losses every step
    deterministic: bool = False    # torch.use_deterministic_algorithms
    mkldnn: bool = True            # torch.backends.mkldnn.enabled (False: im2col + MKL GEMM)


BASELINE = TrainPath("baseline")
_FAST = {"adam": "fused", "sync": False}
EXTRA_PATHS = {                    # --paths NAME,...: variants timed beside baseline/default
    "fp32_cl": TrainPath("fp32_cl", channels_last=True),
    "nchw_fused": TrainPath("nchw_fused", **_FAST),
    "nchw_foreach": TrainPath("nchw_foreach", adam="foreach", sync=False),
    "cl_fused": TrainPath("cl_fused", channels_last=True, **_FAST),
    "nchw_nomkldnn": TrainPath("nchw_nomkldnn", mkldnn=False, **_FAST),
    "cl_nomkldnn": TrainPath("cl_nomkldnn", channels_last=True, mkldnn=False, **_FAST),
    "nchw_compile": TrainPath("nchw_compile", compile=True, **_FAST),
    "bf16_cl": TrainPath("bf16_cl", channels_last=True, precision="bf16", **_FAST),
    "nondet": None,                # the default path without deterministic algorithms
    "compile": None,               # the default path + torch.compile (also --compile)
}


def default_path(params: Params, device: torch.device) -> TrainPath:
    c = params.train
    return TrainPath("default", resolve_channels_last(c.channels_last, device),
                     resolve_precision(c.precision, device), c.compile, "default", False, True)


def extra_path(name: str, default: TrainPath) -> TrainPath:
    if name not in EXTRA_PATHS:
        raise ConfigError(f"bench --paths: unknown path {name!r}; choose from {', '.join(EXTRA_PATHS)}")
    if name == "compile":
        return dataclasses.replace(default, name="default+compile", compile=True)
    if name == "nondet":
        return dataclasses.replace(default, name="default-nondet", deterministic=False)
    return EXTRA_PATHS[name]


# ------------------------------------------------------------------------------ helpers

def synthetic_slices(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images float16 (n,S,S) in [-1,1], masks uint8 (n,S,S)): 7 disc 'structures' per slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    images, masks = np.empty((n, size, size), np.float16), np.zeros((n, size, size), np.uint8)
    for i in range(n):
        img = -0.8 + 0.05 * rng.standard_normal((size, size), dtype=np.float32)
        for idx in range(1, 8):
            cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.06, 0.14)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            masks[i][blob], img[blob] = idx, 0.1 * idx
        images[i] = img.clip(-1, 1)
    return images, masks


def write_store(root: Path, n: int, size: int, cases: int = 8) -> Path:
    """A processed store in preprocess's format (images/masks .npy, slices.csv, meta.json)."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    images, masks = synthetic_slices(n, size)
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    per = -(-n // cases)
    names = [f"b{i // per:03d}" for i in range(n)]
    pd.DataFrame({"case": names, "z": [i % per for i in range(n)]}).to_csv(root / "slices.csv", index=False)
    aff = np.diag([1.0, 1.0, 2.0, 1.0]).tolist()
    meta = {"image_size": size, "hu_window": [-1000.0, 1000.0], "structures": STRUCTURES,
            "label_map": {"205": "Myo", "420": "LA", "500": "LV", "550": "RA", "600": "RV", "820": "Ao", "850": "PA"},
            "cases": {c: {"shape": [size, size, per], "affine": aff, "orig_affine": aff,
                          "orig_shape": [size, size, per], "z": list(range(per))} for c in sorted(set(names))}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def make_trainer(path: TrainPath, size: int, batch: int, device: torch.device, model: dict, hp: dict):
    """A closure running one real ``gan_step`` of the paper GAN on ``path``."""
    from ctsynth.core.labels import condition_channels
    from ctsynth.data.store import condition_batch
    from ctsynth.train.gan import GanPair, LossWeights, gan_step, make_optimizer
    from ctsynth.train.networks import build_discriminator, build_generator

    torch.manual_seed(0)
    in_ch = condition_channels(STRUCTURES, model["encoding"])
    mem = torch.channels_last if path.channels_last else torch.contiguous_format
    G = build_generator(model, in_ch).to(device, memory_format=mem)
    D = build_discriminator(model, in_ch).to(device, memory_format=mem)

    def adam(m, lr):
        if path.adam == "default":
            return make_optimizer(m.parameters(), lr, hp["betas"])
        return torch.optim.Adam(m.parameters(), lr=lr, betas=hp["betas"], foreach=path.adam == "foreach",
                                fused=path.adam == "fused")

    opt_g, opt_d = adam(G, hp["lr_g"]), adam(D, hp["lr_d"])
    Gm, Dm, Dg = (torch.compile(G), torch.compile(D), torch.compile(D)) if path.compile else (G, D, D)
    amp = autocast(path.precision, device)
    images, masks = synthetic_slices(batch, size, seed=1)
    cond = condition_batch(masks, STRUCTURES, model["encoding"]).to(device).contiguous(memory_format=mem)
    real = torch.from_numpy(images.astype(np.float32))[:, None].to(device).contiguous(memory_format=mem)

    def step() -> None:
        torch.use_deterministic_algorithms(path.deterministic, warn_only=True)
        torch.backends.mkldnn.enabled = path.mkldnn
        losses = gan_step(GanPair(Gm, Dm, Dg, opt_g, opt_d), cond, real, LossWeights(l1=hp["lambda_l1"]), amp)
        if path.sync:
            losses.tolist()
    return step
