"""Evolution snapshots: the generator's output on fixed validation masks at fractions of training,
rendered as PNG grids (mask | real | generated) for the report and MLflow."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .data import ProcessedStore, condition_batch
from .io import atomic_file
from .labels import STRUCTURE_COLOURS

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
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int))]


@torch.no_grad()
def snapshot_images(G, store: ProcessedStore, rows: np.ndarray, encoding: str,
                    device: torch.device) -> torch.Tensor:
    """Generator output (eval mode, fp32) for ``rows`` as uint8 (K, S, S)."""
    was_training = G.training
    G.eval()
    cond = condition_batch(store.masks[rows], store.structures, encoding).to(device)   # (K, C, S, S)
    fake = G(cond).float()[:, 0]                                                        # (K, S, S)
    G.train(was_training)
    return ((fake.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def render_snapshot(path: Path, store: ProcessedStore, rows: np.ndarray, generated: torch.Tensor,
                    step: int, iterations: int) -> Path:
    """PNG grid, one column per slice; rows: mask colours | real | generated at ``step``."""
    from PIL import Image, ImageDraw

    masks = STRUCTURE_COLOURS[np.asarray(store.masks[rows])]                                     # (K, S, S, 3)
    real = ((np.asarray(store.images[rows], np.float32).clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)
    gray = lambda a: np.repeat(a[..., None], 3, axis=-1)                               # noqa: E731
    k, s = len(rows), store.image_size
    zoom, gap, head = max(1, 128 // s), 2, 14
    tiles = [masks, gray(real), gray(generated.numpy())]
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
