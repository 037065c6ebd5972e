"""Evolution snapshots: the generator's output on fixed validation masks at fractions of training,
rendered as PNG grids (mask | real | generated) for the report and MLflow. (Drawn here, not in
:mod:`ctsynth.report.figures`, so that editing a report figure never retrains: see figures.py.)

The snapshot folder holds only what the run writing it produced: each run replaces it whole when
it starts (a resumed run redraws its own earlier snapshots from the checkpoint), so a shorter
retrain never sits beside a longer run's later steps (see :meth:`Snapshots.start`)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ctsynth.core.io import atomic_dir, atomic_file
from ctsynth.core.labels import STRUCTURE_COLOURS
from ctsynth.data.contrast import measured_planes
from ctsynth.data.store import ProcessedStore, condition_batch, evenly_spaced, neighbour_rows

log = logging.getLogger(__name__)


def snapshot_rows(store: ProcessedStore, split: dict, count: int) -> np.ndarray:
    """``count`` validation slices (train if there is no validation case), evenly spaced over
    the slices whose structures cover at least the median area -- the same every run."""
    rows = store.rows_for_cases(split.get("val") or [])
    if len(rows) == 0:
        log.info("no validation cases: evolution snapshots use training slices")
        rows = store.rows_for_cases(split["train"])
    area = (np.asarray(store.masks[rows]).reshape(len(rows), -1) > 0).sum(1)
    if area.any():
        rows = rows[area >= np.median(area[area > 0])]
    return rows[evenly_spaced(len(rows), count)]


@torch.no_grad()
def snapshot_images(G, store: ProcessedStore, rows: np.ndarray, encoding: str,
                    device: torch.device, context: int = 0, *, contrast: np.ndarray | None = None,
                    anatomy: bool = False) -> torch.Tensor:
    """Generator output (eval mode, fp32) for ``rows`` as uint8 (K, S, S); ``contrast``: the rows'
    contrast-level planes (a model with the contrast control); ``anatomy``: a model conditioned on
    the rows' body / lung / bone classes."""
    was_training = G.training
    G.eval()
    masks = np.asarray(store.condition_masks[neighbour_rows(store, rows, context)])     # (K, 2k+1, pS, pS)
    classes = np.asarray(store.condition_anatomy[rows]) if anatomy else None
    cond = condition_batch(masks, store.structures, encoding, contrast, classes,
                           store.partial_volume).to(device)                              # (K, C', S, S)
    fake = G(cond).float()[:, 0]                                                        # (K, S, S)
    G.train(was_training)
    return ((fake.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def render_snapshot(path: Path, store: ProcessedStore, rows: np.ndarray, generated,
                    step: int, iterations: int) -> Path:
    """PNG grid, one column per slice; rows: mask colours | real | generated at ``step``
    (``generated``: uint8 (K, S, S), an array or a CPU tensor)."""
    from PIL import Image, ImageDraw

    masks = STRUCTURE_COLOURS[np.asarray(store.masks[rows])]                                     # (K, S, S, 3)
    real = ((np.asarray(store.images[rows], np.float32).clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    gray = lambda a: np.repeat(a[..., None], 3, axis=-1)                               # noqa: E731
    k, s = len(rows), store.image_size
    zoom, gap, head = max(1, 128 // s), 2, 14
    tiles = [masks, gray(real), gray(np.asarray(generated))]
    grid = np.full((head + 3 * (s * zoom + gap), k * (s * zoom + gap), 3), 255, np.uint8)
    for r, tile_row in enumerate(tiles):
        for c in range(k):
            tile = tile_row[c].repeat(zoom, 0).repeat(zoom, 1)
            y, x = head + r * (s * zoom + gap), c * (s * zoom + gap)
            grid[y:y + s * zoom, x:x + s * zoom] = tile
    img = Image.fromarray(grid)
    ImageDraw.Draw(img).text((2, 1), f"step {step} / {iterations}  (mask | real | generated)", fill=(0, 0, 0))
    with atomic_file(path) as tmp:
        img.save(tmp, format="PNG")
    return path


class Snapshots:
    """The evolution figure of one training: fixed validation masks at ``snapshot_at`` fractions
    of training (rank 0 only). ``taken`` (step -> uint8 images) travels in checkpoints, so a
    resumed run re-renders the earlier snapshots instead of losing them."""

    def __init__(self, store: ProcessedStore, split: dict, cfg, model_cfg, device: torch.device,
                 out_dir: Path, *, tracker, taken: dict | None = None, contrast_record: dict | None = None):
        self.store, self.device, self.out_dir = store, device, out_dir
        self.encoding, self.context = model_cfg.encoding, model_cfg.context_slices
        self.anatomy = bool(getattr(model_cfg, "anatomy", False))
        self.iterations, self.tracker = cfg.iterations, tracker
        self.steps = sorted({int(round(f * cfg.iterations)) for f in cfg.snapshot_at})
        self.rows = snapshot_rows(store, split, cfg.snapshot_count)
        self.contrast = measured_planes(store, self.rows, contrast_record)       # their own levels, if controlled
        self.taken = dict(taken or {})

    def _path(self, folder: Path, step: int) -> Path:
        return folder / f"step_{step:07d}.png"

    def take(self, G, step: int) -> None:
        if step not in self.steps or len(self.rows) == 0:
            return
        if step not in self.taken:
            self.taken[step] = snapshot_images(G, self.store, self.rows, self.encoding, self.device,
                                               self.context, contrast=self.contrast, anatomy=self.anatomy)
        png = render_snapshot(self._path(self.out_dir, step), self.store, self.rows,
                              self.taken[step], step, self.iterations)
        self.tracker.log_artifact(png, "snapshots")

    def start(self, G, step: int) -> None:
        """Replace the folder whole with this run's snapshots so far: those a resumed run took
        before (from its checkpoint) and the one at ``step`` itself (step 0 of a fresh run, or the
        step a run resumes at: ``G`` holds exactly its weights), then :meth:`take` adds the rest.

        Why replace at the start rather than stage and swap at the end: ``losses.csv`` beside it is
        rewritten from a run's first step too, so the two always describe the same run, also after
        an interruption; every file in the folder can be redrawn from the checkpoint, so a resume
        loses nothing; and :func:`atomic_dir` swaps it in one rename, so a kill leaves either the
        previous folder or this run's, never a mix. Snapshots at steps no longer in ``snapshot_at``
        or drawn for another ``snapshot_count`` (neither is in the fingerprint) are not redrawn."""
        self.taken = {s: v for s, v in self.taken.items() if len(v) == len(self.rows)}   # else other rows
        if step in self.steps and step not in self.taken and len(self.rows):
            self.taken[step] = snapshot_images(G, self.store, self.rows, self.encoding, self.device, self.context,
                                               contrast=self.contrast, anatomy=self.anatomy)
        drawn = [at for at in sorted(self.taken) if at in self.steps]
        with atomic_dir(self.out_dir) as tmp:
            for at in drawn:
                render_snapshot(self._path(tmp, at), self.store, self.rows, self.taken[at], at, self.iterations)
        for at in drawn:
            self.tracker.log_artifact(self._path(self.out_dir, at), "snapshots")
