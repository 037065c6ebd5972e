"""Memorisation check: how close is each generated slice to its nearest TRAINING slice?

Similarity (stated once, used everywhere)
-----------------------------------------
``similarity(x, t)`` = **in-body SSIM**: the SSIM map of the two slices averaged over the union
of their body masks, at the store resolution (``preprocess.image_size``², 64² by default). The
map is the ``ssim`` quality metric's (piq's constants: 11 x 11 Gaussian window, σ 1.5, K1 0.01,
K2 0.03, images mapped to [0, 1], ``data_range`` 1.0 = the HU window), reflect-padded so that
every pixel has a value (piq keeps only the pixels whose whole window is inside the slice, and
average-pools slices of 384² and more first; neither is done here). The body is the
evaluation's one rule (:func:`ctsynth.evaluate.throughplane.body_mask`): HU above -500, the
slice's largest connected component, holes filled (lungs and airways inside), taken from each
slice itself (a generated query's body from the generated slice). Two slices with no body at
all are compared over every pixel.

Why in-body: air surrounds the body in every slice, is nearly the same from patient to patient
and is about half of a default slice (47 % on the default run); averaged over the whole slice it
lifts every pair towards 1 and squeezes copies and new patients together. What could identify a
patient is inside the body.
Why SSIM: bounded (1 = identical), compares local structure, mean and contrast, so a copy with a
little noise or a slight intensity shift still scores near 1 while a different patient with
similar anatomy does not; the threshold (``privacy.max_similarity``) is therefore interpretable,
on the scale of the reported image quality.

Search
------
**Exhaustive** — each query slice against EVERY training slice — while ``n_queries x N_train x S²``
(SSIM-map pixels in all; the stage's queries are the generated and the real test slices) is at
most ``privacy.exhaustive_budget`` and the training slices' stats fit in :data:`BANK_MAX`. The
training slices' [0, 1] images, local means, variances and bodies are computed once (13 bytes a
pixel: 24 MB for the default 478 slices at 64²); per pair only the cross term is filtered (two
small matrix products), on the bounding box of the bodies involved, all pairs of a query batch
and a chunk of training slices at once (at most ``pair_pixels`` map pixels a step). Measured on
the default run's store (2 x 160 queries x 478 training slices at 64² = 6.3e8 map pixels, Intel
Xeon @ 2.00 GHz, 2 cores): 10.2 s on one thread (16 ns a map pixel), 5.8 s on two when idle; under a load
of ~6 on the 2 cores a 32-slice batch took 2-5 s.

Above the budget, a **low-resolution pre-filter**: the ``privacy.candidates`` nearest training
slices by Euclidean (L2) distance between area-downsampled ``privacy.downsample``² copies
(``torch.cdist`` in chunks), re-ranked by the in-body SSIM. It can miss the true nearest: on the
default run's store at 32², its recall (share of queries whose exhaustive nearest is among the
candidates; generated / real test queries) was 91 % / 67 % with 5 candidates (the old default),
99 % / 91 % with 20 and 100 % / 98 % with 50 (the default).

The same search run on the real test slices (patients never seen in training) is the
baseline: generated slices should be no closer to training data than new real patients are.

Threshold (:func:`privacy_rule`)
--------------------------------
Calibrated on the data, not a constant: the same search run on the real slices of the
*validation* patients (never trained on, never reported on) gives how close unseen patients come
to the training set; a slice is withheld when it is closer to a training slice than the
``privacy.quantile`` of those (0.99: closer than 99 % of unseen real slices are).
``privacy.max_similarity`` stays as an optional hard cap: the threshold is the smaller of the two
(null turns either off; without validation patients only the cap is left). The evaluate stage
(generated test slices) and the ``privacy`` stage (every slice of ``data/synthetic``,
:mod:`ctsynth.privacy.privacy`) apply the same rule.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ctsynth.core.config import PreprocessCfg
from ctsynth.core.errors import ConfigError, InputError, MetricUnavailable
from ctsynth.core.progress import quiet
from ctsynth.evaluate.throughplane import BODY_HU, body_mask

log = logging.getLogger("ctsynth.evaluate.nearest")

HIST_BINS = np.linspace(0.0, 1.0, 51)     # SSIM histogram for the report (values < 0 → first bin)
GAUSS_SIZE, GAUSS_SIGMA = 11, 1.5         # piq's SSIM window (the ``ssim`` quality metric's)
K1, K2 = 0.01, 0.03                       # SSIM constants on data_range 1.0
DEFAULT_WINDOW = tuple(PreprocessCfg().hu_window)   # the store's HU window unless told otherwise
EXHAUSTIVE_BUDGET = 10_000_000_000       # query x training slices x pixels (params privacy.exhaustive_budget)
BANK_MAX = 1 << 25                        # training slices x pixels kept for the exhaustive search (13 B each)
PAIR_PIXELS = 1 << 21                     # SSIM-map pixels per step of the search (8 MB a tensor)
SIMILARITY = ("in-body SSIM (piq's window: 11-px Gaussian, sigma 1.5; data_range 1.0 on the HU window mapped to "
              "[0,1]; the map averaged over the union of both slices' bodies: HU > -500, largest connected "
              "component, holes filled) at {s}x{s}")
DISTANCE = {"exhaustive": SIMILARITY + ", against every training slice",
            "prefilter": SIMILARITY + ", to the most similar of the {k} nearest training slices by L2 at "
                                      "{d}x{d} (area-downsampled)"}


def _lowres(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B,S,S) in [-1,1] → (B, size²) float32, area-downsampled (no-op size when S <= size)."""
    x = torch.as_tensor(x).float()[:, None]                          # (B, 1, S, S)
    if x.shape[-1] > size:
        x = F.adaptive_avg_pool2d(x, size)
    return x.flatten(1)


@functools.lru_cache(maxsize=8)
def _blur_matrix(size: int) -> torch.Tensor:
    """(size, size) G with blur(X) = G @ X @ G.T: the 1-D Gaussian window with reflect padding folded
    in. Two small matrix products per map are ~20x faster on a CPU than a 1-channel conv2d."""
    g = torch.exp(-(torch.arange(GAUSS_SIZE, dtype=torch.float64) - GAUSS_SIZE // 2) ** 2 / (2 * GAUSS_SIGMA ** 2))
    pad = GAUSS_SIZE // 2
    basis = F.pad(torch.eye(size, dtype=torch.float64)[:, None], (pad, pad), mode="reflect")   # (S, 1, S + 2 pad)
    return F.conv1d(basis, (g / g.sum()).view(1, 1, -1))[:, 0].T.float().contiguous()        # [i, j]: input j → i


def _blur(t: torch.Tensor, box: tuple[slice, slice] | None = None) -> torch.Tensor:
    """Gaussian-window local mean of (..., S, S) (11 x 11, σ 1.5, reflect-padded): same shape, or
    only the pixels of ``box`` (row, column slices)."""
    g = _blur_matrix(t.shape[-1])
    rows, cols = box or (slice(None), slice(None))
    return torch.matmul(torch.matmul(g[rows], t), g[cols].T)


@dataclass
class SliceStats:
    """What the SSIM map needs of slices (..., S, S): images in [0, 1], Gaussian local mean and
    variance, body mask."""
    x: torch.Tensor
    mu: torch.Tensor
    var: torch.Tensor
    body: torch.Tensor

    def take(self, index) -> SliceStats:
        """Every field indexed by ``index`` (a slice, a tuple with None for a new axis, a tensor)."""
        return SliceStats(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: list[SliceStats]) -> SliceStats:
        return SliceStats(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(SliceStats)))


def slice_stats(images, hu_window=DEFAULT_WINDOW, body_hu: float = BODY_HU) -> SliceStats:
    """:class:`SliceStats` of slices (B, S, S) in [-1, 1] (numpy, memory-mapped or torch)."""
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    arr = np.asarray(arr, dtype=np.float32)
    x = ((torch.from_numpy(arr) + 1) / 2).clamp(0, 1)
    mu = _blur(x)
    return SliceStats(x, mu, _blur(x * x) - mu * mu, torch.from_numpy(body_mask(arr, hu_window, body_hu)))


def similarity(q: SliceStats, t: SliceStats) -> torch.Tensor:
    """In-body SSIM of the pairs of ``q`` and ``t``, broadcast over their leading dimensions:
    fields (..., S, S) → (...). Pairs without any body pixel: the mean over all pixels.

    Written for speed, as the pair-sized tensors dominate the cost: the map is computed only on
    the bounding box of all the bodies involved (the rest is outside every union), and as
    SSIM = A B / (C D) with A = 2 mu_x mu_y + c1, B = 2 cov + c2 = 2 E[xy] - (A - c1) + c2,
    C = mu_x² + mu_y² + c1, D = var_x + var_y + c2, in place."""
    c1, c2 = K1 ** 2, K2 ** 2
    bodiless = [bool((~b.flatten(-2).any(-1)).any()) for b in (q.body, t.body)]
    box = (slice(None), slice(None)) if all(bodiless) else _box(q.body, t.body)    # a pair may need every pixel
    mq, mt, vq, vt = (f[..., box[0], box[1]] for f in (q.mu, t.mu, q.var, t.var))
    a = torch.addcmul(torch.tensor(c1), mq, mt, value=2.0)                      # A
    ssim = _blur(q.x * t.x, box).mul_(2).sub_(a).add_(c1 + c2)                  # B
    ssim.mul_(a)
    del a
    den = torch.add(mq * mq + c1, mt * mt)                                      # C
    ssim.div_(den.mul_(torch.add(vq + c2, vt)))                                 # / (C D)
    del den
    w = q.body[..., box[0], box[1]] | t.body[..., box[0], box[1]]              # union of the bodies
    n = w.sum((-2, -1))
    inside = torch.where(w, ssim, 0.0).sum((-2, -1)) / n.clamp_min(1)
    return torch.where(n > 0, inside, ssim.mean((-2, -1))) if bool((n == 0).any()) else inside


def _box(*bodies: torch.Tensor) -> tuple[slice, slice]:
    """Row and column slices bounding every body pixel of ``bodies`` (..., S, S); all when none."""
    hit = torch.zeros(bodies[0].shape[-2:], dtype=torch.bool)
    for b in bodies:
        hit |= b.reshape(-1, *b.shape[-2:]).any(0)
    if not hit.any():
        return slice(None), slice(None)
    rows, cols = torch.nonzero(hit.any(1))[:, 0], torch.nonzero(hit.any(0))[:, 0]
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def body_ssim(x, y, hu_window=DEFAULT_WINDOW, body_hu: float = BODY_HU) -> torch.Tensor:
    """In-body SSIM of x[i] and y[i]; x, y (B, S, S) in [-1, 1] → (B,)."""
    return similarity(slice_stats(x, hu_window, body_hu), slice_stats(y, hu_window, body_hu))


class NearestTrainingSearch:
    """Nearest training slice (by the stated in-body SSIM) for batches of query slices.

    ``images`` is the store's (N, S, S) array (memory-mapped is fine); ``rows`` are the training
    rows it may return; ``hu_window`` the store's (``meta.json``: where -500 HU lies). ``query``
    returns store rows, not positions in ``rows``. Exhaustive while ``n_queries x len(rows) x S²
    <= budget`` and the training stats fit in :data:`BANK_MAX` pixels (436 MB), else the low-res
    pre-filter (module docstring). ``n_queries``: how many query slices the search will answer
    (the stage: generated + real test slices); None: as many as training slices (a test set is
    smaller).
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray, downsample: int = 32, candidates: int = 50,
                 chunk: int = 2048, batch: int = 256, *, hu_window=DEFAULT_WINDOW, budget: int = EXHAUSTIVE_BUDGET,
                 n_queries: int | None = None, pair_pixels: int = PAIR_PIXELS, body_hu: float = BODY_HU):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)
        if self.rows.size == 0:
            raise InputError("privacy: no training slices to compare against")
        if candidates < 1:
            raise ConfigError(f"privacy.candidates: must be >= 1, got {candidates}")
        s, n = int(images.shape[-1]), self.rows.size
        self.size, self.k, self.chunk, self.pair_pixels = downsample, min(candidates, n), chunk, pair_pixels
        self.hu_window, self.body_hu = tuple(float(v) for v in hu_window), float(body_hu)
        self.work = (n if n_queries is None else n_queries) * n * s * s              # SSIM-map pixels in all
        self.exhaustive = self.work <= budget and n * s * s <= BANK_MAX
        low, stats = [], []
        for i in tqdm(range(0, n, batch), desc="privacy bank", disable=quiet(), unit="batch"):
            part = np.asarray(images[self.rows[i:i + batch]], dtype=np.float32)      # (b, S, S)
            low.append(_lowres(torch.from_numpy(part), self.size))
            if self.exhaustive:
                stats.append(slice_stats(part, self.hu_window, self.body_hu))
        self.bank = torch.cat(low)                                                  # (N_train, d²)
        self.stats = SliceStats.cat(stats) if self.exhaustive else None             # (N_train, S, S) fields
        self.distance = DISTANCE["exhaustive" if self.exhaustive else "prefilter"].format(
            s=s, k=self.k, d=min(self.size, s))
        log.info("privacy: %d training slices at %d², %s (%.1f MB)", n, s,
                 "exhaustive search" if self.exhaustive else
                 f"low-res pre-filter: {self.work:.3g} SSIM-map pixels would exceed privacy.exhaustive_budget "
                 f"{budget:.3g} (or the bank {BANK_MAX} pixels); {self.k} candidates at {self.size}²",
                 (self.bank.numel() * 4 + (n * s * s * 13 if self.exhaustive else 0)) / 2**20)

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
        """Query slices (B,S,S) in [-1,1] → (nearest training store rows (B,), in-body SSIM (B,))."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
        q = slice_stats(x, self.hu_window, self.body_hu)
        pos, sims = self._exhaustive(q) if self.exhaustive else self._rerank(q, self.candidates(x))
        return self.rows[pos.numpy()], sims.numpy().astype(np.float64)

    def _exhaustive(self, q: SliceStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Best position in ``rows`` and its similarity of each query (B,), over every training slice."""
        b, n, pix = q.x.shape[0], self.rows.size, q.x.shape[-1] * q.x.shape[-2]
        per_step = max(1, self.pair_pixels // pix)                                  # pairs per step
        qb = min(b, per_step)
        tb = max(1, per_step // qb)
        best, pos = torch.full((b,), -float("inf")), torch.zeros(b, dtype=torch.long)
        for i in range(0, b, qb):
            qi = q.take((slice(i, i + qb), None))                                 # (qb, 1, S, S)
            for j in range(0, n, tb):
                sims = similarity(qi, self.stats.take((None, slice(j, j + tb))))  # (qb, t)
                val, arg = sims.max(1)
                better = val > best[i:i + qb]
                best[i:i + qb] = torch.where(better, val, best[i:i + qb])
                pos[i:i + qb] = torch.where(better, arg + j, pos[i:i + qb])
        return pos, best

    def _rerank(self, q: SliceStats, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The most similar of each query's candidates (B, k): position in ``rows`` and similarity (B,)."""
        uniq, inv = np.unique(self.rows[cand.numpy()], return_inverse=True)
        train = slice_stats(np.asarray(self.images[uniq], dtype=np.float32), self.hu_window, self.body_hu)
        which = torch.from_numpy(inv.reshape(cand.shape))                          # (B, k) into uniq
        b, k = cand.shape
        qb = max(1, self.pair_pixels // (k * q.x.shape[-1] * q.x.shape[-2]))
        sims = torch.cat([similarity(q.take((slice(i, i + qb), None)), train.take(which[i:i + qb]))
                          for i in range(0, b, qb)])                               # (B, k)
        best, at = sims.max(1)
        return cand.gather(1, at[:, None])[:, 0], best


@dataclass(frozen=True)
class PrivacyRule:
    """The withholding threshold and where it came from (:func:`privacy_rule`)."""
    threshold: float
    quantile: float | None            # privacy.quantile (None: not calibrated)
    calibrated: float | None          # that quantile of the reference similarities (None: no reference)
    cap: float | None                 # privacy.max_similarity (None: no cap)
    n_reference: int                  # validation slices the quantile was taken over
    reference_max: float | None

    def describe(self) -> str:
        parts = []
        if self.calibrated is not None:
            parts.append(f"the {self.quantile:g} quantile ({self.calibrated:.4f}) of the nearest-training similarity "
                         f"of {self.n_reference} real validation slices (max {self.reference_max:.4f})")
        if self.cap is not None:
            parts.append(f"the cap privacy.max_similarity {self.cap:g}")
        return (f"withheld above {self.threshold:.4f}: " + (" and ".join(parts) if len(parts) == 1 else
                                                             "the smaller of " + " and ".join(parts)))

    def summary(self, prefix: str = "privacy_") -> dict[str, float | None]:
        return {f"{prefix}threshold": self.threshold, f"{prefix}threshold_calibrated": self.calibrated,
                f"{prefix}reference_similarity_max": self.reference_max,
                f"{prefix}n_reference_slices": self.n_reference}


def privacy_rule(reference_sims, quantile: float | None, cap: float | None) -> PrivacyRule:
    """The threshold: the ``quantile`` of ``reference_sims`` (unseen real slices' nearest-training
    similarity), or ``cap``, whichever is smaller; ConfigError when neither is available."""
    ref = np.asarray(reference_sims, dtype=np.float64).ravel()
    calibrated = float(np.quantile(ref, quantile)) if quantile is not None and ref.size else None
    options = [v for v in (calibrated, cap) if v is not None]
    if not options:
        raise ConfigError("privacy: no threshold: privacy.quantile needs validation patients (the split has none) "
                          "and privacy.max_similarity is null; set one of them")
    return PrivacyRule(min(options), quantile if calibrated is not None else None, calibrated, cap, int(ref.size),
                       float(ref.max()) if ref.size else None)


def reference_similarities(search: NearestTrainingSearch, images, rows: np.ndarray, batch: int = 64) -> np.ndarray:
    """Nearest-training similarity of the store ``rows`` (the validation patients' real slices)."""
    out = [search.query(np.asarray(images[rows[i:i + batch]], dtype=np.float32))[1]
           for i in tqdm(range(0, rows.size, batch), desc="privacy reference", disable=quiet(), unit="batch")]
    return np.concatenate(out) if out else np.zeros(0)


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
