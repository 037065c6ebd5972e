"""Inference: a trained generator file -> synthetic CT, for any mask.

:func:`load_model` reads a generator file with the preprocessing it was trained with;
:class:`MaskToCT` runs it on structure-index slices or whole canonical volumes;
:func:`generate_file` is ``ctsynth generate``: any label NIfTI -> synthetic CT NIfTI with the same
shape, orientation and affine. The generate stage (:mod:`ctsynth.synth.generate`) and
``ctsynth synthesize`` (:mod:`ctsynth.synth.synthesize`) use the same engine.

Geometry of one volume: original grid --io_orientation--> canonical RAS ``(X, Y, Z)`` -> per axial
slice :func:`ctsynth.data.preprocess.to_display` + nearest resize to ``S x S`` (``pS x pS`` with
``partial_volume`` p, averaged to S x S fractions) -> generator ->
:func:`ctsynth.data.preprocess.restore_slice` (resize back, HU) -> canonical -> original orientation.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctsynth.core.accel import pick_device
from ctsynth.core.config import MR_RANGE
from ctsynth.core.errors import InputError, ModelFileError
from ctsynth.core.io import from_canonical, load_nifti, save_nifti, to_canonical
from ctsynth.core.labels import parse_label_map
from ctsynth.core.progress import quiet
from ctsynth.data import contrast
from ctsynth.data.masks import index_volume, parse_label_map_arg, structures_arg
from ctsynth.data.noise import NoiseModel
from ctsynth.data.preprocess import kept_indices, prepare_classes, prepare_mask, restore_slice
from ctsynth.data.store import condition_batch, condition_width, context_masks

log = logging.getLogger(__name__)


def load_model(model_path: str | Path, device: str = "auto") -> tuple[torch.nn.Module, dict]:
    """``(generator in eval mode, preprocessing meta)`` from a file written by
    :func:`ctsynth.train.networks.save_generator`; ModelFileError for a missing/corrupt file.

    The meta is flat: image_size, hu_window, structures, label_map, encoding (as the model was
    trained) plus in_channels, model_cfg and extra (the training's step, seed, runtime, ...)."""
    from ctsynth.train.networks import load_generator

    path = Path(model_path)
    model, blob = load_generator(path, device=pick_device(device))
    meta = {**dict(blob.get("preprocess") or {}), "in_channels": blob.get("in_channels"),
            "model_cfg": blob.get("model_cfg"), "extra": dict(blob.get("extra") or {}),
            "context_slices": int((blob.get("model_cfg") or {}).get("context_slices", 0))}  # older files: 0
    missing = [k for k in ("image_size", "hu_window", "structures", "encoding") if k not in meta]
    if missing:
        raise ModelFileError(f"{path}: model file lacks preprocessing info {missing}; "
                             f"retrain with this version of ctsynth")
    noise = meta.get("noise")
    if noise and int(noise.get("size", -1)) != int(meta["image_size"]):
        raise ModelFileError(f"{path}: its noise model is for {noise.get('size')}² slices but the model draws "
                             f"{meta['image_size']}²; the file is inconsistent, retrain")
    k, controlled, anatomy = meta["context_slices"], bool(meta.get("contrast")), bool(meta.get("anatomy"))
    expected = condition_width(list(meta["structures"]), meta["encoding"], k, controlled, anatomy)
    if meta["in_channels"] != expected:
        raise ModelFileError(f"{path}: model takes {meta['in_channels']} condition channels but its "
                             f"structures {meta['structures']} ({meta['encoding']}, context_slices {k}, "
                             f"contrast control {'on' if controlled else 'off'}, anatomy "
                             f"{'on' if anatomy else 'off'}) need {expected}")
    return model.eval(), meta


class MaskToCT:
    """A generator plus the exact preprocessing it was trained with.

    ``structures`` is the condition subset actually drawn (default: the model's); channels of
    the model's other structures stay empty, so a subset needs no retraining. ``contrast_hu``: the
    contrast level to draw at (a model with the contrast control; default: its training cases'
    mean), refused outside the levels it was trained on (:mod:`ctsynth.data.contrast`).
    A model conditioned on the anatomy around the heart (``model.anatomy``) takes each slice's body /
    lung / bone classes; without them it draws from the heart labels alone when it was trained with
    ``train.anatomy_drop`` > 0, and refuses otherwise, naming the missing channels.
    A model with a noise model (``model.noise``, :mod:`ctsynth.data.noise`) draws the noise-free slice;
    with a ``seed`` (an int) each slice gets noise from ``(seed, *key)``, its key
    naming the slice (see :meth:`unit`, :meth:`volume`); without one, the noise-free slice comes out.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, batch_size: int = 32,
                 structures: list[str] | None = None, contrast_hu: float | None = None,
                 seed: int | None = None):
        self.meta = meta
        self.size = int(meta["image_size"])
        self.partial_volume = int(meta.get("partial_volume", 1))   # masks come at partial_volume * size
        self.window = [float(v) for v in meta["hu_window"]]
        self.model_structures = list(meta["structures"])
        self.encoding = meta["encoding"]
        self.structures = list(structures) if structures else self.model_structures
        self.keep = kept_indices(self.structures)
        self.batch_size = int(batch_size)
        self.context = int(meta.get("context_slices", 0))       # 2.5-D: neighbours on each side
        self.device = next(model.parameters()).device
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.slices_done, self.seconds = 0, 0.0
        self.contrast = meta.get("contrast") or None                   # the model's contrast record
        self.level = self.set_level(contrast_hu)
        self.anatomy = meta.get("anatomy") or None                     # the model's anatomy record
        self.modality = meta.get("modality") or "ct"                   # mr: volumes written in nu + 1000 (>= 0)
        self.noise = NoiseModel.from_record(meta.get("noise"))          # the model's noise model, if any
        self.seed = seed

    @property
    def adds_noise(self) -> bool:
        return self.noise is not None and self.seed is not None

    def noise_for(self, keys) -> np.ndarray | None:
        """(N, S, S) noise (model units) for slices named by ``keys`` (tuples of ints), or None."""
        if not self.adds_noise:
            return None
        return self.noise.for_keys((self.seed,), keys)

    def set_level(self, contrast_hu: float | None, where: str = "contrast") -> float | None:
        """Check and set the level (HU) every later slice is drawn at; returns it (None: no control)."""
        if self.contrast is None:
            if contrast_hu is not None:
                raise InputError(f"{where} {contrast_hu:g} HU: this model has no contrast control "
                                 f"(trained with model.contrast_control false)")
            return None
        self.level = float(self.contrast["mean_hu"]) if contrast_hu is None else \
            contrast.check(float(contrast_hu), self.contrast, where)
        return self.level

    @property
    def draws_heart_only(self) -> bool:
        """A model with anatomy that learned to draw without it (``train.anatomy_drop`` > 0)."""
        return self.anatomy is not None and float(self.anatomy.get("drop") or 0) > 0

    def anatomy_for(self, n: int, anatomy: np.ndarray | None, where: str = "generation") -> np.ndarray | None:
        """The anatomy classes (n, M, M) the condition gets: the given ones, blank ones (all zero: the
        model draws from the heart alone, as ``train.anatomy_drop`` taught it), or None (no anatomy)."""
        if self.anatomy is None:
            if anatomy is not None:
                raise InputError(f"{where}: anatomy given, but this model is not conditioned on the anatomy "
                                 f"around the heart (trained with model.anatomy false)")
            return None
        if anatomy is not None:
            return np.asarray(anatomy)
        if not self.draws_heart_only:
            raise InputError(f"{where}: this model is conditioned on the anatomy around the heart (channels "
                             f"{', '.join(self.anatomy['channels'])}) and never learned to draw without it "
                             f"(train.anatomy_drop 0); pass the anatomy (ctsynth generate --anatomy FILE, "
                             f"body/lung/bone classes), or use a model trained with train.anatomy_drop > 0")
        return np.zeros((n, self.mask_size, self.mask_size), np.uint8)

    @property
    def mask_size(self) -> int:
        """Side of the masks and anatomy classes this model's condition is built from."""
        return self.size * self.partial_volume

    # (N, M, M) uint8 structure indices, or (N, 2k+1, M, M) with each slice's neighbours (z-k..z+k)
    # when the model has context_slices k -> (N, S, S) float32 in [-1, 1] (M = mask_size: S, or
    # partial_volume * S); levels (N,) HU: each slice's contrast level (default: the level set);
    # anatomy (N, M, M) classes (see anatomy_for);
    # keys: (N,) tuples of ints naming the slices, the seed of each one's noise (see noise_for; default:
    # a running count of the slices drawn, which depends on the order of the calls)
    @torch.inference_mode()
    def unit(self, masks: np.ndarray, levels: np.ndarray | None = None,
             anatomy: np.ndarray | None = None, keys=None) -> np.ndarray:
        masks = np.asarray(masks)
        anatomy = self.anatomy_for(len(masks), anatomy)                             # (N, M, M) or None
        noise = self.noise_for([(self.slices_done + j,) for j in range(len(masks))] if keys is None else keys)
        if masks.ndim == 3 and self.context == 0:
            masks = masks[:, None]                                                  # (N, 1, S, S)
        if masks.ndim != 4 or masks.shape[1] != 2 * self.context + 1:
            raise InputError(f"generator with context_slices={self.context} needs masks (N, "
                             f"{2 * self.context + 1}, S, S) of each slice and its neighbours, got {masks.shape}")
        if masks.shape[2:] != (self.mask_size, self.mask_size):
            raise InputError(f"this model draws from {self.mask_size}² masks (image_size {self.size}, partial_volume "
                             f"{self.partial_volume}), got {masks.shape[2:]}")
        out = np.empty((len(masks), self.size, self.size), np.float32)
        start = time.perf_counter()
        for i in range(0, len(masks), self.batch_size):
            chunk = masks[i:i + self.batch_size]
            chunk = np.where(np.isin(chunk, self.keep), chunk, 0)                    # (B, S, S)
            cond = condition_batch(chunk, self.model_structures, self.encoding,     # (B, (2k+1)C [+3] [+1], S, S)
                                   self._planes(len(chunk), None if levels is None else levels[i:i + len(chunk)]),
                                   None if anatomy is None else anatomy[i:i + len(chunk)], self.partial_volume)
            cond = cond.to(self.device).contiguous(memory_format=torch.channels_last)
            fake = self.model(cond)[:, 0].float().cpu()                            # (B, S, S)
            if noise is not None:
                fake += torch.from_numpy(noise[i:i + len(chunk)])
            out[i:i + len(chunk)] = fake.clamp_(-1, 1).numpy()
        self.seconds += time.perf_counter() - start
        self.slices_done += len(masks)
        return out

    def _planes(self, n: int, levels: np.ndarray | None) -> np.ndarray | None:
        if self.contrast is None:
            return None
        return contrast.planes(np.full(n, self.level, np.float32) if levels is None else levels, self.contrast,
                               self.window)

    def mask_to_model(self, mask_xy: np.ndarray) -> np.ndarray:
        """Canonical structure-index slice (X, Y) -> display slice (M, M) uint8 (M = :attr:`mask_size`).

        Same geometry as :func:`ctsynth.data.preprocess.prepare_mask` (display orientation, nearest)."""
        return prepare_mask(mask_xy, self.mask_size, self.keep)

    def volume(self, index_xyz: np.ndarray, desc: str = "volume", anatomy_xyz: np.ndarray | None = None,
               key: tuple = ()) -> np.ndarray:
        """Canonical structure-index volume (X, Y, Z) -> synthetic CT (X, Y, Z) int16 HU (MR: nu + 1000,
        0 to 2000, non-negative like the magnitude images MR data are, so ingest takes them back as MR).

        Streams ``batch_size`` slices at a time through the generator, so memory stays ~ one output
        volume plus the model-size uint8 masks. With ``context_slices`` k each slice's condition
        holds its k neighbours on each side (the volume's end slices repeat past its ends);
        ``anatomy_xyz``: the canonical body / lung / bone classes on the same grid (a model with
        ``model.anatomy``). Noise (a seeded model with ``model.noise``): slice z has the key ``(*key, z)``."""
        nx, ny, nz = index_xyz.shape
        lo, hi = self.window
        out = np.empty((nx, ny, nz), np.int16)
        masks = np.stack([self.mask_to_model(np.asarray(index_xyz[:, :, z])) for z in range(nz)])  # (Z, M, M)
        masks = context_masks(masks, self.context)                                    # (Z, 2k+1, M, M)
        if anatomy_xyz is not None and tuple(anatomy_xyz.shape) != tuple(index_xyz.shape):
            raise InputError(f"{desc}: anatomy {tuple(anatomy_xyz.shape)} and labels {tuple(index_xyz.shape)} "
                             f"are on different grids")
        classes = None if anatomy_xyz is None else np.stack(
            [prepare_classes(np.asarray(anatomy_xyz[:, :, z]), self.mask_size) for z in range(nz)])   # (Z, M, M)
        classes = self.anatomy_for(nz, classes, desc)
        for z0 in tqdm(range(0, nz, self.batch_size), desc=desc, unit="batch", disable=quiet()):
            zs = range(z0, min(nz, z0 + self.batch_size))
            fake = self.unit(masks[z0:zs.stop], None, None if classes is None else classes[z0:zs.stop],
                             [(*key, z) for z in zs])                                 # (B, S, S)
            for j, z in enumerate(zs):
                hu = restore_slice(fake[j], (nx, ny), self.window)                   # (X, Y) HU
                out[:, :, z] = np.rint(np.clip(hu, lo, hi)).astype(np.int16)
        return out + np.int16(-MR_RANGE[0]) if self.modality == "mr" else out

    def throughput(self) -> float:
        return self.slices_done / self.seconds if self.seconds > 0 else float("nan")


def generate_file(model_path, mask_path, out_path, structures=None, label_map=None,
                  batch_size: int = 32, *, device: str = "auto", contrast_hu: float | None = None,
                  anatomy=None, anatomy_map="ctsynth", seed: int | None = None) -> dict:
    """Label NIfTI -> synthetic CT NIfTI (int16 HU), same shape, orientation and affine.

    ``label_map``: dict, inline JSON or JSON/YAML file (default: the model's); ``structures``:
    subset of the model's structures to draw (default: all of them); ``contrast_hu``: the contrast
    level of a model with the contrast control (default: its training mean); ``anatomy``: a label
    NIfTI on the mask's grid with body / lung / bone values (``anatomy_map``: a preset, a dict, inline
    JSON or a JSON/YAML file) for a model with ``model.anatomy``; ``seed``: the noise of a model with
    ``model.noise`` (slice z from ``(seed, z)``; None: the noise-free slice). Returns statistics."""
    model, meta = load_model(model_path, device)
    lmap = (parse_label_map_arg(label_map)
            or parse_label_map(meta.get("label_map") or {}, where=f"{model_path} label_map"))
    chosen = structures_arg(structures, meta["structures"])
    mask_path = Path(mask_path)
    img = load_nifti(mask_path, role="mask")
    index, info = index_volume(mask_path, np.asanyarray(img.dataobj), lmap, chosen)
    synth = MaskToCT(model, meta, batch_size=batch_size, structures=chosen, contrast_hu=contrast_hu, seed=seed)
    classes = None if anatomy is None else read_anatomy(anatomy, anatomy_map, img)
    canon = synth.volume(to_canonical(index, img.affine), desc="generate",            # (X, Y, Z) RAS
                         anatomy_xyz=None if classes is None else to_canonical(classes, img.affine))
    vol = from_canonical(canon, img.affine)                                          # input grid
    save_nifti(out_path, vol, img.affine, dtype=np.int16)
    stats = {"mask": str(mask_path), "out": str(out_path), "shape": list(vol.shape),
             "slices": int(vol.shape[2]), "structures": chosen, "slices_per_s": round(synth.throughput(), 1),
             "hu_min": int(vol.min()), "hu_max": int(vol.max()), "contrast_hu": synth.level,
             "anatomy": "given" if classes is not None else ("none (drawn from the heart alone)" if synth.anatomy
                                                              else "not used by this model"),
             "noise": "not in this model" if synth.noise is None else
             (f"seed {seed}" if synth.adds_noise else "none (the noise-free slice)"), **info}
    log.info("generate: %s -> %s, %d slices at %.1f slices/s, HU %d..%d", mask_path, out_path,
             stats["slices"], stats["slices_per_s"], stats["hu_min"], stats["hu_max"])
    return stats


def read_anatomy(path, anatomy_map, mask_img) -> np.ndarray:
    """``ctsynth generate --anatomy``: a label NIfTI on the mask's grid -> anatomy classes (uint8, the
    file's orientation); InputError naming the file and every problem."""
    from ctsynth.core.labels import ANATOMY_PRESETS, parse_anatomy_map
    from ctsynth.data.anatomy import from_labels

    path = Path(path)
    amap = parse_label_map_arg(anatomy_map, parse=parse_anatomy_map, where="--anatomy-map", presets=ANATOMY_PRESETS)
    img = load_nifti(path, role="anatomy")
    raw = np.asanyarray(img.dataobj)
    problems = []
    if raw.shape != mask_img.shape or not np.allclose(img.affine, mask_img.affine, atol=1e-3):
        problems.append(f"{path}: anatomy grid {raw.shape} differs from the mask's {mask_img.shape} (or its affine "
                        f"does); write the anatomy on the mask's grid")
    if "body" not in amap.values():
        problems.append(f"{path}: --anatomy-map names no body value; without the CT the body outline cannot be "
                        f"derived, so the file must label the body")
    if problems:
        raise InputError(problems)
    classes, problems = from_labels(raw, amap, None, 0.0, path)
    if problems:
        raise InputError(problems)
    return classes
