"""Slices for training and evaluation, read from the memory-mapped processed store.

The store (written by :mod:`ctsynth.data.preprocess`) is two ``.npy`` arrays opened with
``mmap_mode="r"``: nothing is decoded per step, the OS page cache does the work.

    store = ProcessedStore("data/processed")
    ds = SliceDataset(store, store.rows_for_cases(split["train"]), encoding="onehot")
    cond, image = ds[0]          # (C, S, S) float32 in [0, 1], (1, S, S) float32 in [-1, 1]
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.labels import condition_channels, encode_condition
from ctsynth.data.anatomy import CHANNELS as ANATOMY_CHANNELS
from ctsynth.data.anatomy import channels as anatomy_channels


class ProcessedStore:
    """Read-only view of ``data/processed`` (images.npy, masks.npy, slices.csv, meta.json)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        missing = [n for n in ("images.npy", "masks.npy", "slices.csv", "meta.json")
                   if not (self.root / n).exists()]
        if missing:
            raise InputError(f"{self.root}: processed store incomplete, missing {missing} "
                             f"(run `dvc repro preprocess`)")
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.slices = pd.read_csv(self.root / "slices.csv", dtype={"case": str})

    def fingerprint(self, cases: list[str]) -> str:
        """Hash of the store's bytes and of ``cases`` (the training data of a run)."""
        h = hashlib.blake2b(digest_size=16)
        names = ["meta.json", "slices.csv", "images.npy", "masks.npy"] + ["anatomy.npy"] * self.has_anatomy
        if self.partial_volume > 1:
            names += ["masks_fine.npy"] + ["anatomy_fine.npy"] * self.has_anatomy
        for name in names:
            with open(self.root / name, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        h.update(json.dumps(sorted(cases)).encode())
        return h.hexdigest()

    @cached_property
    def images(self) -> np.ndarray:   # (N, S, S) float16 in [-1, 1]
        return np.load(self.root / "images.npy", mmap_mode="r")

    @cached_property
    def masks(self) -> np.ndarray:    # (N, S, S) uint8 structure indices
        return np.load(self.root / "masks.npy", mmap_mode="r")

    @property
    def partial_volume(self) -> int:
        """Sub-pixels per side of the condition's partial-volume fractions (1: nearest classes)."""
        return int(self.meta.get("partial_volume", 1))

    @cached_property
    def condition_masks(self) -> np.ndarray:   # (N, kS, kS) uint8: what the model's condition is built from
        return self.masks if self.partial_volume == 1 else np.load(self.root / "masks_fine.npy", mmap_mode="r")

    @cached_property
    def condition_anatomy(self) -> np.ndarray:  # (N, kS, kS) uint8 anatomy classes, likewise
        return self.anatomy if self.partial_volume == 1 else np.load(self.root / "anatomy_fine.npy", mmap_mode="r")

    def model_meta(self) -> dict:
        """What a model file records of the data it was trained on (its preprocessing)."""
        meta = {"image_size": self.image_size, "hu_window": self.meta["hu_window"], "structures": self.structures,
                "label_map": self.meta["label_map"], "modality": self.meta.get("modality", "ct")}
        return meta | ({"partial_volume": self.partial_volume} if self.partial_volume > 1 else {})

    @property
    def has_anatomy(self) -> bool:
        return (self.root / "anatomy.npy").exists()

    @cached_property
    def anatomy(self) -> np.ndarray:  # (N, S, S) uint8 body / lung / bone classes (ctsynth.data.anatomy)
        if not self.has_anatomy:
            raise InputError(f"{self.root}: no anatomy.npy in the processed store: ingest ran with "
                             f"data.anatomy.source none; model.anatomy needs derived or supplied anatomy")
        return np.load(self.root / "anatomy.npy", mmap_mode="r")

    @property
    def structures(self) -> list[str]:
        return list(self.meta["structures"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    def rows_for_cases(self, cases) -> np.ndarray:
        """Row indices (int64, sorted) of every slice belonging to ``cases``."""
        return np.flatnonzero(self.slices["case"].isin(list(cases)).to_numpy()).astype(np.int64)


def neighbour_rows(store: ProcessedStore, rows: np.ndarray, k: int) -> np.ndarray:
    """Rows (N,) -> (N, 2k + 1) rows of each slice's stored neighbours in its own case, ordered
    z - k .. z + k (2.5-D conditioning, ``model.context_slices``). Neighbours are the case's stored
    slices sorted by z; past either end the end slice repeats (edge padding)."""
    rows = np.asarray(rows, np.int64)
    if k == 0:
        return rows[:, None]
    table = np.empty((len(store.slices), 2 * k + 1), np.int64)
    for _, group in store.slices.groupby("case", sort=False):
        ordered = group.index.to_numpy()[np.argsort(group["z"].to_numpy(), kind="stable")]
        pos = np.arange(len(ordered))[:, None] + np.arange(-k, k + 1)[None]
        table[ordered] = ordered[np.clip(pos, 0, len(ordered) - 1)]
    return table[rows]


def context_masks(masks_zss: np.ndarray, k: int) -> np.ndarray:
    """Masks of consecutive slices of one volume (Z, S, S) -> (Z, 2k + 1, S, S), edges repeated."""
    z = np.arange(len(masks_zss))[:, None] + np.arange(-k, k + 1)[None]
    return np.asarray(masks_zss)[np.clip(z, 0, len(masks_zss) - 1)]


class SliceDataset(Dataset):
    """(condition, image) pairs for a subset of rows of a :class:`ProcessedStore`; with
    ``context`` k > 0 the condition stacks the masks of the 2k + 1 neighbouring slices; with
    ``anatomy`` the slice's body / lung / bone channels follow (:mod:`ctsynth.data.anatomy`); with
    ``contrast`` (N,) (each row's contrast-level plane, :mod:`ctsynth.data.contrast`) it ends with
    that constant plane, and ``contrast_record`` says where the levels came from."""

    def __init__(self, store: ProcessedStore, rows: np.ndarray, encoding: str = "onehot", context: int = 0,
                 contrast: np.ndarray | None = None, contrast_record: dict | None = None, *, anatomy: bool = False):
        self.store, self.rows, self.encoding = store, np.asarray(rows), encoding
        self.classes = store.condition_anatomy if anatomy else None               # raises without anatomy.npy
        self.anatomy_record: dict | None = None                                  # set by contrast.training_dataset
        self.structures = store.structures
        self.context_rows = neighbour_rows(store, self.rows, context)              # (N, 2k + 1)
        self.contrast = None if contrast is None else np.asarray(contrast, np.float32)
        self.contrast_record = contrast_record
        self.constant_channels = int(contrast is not None)                         # trailing planes, never warped

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        image = np.asarray(self.store.images[row], dtype=np.float32)[None]           # (1, S, S)
        masks = np.asarray(self.store.condition_masks[self.context_rows[i]])         # (2k + 1, pS, pS)
        level = None if self.contrast is None else self.contrast[i:i + 1]
        classes = None if self.classes is None else np.asarray(self.classes[row])[None]   # (1, pS, pS)
        cond = condition_batch(masks[None], self.structures, self.encoding, level, classes,
                               self.store.partial_volume)[0]                        # ((2k + 1) C [+ 3] [+ 1], S, S)
        return cond, torch.from_numpy(image)


class SlabDataset(Dataset):
    """Runs of ``k`` consecutive slices of one case from a :class:`SliceDataset` (``model.disc_slices``:
    the z-aware discriminator judges them together): item i -> (conditions (k, C, S, S), images
    (k, 1, S, S)) of the slices z, z + 1, .., z + k - 1. A slab starts at every slice whose k - 1
    successors are stored too (in the same case, at consecutive z: a gap in the stored z ends a run)."""

    def __init__(self, slices: SliceDataset, k: int):
        self.slices, self.k = slices, int(k)
        table = slices.store.slices
        case = table["case"].to_numpy()[slices.rows]
        z = table["z"].to_numpy()[slices.rows].astype(np.int64)
        where = {(c, int(zz)): i for i, (c, zz) in enumerate(zip(case, z))}
        runs = [[where.get((c, int(zz) + j)) for j in range(self.k)] for c, zz in zip(case, z)]
        self.index = np.array([r for r in runs if None not in r], np.int64).reshape(-1, self.k)   # (M, k)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        conds, images = zip(*(self.slices[int(j)] for j in self.index[i]))
        return torch.stack(conds), torch.stack(images)


def slabs_of(ds: SliceDataset, k: int, per_process: int, where: Path) -> SliceDataset | SlabDataset:
    """What training batches draw from: ``ds`` itself (k = 1), or its runs of k consecutive slices
    (``model.disc_slices`` k > 1), refused when ``per_process`` slices are not whole slabs or more
    than the slabs there are."""
    if k == 1:
        return ds
    if per_process % k:
        raise ConfigError(f"model.disc_slices {k}: {per_process} slices per process (train.batch_size over the "
                          f"processes) are not whole slabs")
    slabs = SlabDataset(ds, k)
    if len(slabs) < per_process // k:
        raise InputError(f"{where}: {len(slabs)} runs of {k} consecutive stored slices in the training cases, "
                         f"fewer than one batch ({per_process // k} per process); lower model.disc_slices")
    return slabs


def condition_width(structures: list[str], encoding: str, context: int = 0, contrast: bool = False,
                    anatomy: bool = False) -> int:
    """Channels of the condition :func:`condition_batch` builds."""
    return condition_channels(structures, encoding) * (2 * context + 1) + len(ANATOMY_CHANNELS) * anatomy \
        + int(contrast)


def anatomy_slice(structures: list[str], encoding: str, context: int = 0) -> slice:
    """The anatomy channels' place in a condition (:func:`condition_batch`): after the masks."""
    start = condition_channels(structures, encoding) * (2 * context + 1)
    return slice(start, start + len(ANATOMY_CHANNELS))


def condition_batch(masks: np.ndarray, structures: list[str], encoding: str,
                    contrast: np.ndarray | None = None, anatomy: np.ndarray | None = None,
                    partial_volume: int = 1) -> torch.Tensor:
    """Structure-index masks (B, S, S), or (B, K, S, S) with K neighbouring slices each ->
    condition tensor (B, C, S, S) or (B, K * C, S, S) float32 (slice-major channels); with
    ``anatomy`` (B, S, S) classes three more channels (body outline, lung, bone of the slice itself;
    all zero where a row's classes are all zero: no anatomy given); with ``contrast`` (B,) one more
    channel, a constant plane of each slice's value. With ``partial_volume`` p > 1 the masks and
    anatomy come at p·S (``preprocess.partial_volume``) and every channel is averaged over p x p
    blocks: the fraction of each condition pixel that a class covers."""
    cond = _block_mean(encode_condition(np.asarray(masks), structures, encoding), partial_volume)  # (B, [K,] C, S, S)
    cond = cond.reshape(len(cond), -1, *cond.shape[-2:])
    if anatomy is not None:
        cond = np.concatenate([cond, _block_mean(anatomy_channels(np.asarray(anatomy)), partial_volume)], axis=1)
    if contrast is not None:
        plane = np.broadcast_to(np.asarray(contrast, np.float32).reshape(-1, 1, 1, 1), (len(cond), 1, *cond.shape[2:]))
        cond = np.concatenate([cond, plane], axis=1)
    return torch.from_numpy(np.ascontiguousarray(cond))


def _block_mean(x: np.ndarray, p: int) -> np.ndarray:
    """(..., pH, pW) -> (..., H, W): the mean of every p x p block (p = 1: ``x`` itself)."""
    if p == 1:
        return x
    h, w = x.shape[-2] // p, x.shape[-1] // p
    if (h * p, w * p) != x.shape[-2:]:
        raise ValueError(f"partial volume {p}: the condition grid {x.shape[-2:]} is not a multiple of it")
    return x.reshape(*x.shape[:-2], h, p, w, p).mean(axis=(-3, -1), dtype=np.float32)


def train_batches(ds, sampler: DistributedSampler, batch: int, start_step: int,
                  **loader_kw) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (cond, image) batches; batch k of epoch e depends only on (seed, e, k), so a
    resumed run continues exactly where it stopped (the sampler position is the step). Items that
    are slabs (:class:`SlabDataset`) come flattened: ``batch`` slabs of k slices are a batch of
    ``batch`` · k slices, each slab's slices consecutive.

    Each epoch's loader gets its own generator: a DataLoader iterator otherwise draws its worker
    base seed from torch's global RNG, which would shift the augmentation draws (ctsynth.data.augment)
    of a resumed run against an uninterrupted one."""
    per_epoch = len(sampler) // batch
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = list(sampler)[skip * batch: per_epoch * batch]
        for cond, image in DataLoader(Subset(ds, idx), batch_size=batch, shuffle=False, drop_last=True,
                                      generator=torch.Generator().manual_seed(epoch), **loader_kw):
            yield (cond.flatten(0, 1), image.flatten(0, 1)) if cond.dim() == 5 else (cond, image)
        epoch, skip = epoch + 1, 0


def evenly_spaced(n_items: int, k: int) -> np.ndarray:
    """``k`` evenly spaced positions in ``range(n_items)`` (all when k >= n_items)."""
    if n_items <= k:
        return np.arange(n_items)
    return np.unique(np.linspace(0, n_items - 1, k).round().astype(int))
