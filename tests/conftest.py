"""Shared fixtures: tiny processed stores and tiny params, so unit tests stay fast."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctsynth.core.config import params_from_dict

# Hermetic tests: evaluate.inception_weights defaults to auto (standard FID weights from the
# torch hub cache, downloaded if online). The suite, its stage subprocesses and `dvc repro` in
# the end-to-end test must neither download 91 MB nor pick up weights a developer has cached:
# an empty torch home and no download. Tests of the auto path set their own cache.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="ctsynth-test-torch-")
os.environ["CTSYNTH_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "data" / "real-aorta-crop"


def make_store(root: Path, cases=("c1", "c2", "c3", "c4"), slices_per_case: int = 6,
               size: int = 32, seed: int = 0) -> Path:
    """Write a small processed store of blob-shaped 'anatomy' (contract: docs/contracts.md)."""
    rng = np.random.default_rng(seed)
    n = len(cases) * slices_per_case
    yy, xx = np.mgrid[:size, :size] / size
    images = np.empty((n, size, size), np.float16)
    masks = np.zeros((n, size, size), np.uint8)
    rows = []
    for i in range(n):
        img = -0.8 + 0.05 * rng.standard_normal((size, size))
        for idx in range(1, 8):
            cy, cx, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.06, 0.14)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            masks[i][blob] = idx
            img[blob] = 0.1 * idx
        images[i] = np.clip(img, -1, 1)
        rows.append({"case": cases[i // slices_per_case], "z": i % slices_per_case})
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    np.save(root / "masks.npy", masks)
    pd.DataFrame(rows).to_csv(root / "slices.csv", index=False)
    affine = np.diag([2.0, 2.0, 3.0, 1.0]).tolist()
    meta = {"image_size": size, "hu_window": [-1000.0, 1000.0],
            "structures": ["Myo", "LA", "LV", "RA", "RV", "Ao", "PA"],
            "label_map": {"205": "Myo", "420": "LA", "500": "LV", "550": "RA", "600": "RV",
                          "820": "Ao", "850": "PA"},
            "cases": {c: {"shape": [size, size, slices_per_case], "affine": affine,
                          "orig_affine": affine, "orig_shape": [size, size, slices_per_case],
                          "z": list(range(slices_per_case))} for c in cases}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def tiny_store(tmp_path) -> Path:
    return make_store(tmp_path / "processed")


def tiny_params(**sections):
    """Params for a tiny, fast model (32², depth 5, 8 filters); override sections by kwargs."""
    raw = {"preprocess": {"image_size": 32},
           "model": {"gen_depth": 5, "ngf": 8, "ndf": 8, "disc_layers": 2, "anatomy": False},   # stores without anatomy
           "train": {"iterations": 4, "batch_size": 4},
           "train_run": {"checkpoint_every": 2, "log_every": 1},
           "segmenter": {"iterations": 5, "batch_size": 4, "width": 4},
           "realism": {"c2st_steps": 10, "c2st_width": 4}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return params_from_dict(raw)


def train_on_raw(raw: Path, root: Path, **sections):
    """ingest -> preprocess -> split -> train (tiny, no tracking) of the NIfTI pairs in ``raw`` into
    ``root`` (interim/, processed/, split.json, generator.pt); ``sections`` override tiny_params'.
    Returns the params used."""
    from ctsynth.data import ingest, preprocess, split
    from ctsynth.train.train import run as train

    data = {"source": "nifti", "raw_dir": str(raw), **sections.pop("data", {})}
    p = tiny_params(data=data, split={"train": 0.5, "val": 0.25, "test": 0.25},
                    train={"snapshot_at": [], **sections.pop("train", {})}, tracking={"enabled": False}, **sections)
    ingest.run(p, root / "interim")
    preprocess.run(p, root / "interim", root / "processed")
    split.run(p, root / "processed", root / "split.json")
    train(p, root / "processed", root / "split.json", root / "generator.pt", root / "ckpt", root / "reports",
          run_file=root / "run.json")
    return p


def load_stage(name: str):
    """Import ``stages/<name>.py`` as a module (stages are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def real_raw(tmp_path) -> Path:
    """A raw folder holding the real-scan fixture as one case ('real', label 1 = aorta)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "real_image.nii.gz").symlink_to(REAL_CT / "ct.nii.gz")
    (raw / "real_label.nii.gz").symlink_to(REAL_CT / "aorta_label.nii.gz")
    return raw


def standin_inception_weights(path: Path, seed: int = 0) -> Path:
    """A small stand-in for the FID Inception weights (pt_inception layout, ~0.5 MB, not 91 MB):
    random conv kernels shared across input channels (stored once, expanded with stride 0),
    BatchNorm as identity. Real weights are not available offline; this exercises every code
    path that loads and runs them, and gives distinct, finite features for distinct images."""
    import torch

    from ctsynth.evaluate.inception import inception_module

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in inception_module("pt_inception").state_dict().items():
        if value.ndim == 4:        # (out, in, kh, kw): scaled so activations neither vanish nor explode
            out, cin, kh, kw = value.shape
            base = torch.randn(out, 1, kh, kw, generator=g) * 2.0 / (cin * (kh * kw) ** 0.5)
            state[key] = base.expand(value.shape)
        elif value.dtype == torch.long:
            state[key] = value
        elif key.endswith(("running_var", ".weight")):
            state[key] = torch.ones(1).expand(value.shape)
        else:
            state[key] = torch.zeros(1).expand(value.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
