"""Memorisation check: how close is each generated slice to its nearest TRAINING slice?

Distance (stated once, used everywhere)
---------------------------------------
``similarity(x, t) = SSIM(x, t)`` — piq SSIM at full resolution on the images mapped to
[0, 1] (``data_range = 1.0`` = the HU window), the same definition as the ``ssim`` quality
metric. The nearest training slice is the training slice of highest SSIM among the
``privacy.candidates`` closest ones by Euclidean (L2) distance between area-downsampled
``privacy.downsample``² copies.

Why: SSIM is bounded (1 = identical), compares local structure, mean and contrast, so a copy
with a little noise or a slight intensity shift still scores near 1 while a different patient
with similar anatomy does not; the threshold (``privacy.max_similarity``, SSIM) is therefore
interpretable and the same scale as the reported image quality. Exhaustive full-resolution SSIM
against every training slice would cost N_test × N_train SSIM maps; the low-resolution L2
pre-filter (cheap ``torch.cdist`` in chunks) keeps the search bounded and reliably keeps near
copies (a near copy is also near in L2) among the candidates that SSIM then re-ranks.

The same search run on the real test slices (patients never seen in training) is the
baseline: generated slices should be no closer to training data than new real patients are.

Memory: the low-resolution training bank is N_train × downsample² float32 (4 MB for 1000
slices at 32²); queries run in batches against chunks of the bank, and only running counts
and a fixed-bin histogram are accumulated.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import piq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ctsynth.core.errors import ConfigError, InputError, MetricUnavailable
from ctsynth.core.progress import quiet

log = logging.getLogger("ctsynth.evaluate.privacy")

HIST_BINS = np.linspace(0.0, 1.0, 51)     # SSIM histogram for the report (values < 0 → first bin)
DISTANCE = ("SSIM (piq, data_range 1.0 on the HU window mapped to [0,1]) to the most similar of the "
            "{k} nearest training slices by L2 at {d}x{d} (area-downsampled)")


def _lowres(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B,S,S) in [-1,1] → (B, size²) float32, area-downsampled (no-op size when S <= size)."""
    x = torch.as_tensor(x).float()[:, None]                          # (B, 1, S, S)
    if x.shape[-1] > size:
        x = F.adaptive_avg_pool2d(x, size)
    return x.flatten(1)


def pairwise_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of x[i] and y[i]; x, y (B,S,S) in [-1,1] → (B,)."""
    x01 = ((torch.as_tensor(x).float()[:, None] + 1) / 2).clamp(0, 1)
    y01 = ((torch.as_tensor(y).float()[:, None] + 1) / 2).clamp(0, 1)
    return piq.ssim(x01, y01, data_range=1.0, reduction="none")


class NearestTrainingSearch:
    """Nearest training slice (by the stated SSIM similarity) for batches of query slices.

    ``images`` is the store's (N, S, S) array (memory-mapped is fine); ``rows`` are the
    training rows it may return. ``query`` returns store rows, not positions in ``rows``.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, downsample: int = 32,
                 candidates: int = 5, chunk: int = 2048, batch: int = 256):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        if self.rows.size == 0:
            raise InputError("privacy: no training slices to compare against")
        if candidates < 1:
            raise ConfigError(f"privacy.candidates: must be >= 1, got {candidates}")
        self.size, self.k, self.chunk = downsample, min(candidates, self.rows.size), chunk
        banks = []
        for s in tqdm(range(0, self.rows.size, batch), desc="privacy bank", disable=quiet(), unit="batch"):
            part = np.asarray(images[self.rows[s:s + batch]], dtype=np.float32)      # (b, S, S)
            banks.append(_lowres(torch.from_numpy(part), self.size))
        self.bank = torch.cat(banks)                                                # (N_train, d²)
        self.distance = DISTANCE.format(k=self.k, d=min(self.size, images.shape[-1]))
        log.info("privacy: %d training slices indexed at %s² (%.1f MB)", self.rows.size,
                 min(self.size, images.shape[-1]), self.bank.numel() * 4 / 2**20)

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """Positions in ``rows`` of the k nearest training slices by low-res L2: (B, k) int64."""
        q = _lowres(x, self.size)                                                   # (B, d²)
        best_d = torch.full((len(q), 0), float("inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for s in range(0, len(self.bank), self.chunk):
            d = torch.cdist(q, self.bank[s:s + self.chunk])                         # (B, C)
            idx = torch.arange(s, s + d.shape[1]).expand(len(q), -1)
            d, idx = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
            best_d, pos = d.topk(min(self.k, d.shape[1]), dim=1, largest=False, sorted=True)
            best_i = idx.gather(1, pos)
        return best_i

    def query(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Query slices (B,S,S) in [-1,1] → (nearest training store rows (B,), SSIM (B,))."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
        cand = self.candidates(x)                                                   # (B, k)
        uniq, inv = np.unique(self.rows[cand.numpy()], return_inverse=True)
        train = torch.from_numpy(np.asarray(self.images[uniq], dtype=np.float32))   # (U, S, S)
        b, k = cand.shape
        train = train[torch.from_numpy(inv.reshape(-1))]                            # (B·k, S, S)
        sims = pairwise_ssim(x.repeat_interleave(k, 0), train).view(b, k)           # (B, k)
        best, pos = sims.max(1)
        rows = self.rows[cand.gather(1, pos[:, None])[:, 0].numpy()]
        return rows, best.numpy().astype(np.float64)


class PrivacyAccumulator:
    """Running counts/sums/max and a fixed-bin histogram per kind ("generated", "real")."""

    KINDS = ("generated", "real")

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.stats = {k: {"n": 0, "sum": 0.0, "max": -1.0, "above": 0} for k in self.KINDS}
        self.hist = {k: np.zeros(len(HIST_BINS) - 1, np.int64) for k in self.KINDS}

    def shareable(self, sims: np.ndarray) -> np.ndarray:
        """True where a generated slice may be shared (similarity <= threshold)."""
        return np.asarray(sims) <= self.threshold

    def update(self, kind: str, sims: np.ndarray) -> None:
        sims = np.asarray(sims, dtype=np.float64)
        s = self.stats[kind]
        s["n"] += sims.size
        s["sum"] += float(sims.sum())
        s["max"] = max(s["max"], float(sims.max(initial=-1.0)))
        s["above"] += int((~self.shareable(sims)).sum())
        self.hist[kind] += np.histogram(np.clip(sims, 0.0, 1.0), HIST_BINS)[0]

    def summary(self) -> dict[str, float]:
        """privacy_* keys of metrics.json."""
        if self.stats["generated"]["n"] == 0:
            raise MetricUnavailable("privacy: no generated slices were checked")
        out: dict[str, float] = {"privacy_threshold": self.threshold}
        for kind in self.KINDS:
            s = self.stats[kind]
            n = max(s["n"], 1)
            out[f"privacy_{kind}_similarity_mean"] = s["sum"] / n
            out[f"privacy_{kind}_similarity_max"] = s["max"]
            out[f"privacy_{kind}_share_above"] = s["above"] / n
        out["privacy_n_shareable"] = self.stats["generated"]["n"] - self.stats["generated"]["above"]
        return out

    def histogram(self) -> pd.DataFrame:
        """bin_lo, bin_hi, generated, real: counts of nearest-training SSIM (for the report plot)."""
        return pd.DataFrame({"bin_lo": HIST_BINS[:-1].round(4), "bin_hi": HIST_BINS[1:].round(4),
                             **{k: self.hist[k] for k in self.KINDS}})
