"""Realism: what the paired metrics and the segmenter's features do not see.

SSIM and MAE reward the conditional mean, which is smooth; the segmenter's features were trained
to find structures, not texture. The checks here look where those do not, each on the same test
patients for generated and real slices, each with a patient-level interval and a reference, and
each with a known answer in ``tests/test_realism.py``. (Flicker along z needs volumes: it is
``flicker_ratio`` in :mod:`ctsynth.evaluate.throughplane`.)

* **Classifier two-sample test** (:func:`c2st`, ``c2st_auc``): a small CNN (:class:`C2STNet`,
  fixed architecture; steps, batch, learning rate and width in ``params.realism``, seed the
  top-level ``seed``) learns real vs generated slices of the *validation* patients and scores the
  *test* patients' slices; ROC AUC (0.5 = it cannot tell them apart, 1 = always right). The
  generator saw neither set, and the classifier never sees a test patient. The interval leaves
  one test patient out at a time (both their real and generated slices), the classifier fixed:
  it covers the test patients, not the classifier's training. ``c2st_p``: the one-sided p-value of
  the AUC under the null that, within each test patient, real and generated slices are
  exchangeable (:func:`permutation_p`: every patient's labels swapped or not, all 2^G patterns
  enumerated up to :data:`EXACT_PATIENTS` patients, so the smallest possible p is 2^-G: 0.0625 with
  4 patients, 0.001 with 10). Positive control ``c2st_auc_blur`` / ``c2st_p_blur``: the same
  classifiers trained on the validation patients' real slices against the same slices blurred by
  ``realism.control_blur_px`` (Gaussian σ), scored on the test patients' likewise: a test that
  misses this control (p ≥ 0.01) has no power to call generated slices real.
  ``val_c2st_auc`` (validation.json, for choosing): two folds over the validation patients, each
  fold's classifier trained on one half and scored on the other, the AUCs averaged.
  Every AUC is the mean over ``realism.c2st_repeats`` classifiers, trained with seeds ``seed``,
  ``seed + 1``, ...: on the same slices one classifier's seed alone moved the AUC by up to 0.18,
  as much as the generator options it is to choose between (docs/experiments/generator-realism.md);
  the intervals leave a patient out of every classifier's AUC and average them.
* **Texture** (:class:`TextureAccumulator`): the high-pass residual r = x − G_σ * x (Gaussian,
  σ = :data:`TEXTURE_SIGMA` px) inside homogeneous regions of the *real* slice, the same pixels
  for the generated one: each structure's mask, the lung (body below -400 HU) and other soft
  tissue (body within [-150, 250] HU), each outside every structure, eroded by
  :data:`ERODE` px so the blur does not straddle an edge. ``texture_std_ratio`` = sqrt(Σ r_gen² /
  Σ r_real²) over all regions (and per region); ``texture_nps_ratio_band<k>``: the noise power
  spectrum, |FFT(r · region)|² / n_region (white noise of σ gives σ² at every frequency) summed over
  :data:`N_BANDS` radial bands of (0, 0.5] cycles/px, generated / real.
* **Contrast** (:func:`contrast_metrics`): per test patient the mean HU of each structure,
  generated vs real: the bias (mean over patients of generated − real) and the between-patient
  spread (sd over patients of the generated means ÷ that of the real means). A deterministic
  mask → CT map draws every patient at the training average: spread → 0.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from scipy import stats
from torch import nn

from ctsynth.core.errors import MetricUnavailable
from ctsynth.data.preprocess import hu_to_unit
from ctsynth.evaluate.bootstrap import case_table_intervals, jackknife_interval
from ctsynth.evaluate.results import Interval

log = logging.getLogger("ctsynth.evaluate.realism")

TEXTURE_SIGMA = 1.0         # px: Gaussian of the high-pass residual r = x - blur(x)
ERODE = 1                   # px: regions shrunk so the blur's reach stays inside them
N_BANDS = 4                 # radial frequency bands of (0, 0.5] cycles/px
LUNG_HU = -400.0            # lung: body pixels below this
SOFT_HU = (-150.0, 250.0)   # other soft tissue: body pixels within this range
CONTEXT_REGIONS = ("lung", "soft_tissue")
NON_NEGATIVE = ("texture_std_ratio", "texture_nps", "texture_residual", "contrast_spread", "contrast_bias_hu_max_abs")


# ------------------------------------------------------------------------------ texture

def highpass(x: torch.Tensor, sigma: float = TEXTURE_SIGMA) -> torch.Tensor:
    """x − Gaussian blur of x, per slice: (B, H, W) → (B, H, W) (reflect border)."""
    k = 2 * int(np.ceil(3 * sigma)) + 1
    x4 = x[:, None]
    return (x4 - gaussian_blur2d(x4, (k, k), (sigma, sigma), border_type="reflect"))[:, 0]


def erode(mask: torch.Tensor, px: int = ERODE) -> torch.Tensor:
    """Binary erosion of (B, H, W) bool masks by ``px`` pixels (3 × 3 square, outside = False)."""
    if px <= 0:
        return mask
    inside = mask[:, None].float()
    for _ in range(px):
        inside = -F.max_pool2d(F.pad(-inside, (1, 1, 1, 1), value=-0.0), 3, stride=1)
    return inside[:, 0] > 0.5


def band_index(size: int, n_bands: int = N_BANDS) -> torch.Tensor:
    """(size, size) int: the radial band (0 .. n_bands − 1) of each FFT frequency; −1 for DC and
    for frequencies above 0.5 cycles/px (the corners)."""
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    band = torch.ceil(radius * 2 * n_bands).long() - 1          # (0, 1/(2n)] -> 0, ...
    band[(radius == 0) | (radius > 0.5)] = -1
    return band


def band_power(x: torch.Tensor, region: torch.Tensor, n_bands: int = N_BANDS) -> torch.Tensor:
    """Σ over slices of |FFT(x · region)|² per radial band, divided by each slice's region size:
    (B, H, W) values, (B, H, W) bool → (n_bands,) float64. Divided by the number of frequencies
    in each band (:func:`band_counts`) this is the noise power spectrum: σ² for white noise of σ."""
    w = (x.double() * region).reshape(-1, *x.shape[-2:])
    power = torch.fft.fft2(w).abs().square()                                    # (B, H, W)
    n = region.reshape(len(w), -1).sum(1).double().clamp(min=1)[:, None, None]
    per = (power / n).sum(0)                                                     # (H, W)
    band = band_index(x.shape[-1], n_bands)
    return torch.stack([per[band == k].sum() for k in range(n_bands)])


def band_counts(size: int, n_bands: int = N_BANDS) -> np.ndarray:
    band = band_index(size, n_bands)
    return np.array([int((band == k).sum()) for k in range(n_bands)], np.float64)


def texture_regions(real: torch.Tensor, masks: torch.Tensor, labels: dict[int, str], window,
                    body: np.ndarray, hu_bands: bool = True) -> dict[str, torch.Tensor]:
    """{region: (B, S, S) bool}: each structure's mask, the lung and other soft tissue (from the
    real slice's HU, inside ``body``, outside every structure), all eroded by :data:`ERODE`.
    ``hu_bands`` False (MR: no HU): the structures only."""
    body_t = torch.as_tensor(body, dtype=torch.bool)
    free = body_t & (masks == 0)
    out = {name: masks == idx for idx, name in labels.items()}
    if not hu_bands:
        return {k: erode(v) for k, v in out.items()}
    out["lung"] = free & (real < float(hu_to_unit(LUNG_HU, window)))
    lo, hi = (float(hu_to_unit(v, window)) for v in SOFT_HU)
    out["soft_tissue"] = free & (real >= lo) & (real <= hi)
    return {k: erode(v) for k, v in out.items()}


class TextureAccumulator:
    """Per-case sums of the high-pass residual of generated and real slices inside the texture
    regions: n, Σ r², and the band powers (pooled over regions); memory O(cases × regions)."""

    def __init__(self, window, labels: dict[int, str], hu_bands: bool = True):
        self.window = [float(v) for v in window]
        self.labels, self.hu_bands = dict(labels), hu_bands
        self.regions = [*labels.values(), *(CONTEXT_REGIONS if hu_bands else ())]
        self.sums: dict[str, dict[str, float]] = {}
        self.size = 0

    def update(self, fake: torch.Tensor, real: torch.Tensor, masks: torch.Tensor, cases, body: np.ndarray) -> None:
        """fake, real (B, S, S) in [-1, 1]; masks (B, S, S) structure indices; ``body``: (B, S, S)
        bool body of the real slices (:func:`ctsynth.evaluate.throughplane.body_mask`)."""
        scale = 0.5 * (self.window[1] - self.window[0])                            # [-1, 1] → HU
        res = {"real": highpass(real.double()) * scale, "fake": highpass(fake.double()) * scale}
        regions = texture_regions(real, masks, self.labels, self.window, body, self.hu_bands)
        self.size = real.shape[-1]
        cases = np.asarray(cases)
        for case in dict.fromkeys(cases.tolist()):
            sel = torch.from_numpy(cases == case)
            row = self.sums.setdefault(case, {})
            for name, region in regions.items():
                m = region[sel]
                row[f"n_{name}"] = row.get(f"n_{name}", 0.0) + float(m.sum())
                for kind, r in res.items():
                    key = f"{kind}_{name}"
                    row[key] = row.get(key, 0.0) + float(r[sel][m].square().sum())
                    bands = band_power(r[sel], m).numpy()
                    for k in range(N_BANDS):
                        row[f"band{k + 1}_{kind}"] = row.get(f"band{k + 1}_{kind}", 0.0) + float(bands[k])

    def table(self) -> pd.DataFrame:
        """One row per case (``case`` + the sums), zeros where a region was absent."""
        return pd.DataFrame([{"case": c, **s} for c, s in self.sums.items()]).fillna(0.0)

    def metrics(self, table: pd.DataFrame | None = None) -> dict[str, float]:
        """texture_* keys from the per-case sums (all cases, or the rows of ``table``)."""
        return texture_metrics(self.table() if table is None else table, self.regions, self.size)


def _sqrt_ratio(num: float, den: float) -> float:
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def texture_metrics(table: pd.DataFrame, regions, size: int) -> dict[str, float]:
    tot = table.sum(numeric_only=True)
    g = lambda k: float(tot.get(k, 0.0))                                             # noqa: E731
    num = sum(g(f"fake_{r}") for r in regions)
    den = sum(g(f"real_{r}") for r in regions)
    n = sum(g(f"n_{r}") for r in regions)
    out = {"texture_std_ratio": _sqrt_ratio(num, den),
           "texture_residual_std_real_hu": float(np.sqrt(den / n)) if n > 0 else float("nan")}
    for r in regions:
        out[f"texture_std_ratio_{r}"] = _sqrt_ratio(g(f"fake_{r}"), g(f"real_{r}")) if g(f"n_{r}") > 0 \
            else float("nan")
    for k in range(1, N_BANDS + 1):
        real = g(f"band{k}_real")
        out[f"texture_nps_ratio_band{k}"] = g(f"band{k}_fake") / real if real > 0 else float("nan")
    return out


# ------------------------------------------------------------------------------ contrast

def contrast_table(pixel_sums: dict[str, np.ndarray], labels: dict[int, str]) -> pd.DataFrame:
    """Per case the mean HU of each structure, real and generated, from the paired accumulator's
    per-case pixel sums (rows n, |err|, err, real HU, generated HU; columns labels): one row per
    case, NaN where the structure is absent."""
    rows = []
    for case, p in pixel_sums.items():
        row = {"case": case}
        for idx, name in labels.items():
            n = p[0, idx]
            row[f"real_{name}"] = p[3, idx] / n if n > 0 else np.nan
            row[f"fake_{name}"] = p[4, idx] / n if n > 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def contrast_metrics(table: pd.DataFrame, names) -> dict[str, float]:
    """contrast_* keys: per structure the bias (mean over patients of generated − real mean HU)
    and the spread ratio (sd over patients of generated means / sd of real means); pooled: the
    largest |bias| and sqrt(Σ var_gen / Σ var_real) over the structures."""
    out, var_g, var_r, biases = {}, 0.0, 0.0, []
    for s in names:        # plain arrays: this runs once per resample (1 000 times with the bootstrap)
        if f"real_{s}" in table:
            real, fake = table[f"real_{s}"].to_numpy(np.float64), table[f"fake_{s}"].to_numpy(np.float64)
            both = ~(np.isnan(real) | np.isnan(fake))
            real, fake = real[both], fake[both]
        else:
            real = fake = np.empty(0)
        if real.size == 0:
            out[f"contrast_bias_hu_{s}"] = out[f"contrast_spread_ratio_{s}"] = float("nan")
            continue
        bias = float(np.mean(fake - real))
        out[f"contrast_bias_hu_{s}"] = bias
        biases.append(abs(bias))
        if real.size >= 2:
            vr, vg = float(np.var(real, ddof=1)), float(np.var(fake, ddof=1))
            out[f"contrast_spread_ratio_{s}"] = float(np.sqrt(vg / vr)) if vr > 0 else float("nan")
            var_g, var_r = var_g + vg, var_r + vr
        else:
            out[f"contrast_spread_ratio_{s}"] = float("nan")
    out["contrast_bias_hu_max_abs"] = max(biases) if biases else float("nan")
    out["contrast_spread_ratio"] = _sqrt_ratio(var_g, var_r)
    return out


# ------------------------------------------------------------------------------ classifier two-sample test

class C2STNet(nn.Module):
    """The two-sample test's classifier: three 4 × 4 stride-2 convolutions (width, 2·width,
    4·width channels, LeakyReLU 0.2), global average pooling, one linear logit. Small on
    purpose: it should find differences of texture and intensity, not memorise slices."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, c = [], 1
        for k in range(3):
            layers += [nn.Conv2d(c, width * 2 ** k, 4, 2, 1), nn.LeakyReLU(0.2)]
            c = width * 2 ** k
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # (B, 1, H, W) → (B,)
        return self.head(self.features(x).mean((2, 3)))[:, 0]


def fit_classifier(neg: np.ndarray, pos: np.ndarray, cfg, seed: int) -> C2STNet:
    """Train :class:`C2STNet` to tell ``pos`` (label 1) from ``neg`` (label 0) slices, (N, S, S) in
    [-1, 1]: ``cfg.c2st_steps`` Adam steps (lr ``cfg.c2st_lr``), each on ``cfg.c2st_batch_size``
    slices, half of each class drawn with replacement by a generator seeded with ``seed``; CPU,
    so the result repeats bit for bit."""
    if len(neg) == 0 or len(pos) == 0:
        raise MetricUnavailable("classifier two-sample test: a class has no slices to learn from")
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = C2STNet(cfg.c2st_width)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.c2st_lr, betas=(0.5, 0.999))
    x0, x1 = torch.as_tensor(np.asarray(neg, np.float32)), torch.as_tensor(np.asarray(pos, np.float32))
    half = max(1, cfg.c2st_batch_size // 2)
    target = torch.cat([torch.zeros(half), torch.ones(half)])
    net.train()
    for _ in range(cfg.c2st_steps):
        i0 = torch.randint(len(x0), (half,), generator=g)
        i1 = torch.randint(len(x1), (half,), generator=g)
        flip = torch.rand(2 * half, generator=g) < 0.5                         # left-right flips
        batch = torch.cat([x0[i0], x1[i1]])
        batch = torch.where(flip[:, None, None], batch.flip(-1), batch)[:, None]
        loss = F.binary_cross_entropy_with_logits(net(batch), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def classifier_scores(net: C2STNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits (N,) of (N, S, S) slices."""
    x = torch.as_tensor(np.asarray(images, np.float32))
    return torch.cat([net(x[s:s + batch, None]) for s in range(0, len(x), batch)]).double().numpy() \
        if len(x) else np.zeros(0)


def roc_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve of scores ``pos`` (label 1) against ``neg`` (label 0): the
    probability that a random positive scores above a random negative (ties count ½;
    Mann–Whitney U / (n0 n1)). NaN when a class is empty."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    if not len(neg) or not len(pos):
        return float("nan")
    ranks = stats.rankdata(np.concatenate([neg, pos]))
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def auc_interval(neg, pos, neg_cases, pos_cases) -> Interval | None:
    """Jackknife-t interval of the AUC over the patients (a patient left out drops all of their
    slices, of either class); the scores are fixed. ``neg``/``pos``: one classifier's scores, or a
    list of several classifiers' scores of the same slices (their mean AUC)."""
    negs, poss = (neg, pos) if isinstance(neg, list) else ([neg], [pos])
    neg_cases, pos_cases = np.asarray(neg_cases), np.asarray(pos_cases)
    patients = sorted(set(neg_cases.tolist()) | set(pos_cases.tolist()))

    def mean_auc(keep_neg, keep_pos) -> float:
        return float(np.mean([roc_auc(np.asarray(n)[keep_neg], np.asarray(p)[keep_pos]) for n, p in zip(negs, poss)]))

    reps = [mean_auc(neg_cases != p, pos_cases != p) for p in patients] + [mean_auc(slice(None), slice(None))]
    lo, hi = jackknife_interval(reps, (len(patients),))
    return None if lo is None else Interval(max(lo, 0.0), min(hi, 1.0))        # an AUC lies in [0, 1]


def halves(cases) -> tuple[list[str], list[str]]:
    """Sorted cases dealt alternately into two groups (deterministic)."""
    ordered = sorted(set(cases))
    return ordered[0::2], ordered[1::2]


def classifier_seeds(cfg, seed: int) -> list[int]:
    """The seeds of the ``cfg.c2st_repeats`` classifiers whose AUCs are averaged: seed, seed + 1, ..."""
    return [int(seed) + r for r in range(max(1, int(getattr(cfg, "c2st_repeats", 1))))]


def _scored(fit_neg, fit_pos, score_neg, score_pos, cfg, seed: int) -> tuple[list, list, float]:
    """Each classifier's scores of ``score_neg``/``score_pos``, and their mean AUC."""
    negs, poss = [], []
    for s in classifier_seeds(cfg, seed):
        net = fit_classifier(fit_neg, fit_pos, cfg, s)
        negs.append(classifier_scores(net, score_neg))
        poss.append(classifier_scores(net, score_pos))
    return negs, poss, float(np.mean([roc_auc(n, p) for n, p in zip(negs, poss)]))


EXACT_PATIENTS = 16          # up to this many patients every swap pattern of permutation_p is enumerated
N_PERMUTATIONS = 20000       # above it, this many random patterns (seeded)


def permutation_p(neg, pos, neg_cases, pos_cases, seed: int = 0) -> tuple[float, float]:
    """(p, smallest possible p) of the (mean) AUC of fixed scores, one-sided (AUC above chance).

    The null: within each patient the two classes are exchangeable (generated slices drawn as the
    real ones are), so swapping the labels of all of one patient's slices leaves the AUC's
    distribution unchanged. Swapping patients whole, not slices, keeps the correlation between one
    patient's slices. Every one of the 2^G patterns (G patients) is enumerated while G <=
    :data:`EXACT_PATIENTS` (p = share of patterns with an AUC at least the observed, identity
    included: exact, never below 2^-G), else :data:`N_PERMUTATIONS` random patterns seeded with
    ``seed`` ((1 + count) / (1 + n)). ``neg``/``pos``: one classifier's scores or a list of several
    classifiers' scores of the same slices (their mean AUC is the statistic). The scores must not
    have been fitted on these slices (here: classifiers trained on other patients)."""
    negs, poss = (neg, pos) if isinstance(neg, list) else ([neg], [pos])
    neg_cases, pos_cases = np.asarray(neg_cases), np.asarray(pos_cases)
    patients = sorted(set(neg_cases.tolist()) | set(pos_cases.tolist()))
    g = len(patients)
    if g == 0 or not len(neg_cases) or not len(pos_cases):
        raise MetricUnavailable("permutation test: a class has no slices")
    if g <= EXACT_PATIENTS:
        swap = ((np.arange(2 ** g)[:, None] >> np.arange(g)) & 1).astype(bool)      # row 0: identity
    else:
        rng = np.random.default_rng(seed)
        swap = np.vstack([np.zeros((1, g), bool), rng.random((N_PERMUTATIONS, g)) < 0.5])
    n_neg = np.array([(neg_cases == c).sum() for c in patients], np.float64)
    n_pos = np.array([(pos_cases == c).sum() for c in patients], np.float64)
    n1 = np.where(swap, n_neg, n_pos).sum(1)                                   # positives per pattern
    n0 = n_neg.sum() + n_pos.sum() - n1
    aucs = []
    for sn, sp in zip(negs, poss):
        ranks = stats.rankdata(np.concatenate([np.asarray(sn, np.float64), np.asarray(sp, np.float64)]))
        r_neg, r_pos = ranks[:len(sn)], ranks[len(sn):]
        rank_neg = np.array([r_neg[neg_cases == c].sum() for c in patients])
        rank_pos = np.array([r_pos[pos_cases == c].sum() for c in patients])
        with np.errstate(divide="ignore", invalid="ignore"):
            aucs.append((np.where(swap, rank_neg, rank_pos).sum(1) - n1 * (n1 + 1) / 2) / (n0 * n1))
    auc = np.mean(aucs, axis=0)
    hits = np.count_nonzero(auc[1:] >= auc[0] - 1e-12)       # the identity (row 0) counts once, in both cases
    return float((1 + hits) / len(auc)), smallest_p(g)


def smallest_p(n_patients: int) -> float:
    """The smallest p-value :func:`permutation_p` can give with ``n_patients`` patients."""
    return 1.0 / 2 ** n_patients if n_patients <= EXACT_PATIENTS else 1.0 / (N_PERMUTATIONS + 1)


def blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    """(N, S, S) slices blurred by a Gaussian of ``sigma`` px (kornia, reflect at the border)."""
    x = torch.as_tensor(np.asarray(images, np.float32))[:, None]
    k = max(3, 2 * int(np.ceil(3 * sigma)) + 1)
    return gaussian_blur2d(x, (k, k), (float(sigma), float(sigma)), border_type="reflect")[:, 0].numpy() \
        if len(x) else np.asarray(images, np.float32)


def c2st(train: dict, test: dict, cfg, seed: int, prefix: str = "") -> tuple[dict, dict, dict]:
    """The classifier test of ``test`` (generated vs real) with classifiers fitted on ``train``.
    ``train``/``test``: :func:`slice_set`. → (metrics, intervals, null reasons): ``<prefix>c2st_auc``
    (the mean AUC of the classifiers of :func:`classifier_seeds`, with its patient interval) and
    ``<prefix>c2st_p`` (:func:`permutation_p`)."""
    key = prefix + "c2st_auc"
    metrics, intervals, nulls = {}, {}, {}
    try:
        neg, pos, metrics[key] = _scored(train["real"], train["fake"], test["real"], test["fake"], cfg, seed)
        intervals[key] = auc_interval(neg, pos, test["real_cases"], test["fake_cases"])
        metrics[prefix + "c2st_p"] = permutation_p(neg, pos, test["real_cases"], test["fake_cases"], seed)[0]
    except MetricUnavailable as e:
        metrics[key], nulls[key] = None, str(e)
        metrics[prefix + "c2st_p"], nulls[prefix + "c2st_p"] = None, str(e)
    return metrics, {k: v for k, v in intervals.items() if v is not None}, nulls


def blur_control(train: dict, test: dict, cfg, seed: int) -> tuple[dict, dict, dict]:
    """The positive control of the classifier test: real slices against themselves blurred by
    ``cfg.control_blur_px``, fitted on ``train``'s real slices and scored on ``test``'s, as
    :func:`c2st` (``c2st_auc_blur``, ``c2st_p_blur``), plus ``c2st_p_min``: the smallest p-value
    the test patients allow (2^-G)."""
    sigma = float(cfg.control_blur_px)
    made = {name: {"real": d["real"], "fake": blurred(d["real"], sigma), "real_cases": d["real_cases"],
                   "fake_cases": d["real_cases"]} for name, d in (("train", train), ("test", test))}
    metrics, intervals, nulls = c2st(made["train"], made["test"], cfg, seed)
    rename = {"c2st_auc": "c2st_auc_blur", "c2st_p": "c2st_p_blur"}
    out = {rename[k]: v for k, v in metrics.items()}
    out["c2st_p_min"] = smallest_p(len(set(np.asarray(test["real_cases"]).tolist())))
    return out, {rename[k]: v for k, v in intervals.items()}, {rename[k]: v for k, v in nulls.items()}


def c2st_crossfit(data: dict, cfg, seed: int) -> float | None:
    """Validation AUC without the test patients: the patients in two halves; the classifiers
    trained on each half's real vs generated slices score the other half; the AUCs averaged
    (over the two folds and the classifiers of :func:`classifier_seeds`). None with fewer than 2
    patients."""
    h1, h2 = halves(data["real_cases"])
    if not h1 or not h2:
        return None
    rc, fc = np.asarray(data["real_cases"]), np.asarray(data["fake_cases"])
    aucs = []
    for fit, score in ((h1, h2), (h2, h1)):
        aucs.append(_scored(data["real"][np.isin(rc, fit)], data["fake"][np.isin(fc, fit)],
                            data["real"][np.isin(rc, score)], data["fake"][np.isin(fc, score)], cfg, seed)[2])
    return float(np.mean(aucs))


# ------------------------------------------------------------------------------ intervals

def table_intervals(table: pd.DataFrame, metrics_of, n_boot: int, seed: int, method: str) -> dict[str, Interval]:
    """Patient-level intervals of metrics computed from a per-case table (texture sums, contrast
    means): :func:`ctsynth.evaluate.bootstrap.case_table_intervals`."""
    if table.empty:
        return {}
    found = case_table_intervals(table.drop(columns=["case"]), metrics_of, n_boot, seed, method)
    return {k: Interval(max(lo, 0.0) if k.startswith(NON_NEGATIVE) else lo, hi) for k, (lo, hi) in found.items()}


# ------------------------------------------------------------------------------ one evaluation

C2ST_KEYS = ("c2st_auc", "c2st_p", "c2st_auc_blur", "c2st_p_blur", "c2st_p_min")
HEART_ONLY_C2ST = ("heart_only_c2st_auc", "heart_only_c2st_p")
NO_CONTROL_VAL = "no validation cases (split.val is empty): the classifier has nothing to learn from"


def slice_set(store, fake, index: np.ndarray) -> dict:
    """{"real", "fake": (N, S, S) float32, "real_cases", "fake_cases": (N,)} of generated slices
    ``fake`` aligned with store rows ``index`` and their real slices."""
    cases = store.slices["case"].to_numpy()[index]
    return {"real": np.asarray(store.images[index], np.float32), "fake": np.asarray(fake, np.float32),
            "real_cases": cases, "fake_cases": cases}


def point_metrics(texture: TextureAccumulator, pixel_sums: dict, labels: dict[int, str]) -> tuple[dict, pd.DataFrame]:
    """The texture and contrast metrics of one set of patients, and its per-case contrast table."""
    contrast = contrast_table(pixel_sums, labels)
    return {**texture.metrics(), **contrast_metrics(contrast, list(labels.values()))}, contrast


def evaluate(texture: TextureAccumulator, pixel_sums: dict, labels: dict[int, str], test: dict,
             val: dict | None, cfg, *, seed: int, n_boot: int, method: str,
             heart_only: tuple[dict, dict] | None = None) -> tuple[dict, dict, dict]:
    """Every realism metric of one evaluation: (metrics, null reasons, intervals). ``texture``: the
    test pass's accumulator; ``pixel_sums``: the paired accumulator's per-case pixel sums;
    ``test``/``val``: :func:`slice_set` of the test and the validation patients (None: no
    validation cases); ``heart_only``: the (validation, test) slice sets drawn from the heart masks
    alone, for ``heart_only_c2st_*`` (None: a generator without anatomy, whose ``c2st_*`` already is)."""
    metrics, contrast = point_metrics(texture, pixel_sums, labels)
    names = list(labels.values())
    intervals = table_intervals(texture.table(), texture.metrics, n_boot, seed, method)
    intervals.update(table_intervals(contrast, lambda t: contrast_metrics(t, names), n_boot, seed, method))
    nulls = {}
    if val is None:
        for key in C2ST_KEYS + (HEART_ONLY_C2ST if heart_only is not None else ()):
            metrics[key], nulls[key] = None, NO_CONTROL_VAL
    else:
        found = [c2st(val, test, cfg, seed), blur_control(val, test, cfg, seed)]
        if heart_only is not None:                      # the paper's condition: the heart masks alone
            found.append(c2st(heart_only[0], heart_only[1], cfg, seed, prefix="heart_only_"))
        for c_metrics, c_intervals, c_nulls in found:
            metrics.update(c_metrics)
            nulls.update(c_nulls)
            if n_boot >= 1:
                intervals.update(c_intervals)
    for key, value in metrics.items():
        if value is not None and not np.isfinite(value) and key not in nulls:
            nulls[key] = undefined_reason(key)
    return metrics, nulls, intervals


def undefined_reason(key: str) -> str:
    """Why a realism metric is undefined (NaN) on a set of patients."""
    if key.startswith("contrast_spread"):
        return ("undefined: fewer than 2 patients have the structure, or the real patients' mean HU do not vary "
                "(sd 0)")
    return "undefined: the region or structure is absent from every scored slice"
