"""Image-quality, distribution and segmentation metrics, streaming where they are paired.

Conventions
-----------
* Images are model-space tensors in [-1, 1] (the HU window mapped linearly, see
  :func:`ctsynth.data.preprocess.unit_to_hu`). **MSE** is computed in that [-1, 1] space.
* **PSNR and SSIM** use piq on images mapped to [0, 1] (``(x + 1) / 2``), i.e.
  ``data_range = 1.0`` = the full HU window (e.g. 2000 HU for [-1000, 1000]). piq's PSNR adds
  ε = 1e-8 to the MSE, so identical images give 80 dB, not infinity.
* **MAE in HU** converts both images with ``unit_to_hu`` (the one inverse mapping).
* **Per-structure MAE**: mean |generated − real| in HU over the pixels of each structure's
  mask (structure index 1..7) and of the background (index 0), pooled over all slices.
* **Fréchet distance** on precomputed features, computed exactly in float64:
  ``|μ_a − μ_b|² + tr Σ_a + tr Σ_b − 2 tr (Σ_a Σ_b)^½`` with ``tr (Σ_a Σ_b)^½`` taken as the
  nuclear norm of ``A_a A_bᵀ`` (``Σ = AᵀA``, A the centred features / √(N−1)), reduced by QR to
  min(N, D)² — the same value as pytorch-fid's ``scipy.linalg.sqrtm`` (the standard FID), without
  its square root. piq's Newton–Schulz square root was used before; with fewer slices than
  feature dimensions it is far off (measured: 5.06 instead of 3.03 on 160 × 192-d sets, 2.15 for
  two identical sets), so it is no longer used. FD grows as N shrinks: compare values at equal N.
  Frequency weights (:func:`frechet_distance_weighted`) give the bootstrap the same estimator.
* **KID** via piq's ``KID().compute_metric`` averaged over random subsets. For paired sets
  (generated slice i made from the mask of real slice i) the subsets are drawn from *disjoint*
  slice indices (near-duplicate pairs on the K_XY diagonal would bias the unbiased MMD²
  estimate negative); unpaired sets (real validation vs real test) are subsampled
  independently. Seeded, so repeatable.
* **Dice** is pooled over the whole set: 2·Σ|P∩T| / (Σ|P| + Σ|T|) per structure; NaN (not
  scored) when the structure is absent from the reference (Σ|T| = 0), whatever the prediction
  holds: a structure that is not there cannot be found or missed. Scoring "absent from both" as
  1 put 1s into every mean (real CT whose test patients hold only the aorta scored LV and PA
  Dice 1), and scoring stray predicted pixels as 0 put 0s in. Means over structures
  (:func:`dice_mean`) skip the absent ones.

Streaming: :class:`PairedAccumulator` and :class:`DiceAccumulator` hold running sums per case
and per structure only, so their memory does not grow with the number of slices.
:class:`FeatureBank` stores the features themselves (N × D float32: 60 kB for 100 slices of
the 192-d segmenter features at width 16, 8 MB for 1000 Inception slices) because piq's
estimators need the samples.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ctsynth.core.errors import MetricUnavailable
from ctsynth.core.labels import N_CLASSES, STRUCTURES, WH, structure_index
from ctsynth.data.preprocess import unit_to_hu

log = logging.getLogger("ctsynth.evaluate.metrics")

DATA_RANGE = 1.0            # PSNR/SSIM data range: images mapped from [-1, 1] to [0, 1]
BACKGROUND = "background"

def reported_structures(structures: Sequence[str]) -> dict[int, str]:
    """{structure index: name} kept in the store for a selection (all seven when WH is selected)."""
    names = STRUCTURES if WH in structures else [s for s in STRUCTURES if s in structures]
    return {structure_index(s): s for s in names}


def _bchw(x: torch.Tensor) -> torch.Tensor:
    """(B,S,S) or (B,1,S,S) → float32 (B,1,S,S)."""
    x = torch.as_tensor(x).float()
    return x[:, None] if x.ndim == 3 else x


def to_unit_interval(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped (the range piq's PSNR/SSIM expect with data_range 1.0)."""
    return ((_bchw(x) + 1) / 2).clamp(0, 1)


def per_slice_metrics(fake: torch.Tensor, real: torch.Tensor, window) -> dict[str, torch.Tensor]:
    """Paired metrics per slice. fake, real (B,S,S) in [-1,1] → {mse, psnr, ssim, mae_hu}: (B,)."""
    import piq  # here, not at the top: piq imports torchvision (seconds), which the utility stage never needs

    f01, r01 = to_unit_interval(fake), to_unit_interval(real)           # (B, 1, S, S)
    f, r = 2 * f01 - 1, 2 * r01 - 1
    return {
        "mse": ((f - r) ** 2).mean((1, 2, 3)),
        "psnr": piq.psnr(f01, r01, data_range=DATA_RANGE, reduction="none"),
        "ssim": piq.ssim(f01, r01, data_range=DATA_RANGE, reduction="none"),
        "mae_hu": (unit_to_hu(f, window) - unit_to_hu(r, window)).abs().mean((1, 2, 3)),
    }


def _label_sums(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` (B,S,S) per slice and label (B,S,S ints 0..7) → (B, 8) float64."""
    b = values.shape[0]
    keys = (torch.arange(b)[:, None] * N_CLASSES + labels.reshape(b, -1).long()).reshape(-1)
    return torch.bincount(keys, weights=values.reshape(-1).double(), minlength=b * N_CLASSES).view(b, N_CLASSES)


class PairedAccumulator:
    """Running sums of paired metrics per case and per (case, label); memory O(cases × 8).

    ``update`` returns the per-slice values as a DataFrame so a caller can stream them to disk.
    """

    SLICE_KEYS = ("mse", "psnr", "ssim", "mae_hu")
    PIXEL_KEYS = ("n_pixels", "abs_err_hu", "err_hu", "real_hu", "fake_hu")

    def __init__(self, window, structures: Sequence[str]):
        self.window = [float(v) for v in window]
        self.labels = {0: BACKGROUND, **reported_structures(structures)}   # label index → name
        self.slice_sums: dict[str, np.ndarray] = {}   # case → [n, Σmse, Σpsnr, Σssim, Σmae]
        self.pixel_sums: dict[str, np.ndarray] = {}   # case → (5, 8): PIXEL_KEYS × label
        self._slices: list[tuple] = []                # per batch: (cases, (B, 4) values, (B, 2, 8) n/|err|)

    def update(self, fake, real, masks, cases: Sequence[str], zs: Sequence[int]) -> pd.DataFrame:
        """fake, real (B,S,S) in [-1,1]; masks (B,S,S) structure indices; one case/z per slice."""
        fake, real = _bchw(fake)[:, 0].clamp(-1, 1), _bchw(real)[:, 0].clamp(-1, 1)  # (B, S, S)
        masks = torch.as_tensor(np.asarray(masks)).long()
        per = per_slice_metrics(fake, real, self.window)
        fake_hu, real_hu = unit_to_hu(fake.double(), self.window), unit_to_hu(real.double(), self.window)
        err = fake_hu - real_hu
        pix = torch.stack([_label_sums(torch.ones_like(err), masks), _label_sums(err.abs(), masks),
                           _label_sums(err, masks), _label_sums(real_hu, masks),
                           _label_sums(fake_hu, masks)], 1).numpy()            # (B, 5, 8)
        vals = torch.stack([per[k].double() for k in self.SLICE_KEYS], 1).numpy()  # (B, 4)
        for i, case in enumerate(cases):
            s = self.slice_sums.setdefault(case, np.zeros(1 + len(self.SLICE_KEYS)))
            s[0] += 1
            s[1:] += vals[i]
            p = self.pixel_sums.setdefault(case, np.zeros((len(self.PIXEL_KEYS), N_CLASSES)))
            p += pix[i]
        self._slices.append((list(cases), vals, pix[:, :2].copy()))
        frame = pd.DataFrame({"case": list(cases), "z": [int(z) for z in zs]})
        for j, k in enumerate(self.SLICE_KEYS):
            frame[k] = vals[:, j]
        return frame

    @property
    def n_slices(self) -> int:
        return int(sum(s[0] for s in self.slice_sums.values()))

    def per_slice(self) -> dict[str, np.ndarray]:
        """Per-slice statistics in update order (for the bootstrap): case (N,), values (N, 4) in
        SLICE_KEYS order, n_pixels and abs_err_hu (N, 8) per label; memory O(N × 20)."""
        if not self._slices:
            raise MetricUnavailable("no slices were evaluated")
        pix = np.concatenate([p for _, _, p in self._slices])
        return {"case": np.array([c for cases, _, _ in self._slices for c in cases]),
                "values": np.concatenate([v for _, v, _ in self._slices]),
                "n_pixels": pix[:, 0], "abs_err_hu": pix[:, 1]}

    def _pixel_metrics(self, p: np.ndarray) -> dict[str, float]:
        out = {"mae_hu": float(p[1].sum() / max(p[0].sum(), 1))}
        for idx, name in self.labels.items():
            out[f"mae_hu_{name}"] = float(p[1, idx] / p[0, idx]) if p[0, idx] > 0 else float("nan")
        return out

    def summary(self) -> dict[str, float]:
        """{mse, psnr, ssim: mean over slices; mae_hu, mae_hu_<label>: pooled over pixels}."""
        if not self.slice_sums:
            raise MetricUnavailable("no slices were evaluated")
        s = sum(self.slice_sums.values())
        out = {k: float(s[1 + j] / s[0]) for j, k in enumerate(self.SLICE_KEYS)}
        out.update(self._pixel_metrics(sum(self.pixel_sums.values())))
        return out

    def per_case(self) -> pd.DataFrame:
        """One row per case: n_slices, mse, psnr, ssim (slice means), mae_hu and per-label MAE."""
        rows = []
        for case in sorted(self.slice_sums):
            s = self.slice_sums[case]
            row = {"case": case, "n_slices": int(s[0])}
            row.update({k: s[1 + j] / s[0] for j, k in enumerate(self.SLICE_KEYS)})
            row.update(self._pixel_metrics(self.pixel_sums[case]))
            rows.append(row)
        return pd.DataFrame(rows)

    def per_structure(self) -> pd.DataFrame:
        """One row per label: n_pixels, mae_hu, bias_hu (mean generated − real), mean HU of each."""
        p = sum(self.pixel_sums.values())
        rows = []
        for idx, name in self.labels.items():
            n = p[0, idx]
            safe = n if n > 0 else np.nan
            rows.append({"structure": name, "label": idx, "n_pixels": int(n), "mae_hu": p[1, idx] / safe,
                         "bias_hu": p[2, idx] / safe, "real_hu_mean": p[3, idx] / safe,
                         "generated_hu_mean": p[4, idx] / safe})
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ Dice

DICE_ABSENT = "absent from the ground truth of every scored slice (Σ|T| = 0): Dice cannot be scored"
DICE_NONE_PRESENT = "no selected structure is present in the ground truth of the scored slices"


def _dice(inter: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2·inter / (pred + target), NaN where the target is empty (see the module docstring)."""
    return np.where(target > 0, 2 * inter / np.maximum(pred + target, 1), np.nan)


def dice_mean(scores):
    """Mean Dice over the structures present (finite scores), along the last axis: a {name: Dice}
    dict or (S,) array → float, (B, S) replicates → (B,); NaN where none is present (without
    numpy's empty-slice warning)."""
    values = np.asarray(list(scores.values()) if isinstance(scores, dict) else scores, dtype=np.float64)
    present = np.isfinite(values)
    n = present.sum(-1)
    mean = np.where(n > 0, np.where(present, values, 0).sum(-1) / np.maximum(n, 1), np.nan)
    return float(mean) if mean.ndim == 0 else mean


def dice_scores(pred, target, labels: Iterable[int]) -> dict[int, float]:
    """All-at-once pooled Dice per label (NaN where ``target`` lacks it). pred, target: (..., H, W)
    integer label maps."""
    pred, target = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(target)).long()
    out = {}
    for k in labels:
        p, t = pred == k, target == k
        out[k] = float(_dice(np.array((p & t).sum().item()), np.array(p.sum().item()),
                             np.array(t.sum().item())))
    return out


class DiceAccumulator:
    """Pooled Dice per label (overall and per case) from running pixel counts; memory O(cases × 8)."""

    NONE_PRESENT = DICE_NONE_PRESENT     # why :meth:`mean` is null

    def __init__(self, labels: dict[int, str]):
        self.labels = dict(labels)
        self.counts: dict[str, np.ndarray] = {}    # case → (3, 8): Σ|P∩T|, Σ|P|, Σ|T| per label
        self._slices: list[np.ndarray] = []          # per batch (B, 3, 8), for the bootstrap

    def update(self, pred, target, cases: Sequence[str]) -> None:
        """pred, target (B,H,W) label maps; one case name per slice."""
        pred, target = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(target)).long()
        ones = torch.ones(pred.shape, dtype=torch.float64)
        inter = _label_sums(torch.where(pred == target, ones, 0 * ones), target)   # (B, 8)
        c = torch.stack([inter, _label_sums(ones, pred), _label_sums(ones, target)], 1).numpy()
        self._slices.append(c)
        for i, case in enumerate(cases):
            self.counts.setdefault(case, np.zeros((3, N_CLASSES)))
            self.counts[case] += c[i]

    def _scores(self, c: np.ndarray) -> dict[str, float]:
        d = _dice(c[0], c[1], c[2])
        return {name: float(d[idx]) for idx, name in self.labels.items()}

    def summary(self) -> dict[str, float]:
        """{structure name: pooled Dice over all slices}; NaN for a structure absent from every
        slice's ground truth."""
        if not self.counts:
            raise MetricUnavailable("no slices were segmented")
        return self._scores(sum(self.counts.values()))

    def mean(self) -> float:
        """Mean of :meth:`summary` over the structures present (NaN when none is)."""
        return dice_mean(self.summary())

    def absent(self) -> dict[str, str]:
        """{structure name: why its Dice is null} for the structures absent from every slice's
        ground truth (their :meth:`summary` value is NaN)."""
        target = sum(self.counts.values())[2] if self.counts else np.zeros(N_CLASSES)
        return {name: f"{name} {DICE_ABSENT}" for idx, name in self.labels.items() if target[idx] == 0}

    def per_case(self) -> dict[str, dict[str, float]]:
        """{case: {structure name: pooled Dice over that case's slices}}; NaN where the case's
        ground truth lacks the structure (a blank cell in per_case.csv)."""
        return {case: self._scores(self.counts[case]) for case in sorted(self.counts)}

    def per_slice(self) -> np.ndarray:
        """(N, 3, 8) counts |P∩T|, |P|, |T| per slice and label, in update order."""
        if not self._slices:
            raise MetricUnavailable("no slices were segmented")
        return np.concatenate(self._slices)


# ------------------------------------------------------------------------------ feature distances

class FeatureBank:
    """Collects (B, D) feature batches; stores N × D float32 (piq's estimators need the samples)."""

    def __init__(self):
        self._chunks: list[torch.Tensor] = []

    def add(self, feats: torch.Tensor) -> None:
        self._chunks.append(torch.as_tensor(feats).detach().float().cpu())

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    def tensor(self) -> torch.Tensor:
        """(N, D) float32."""
        if not self._chunks:
            return torch.zeros(0, 0)
        return torch.cat(self._chunks)


def _centred(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean (D,), A (N, D) with AᵀA = the frequency-weighted covariance, total weight)."""
    x = torch.as_tensor(x).double()
    w = torch.ones(len(x), dtype=torch.float64) if w is None else torch.as_tensor(w).double()
    n = float(w.sum())
    mu = (w[:, None] * x).sum(0) / n
    return mu, (x - mu) * (w / (n - 1)).sqrt()[:, None], n


def frechet_distance_weighted(a: torch.Tensor, b: torch.Tensor, wa=None, wb=None) -> float:
    """Exact Fréchet distance between feature sets a (N_a, D) and b (N_b, D) with frequency weights.

    Integer weights w give the FD of the set holding row i w_i times (a bootstrap resample);
    ``None`` = every row once. Float64; tr (Σ_a Σ_b)^½ = ‖A_a A_bᵀ‖_* (see module docstring).
    """
    mu_a, A_a, n_a = _centred(a, wa)
    mu_b, A_b, n_b = _centred(b, wb)
    if min(n_a, n_b) < 2:
        raise MetricUnavailable(f"Fréchet distance needs >= 2 samples per set, got {n_a:g} and {n_b:g}")
    R_a, R_b = torch.linalg.qr(A_a, mode="r").R, torch.linalg.qr(A_b, mode="r").R   # (min(N,D), D)
    tr_sqrt = float(torch.linalg.svdvals(R_a @ R_b.T).sum())
    traces = float((A_a * A_a).sum() + (A_b * A_b).sum())
    value = float((mu_a - mu_b).square().sum()) + traces - 2 * tr_sqrt
    return max(value, 0.0) if value > -1e-9 * max(traces, 1.0) else value


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between feature sets a (N_a, D) and b (N_b, D), exact, float64."""
    if min(len(a), len(b)) < 2:
        raise MetricUnavailable(f"Fréchet distance needs >= 2 samples per set, got {len(a)} and {len(b)}")
    return frechet_distance_weighted(a, b)


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subset_size: int = 50, n_subsets: int = 50,
                    seed: int = 0, paired: bool = True) -> float:
    """KID (piq, cubic polynomial kernel, unbiased MMD²) averaged over ``n_subsets`` subsets.

    Paired sets (row i of a and b belong together, e.g. a real slice and the slice generated
    from its mask): each repeat draws one permutation p of the slice indices and compares
    a[p[:m]] with b[p[m:2m]], m = min(subset_size, N // 2), so the subsets never hold the same
    slice and the pairs are compared like independent samples. Unpaired sets: independent
    subsets of m = min(subset_size, N_a, N_b) rows each. Seeded; no global RNG.
    """
    if paired and len(a) != len(b):
        raise ValueError(f"paired KID needs sets of equal size, got {len(a)} and {len(b)}")
    n = min(len(a), len(b))
    m = min(subset_size, n // 2 if paired else n)
    if m < 2:
        raise MetricUnavailable(f"KID needs >= 4 samples per set, got {len(a)} and {len(b)}")
    import piq

    gen = torch.Generator().manual_seed(seed)
    kid = piq.KID()
    values = []
    # piq shuffles each subset with the global RNG (order only, but it changes float sums):
    # a forked, seeded global RNG makes the result bit-for-bit repeatable and leaves it untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(n_subsets):
            if paired:
                p = torch.randperm(n, generator=gen)
                x, y = a[p[:m]], b[p[m:2 * m]]
            else:
                x = a[torch.randperm(len(a), generator=gen)[:m]]
                y = b[torch.randperm(len(b), generator=gen)[:m]]
            values.append(float(kid.compute_metric(x.double(), y.double())))
    return float(np.mean(values))
