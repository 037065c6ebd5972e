"""The segmenter: a small UNet trained on REAL *training* slices (model, training loop, file
format), and :class:`Segmenter`, a loaded, frozen segmenter (predictions and encoder features)
the evaluate and utility stages use.

* :class:`SegUNet` — a 3-level UNet trained by :func:`run` to predict the
  structure-index mask (classes 0..7). It always exists offline. Its encoder features
  (global-average-pooled level-3 and bottleneck activations, ``12·width`` numbers per slice) give
  ``fd_seg`` / ``kid_seg``; its predictions give the Dice of segmentation consistency.
  :func:`load_segmenter` returns a :class:`Segmenter`.
* The standard FID's InceptionV3 features live in :mod:`ctsynth.evaluate.inception`.

    python stages/segmenter.py --processed data/processed --split data/split.json --out models/segmenter.pt
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ctsynth.core.accel import autocast, resolve_precision, runtime_record
from ctsynth.core.config import Params
from ctsynth.core.errors import ConfigError, InputError, ModelFileError
from ctsynth.core.io import save_torch
from ctsynth.core.labels import N_CLASSES
from ctsynth.core.progress import quiet
from ctsynth.data.augment import augment_labelled, build_augment
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore

log = logging.getLogger("ctsynth.segmenter.segmenter")

SEGMENTER_FORMAT = "ctsynth-segmenter"
SEGMENTER_VERSION = 1


# ------------------------------------------------------------------------------ segmenter

class _Block(nn.Sequential):
    """(conv3x3 → BatchNorm → ReLU) × 2; spatial size unchanged."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Up(nn.Module):
    """Decoder step with an additive skip: 1×1 project the coarse map, upsample, add the skip,
    then conv3x3 → BN → ReLU. Cheaper than concat + double conv (the decoder would otherwise
    cost ~2/3 of the network's FLOPs), which keeps the segmenter stage fast on CPU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.proj(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(x + skip)


NHWC = torch.channels_last   # training layout: 20-25 % faster steps than NCHW on CPU at 64² (docs/performance.md)

class SegUNet(nn.Module):
    """Small UNet, 3 downsamplings, additive skips::

        x (B,1,S,S) ─enc1 (w,S)──────────────────────────────── dec1 (w,S) ─head─▶ logits (B,8,S,S)
                      └pool─enc2 (2w,S/2)──────────── dec2 (2w,S/2) ┘
                              └pool─enc3 (4w,S/4)── dec3 (4w,S/4) ┘
                                      └pool─bott (8w,S/8) ┘

    Features = concat(GAP(enc3), GAP(bott)) → (B, 12w). Any S works (the decoder upsamples to
    the skip's size).
    """

    def __init__(self, width: int = 16, n_classes: int = N_CLASSES, in_channels: int = 1):
        super().__init__()
        w = width
        self.width, self.n_classes, self.in_channels = width, n_classes, in_channels
        self.enc1, self.enc2 = _Block(in_channels, w), _Block(w, 2 * w)
        self.enc3, self.bott = _Block(2 * w, 4 * w), _Block(4 * w, 8 * w)
        self.dec3, self.dec2, self.dec1 = _Up(8 * w, 4 * w), _Up(4 * w, 2 * w), _Up(2 * w, w)
        self.head = nn.Conv2d(w, n_classes, 1)

    @property
    def feature_dim(self) -> int:
        return 12 * self.width

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """x (B,1,S,S) in [-1,1] → logits (B,8,S,S) [, features (B,12w)]."""
        e1 = self.enc1(x)                                   # (B, w, S, S)
        e2 = self.enc2(F.max_pool2d(e1, 2))                 # (B, 2w, S/2, S/2)
        e3 = self.enc3(F.max_pool2d(e2, 2))                 # (B, 4w, S/4, S/4)
        b = self.bott(F.max_pool2d(e3, 2))                  # (B, 8w, S/8, S/8)
        d = self.dec1(self.dec2(self.dec3(b, e3), e2), e1)  # (B, w, S, S)
        logits = self.head(d)                               # (B, 8, S, S)
        if not with_features:
            return logits
        feats = torch.cat([e3.mean((2, 3)), b.mean((2, 3))], 1)  # (B, 12w)
        return logits, feats


def _as_batch(x) -> torch.Tensor:
    """(B,S,S) or (B,1,S,S), numpy or torch, any float dtype → float32 (B,1,S,S)."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images (B,S,S) or (B,1,S,S), got {tuple(x.shape)}")
    return x


class Segmenter:
    """A trained :class:`SegUNet`, frozen in eval mode: predictions, encoder features, or both in
    one pass (:meth:`run`), plus the config and training summary of its file."""

    def __init__(self, model: SegUNet, config: dict | None = None, train: dict | None = None):
        self.model = model.eval()
        self.config = dict(config or {})    # width, image_size, structures, hu_window, ...
        self.train = dict(train or {})      # training summary (train_cases, iterations, ...)

    @property
    def dim(self) -> int:
        return self.model.feature_dim

    @torch.inference_mode()
    def run(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B,S,S) in [-1,1] → (predicted index mask (B,S,S) int64, features (B,D))."""
        logits, feats = self.model(_as_batch(x), with_features=True)
        return logits.argmax(1), feats

    def features(self, x) -> torch.Tensor:
        """Images (B,S,S) in [-1,1] → (B, D) float32."""
        return self.run(x)[1]

    def predict(self, x) -> torch.Tensor:
        """Images (B,S,S) in [-1,1] → structure-index masks (B,S,S) int64."""
        return self.run(x)[0]


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − mean soft Dice over the foreground classes present in the batch (target (B,S,S))."""
    prob = logits.softmax(1)                                              # (B, K, S, S)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))[1:]                            # (K-1,)
    denom = (prob + onehot).sum((0, 2, 3))[1:]
    present = onehot.sum((0, 2, 3))[1:] > 0
    if not present.any():
        return logits.new_zeros(())
    return 1.0 - (2 * inter[present] / denom[present].clamp_min(1e-6)).mean()


def _load_batch(store: ProcessedStore, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.sort(rows)   # sorted fancy indexing reads the memmap sequentially
    images = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))   # (B, S, S)
    masks = torch.from_numpy(np.asarray(store.masks[rows]).astype(np.int64))      # (B, S, S)
    return images, masks


def dice_accumulator(model: Segmenter | nn.Module, store: ProcessedStore, rows: np.ndarray,
                     batch: int = 64):
    """The model's predictions on the store's ``rows`` (in that order) scored against their masks:
    a :class:`ctsynth.evaluate.metrics.DiceAccumulator` (pooled ``summary()``, ``per_slice()`` counts)."""
    from ctsynth.evaluate.metrics import DiceAccumulator, reported_structures

    seg = model if isinstance(model, Segmenter) else Segmenter(model)
    acc = DiceAccumulator(reported_structures(store.structures))
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        images = torch.from_numpy(np.asarray(store.images[r], dtype=np.float32))     # (B, S, S)
        masks = torch.from_numpy(np.asarray(store.masks[r]).astype(np.int64))        # (B, S, S)
        acc.update(seg.predict(images), masks, ["-"] * len(r))
    return acc


def _validation_dice(model: SegUNet, store: ProcessedStore, cases: list[str]) -> dict:
    """Pooled Dice per selected structure on the validation cases ({} when there are none)."""
    from ctsynth.evaluate.metrics import dice_mean
    rows = store.rows_for_cases(cases)
    if rows.size == 0:
        return {}
    dice = dice_accumulator(model, store, rows).summary()
    log.info("segmenter: validation Dice %s (mean %.3f)",
             " ".join(f"{k} {v:.3f}" for k, v in dice.items()), dice_mean(dice))
    return dice


def train_segmenter(cfg, seed: int, pools: list[tuple[ProcessedStore, np.ndarray]],
                    desc: str = "segmenter", share: float | None = None,
                    init: SegUNet | None = None) -> tuple[SegUNet, float]:
    """Train a fresh :class:`SegUNet` on the slices ``rows`` of each ``(store, rows)`` pool.

    Cross-entropy + soft Dice, Adam, ``cfg.iterations`` steps of ``cfg.batch_size`` slices drawn
    (seeded by ``seed``) uniformly from all pools together. With ``cfg.ema`` > 0 the model returned is
    the exponential moving average of the weights and BatchNorm statistics (decay ``cfg.ema``): at a high constant
    learning rate the last step's weights still swing with the last few batches (measured: the
    mixed real + synthetic segmenter scored Dice 0.81 / 0.86 / 0.88 after 300 / 290 / 310 steps).
    ``cfg.augment`` (``segmenter.augment``): each batch through :mod:`ctsynth.data.augment` (image and
    mask warped alike; ``classic`` is the nnU-Net-style baseline). ``cfg.precision``: the forward pass
    under bf16 autocast where the CPU has native bf16 (``auto``; 36 % less time per step on an AMX
    CPU), weights and losses in fp32. Deterministic on CPU. Returns the
    model (train mode) and the final loss (running mean).

    ``share`` (two pools only): that fraction of every batch comes from the second pool (e.g. the
    synthetic slices), the rest from the first, instead of drawing from both together. ``init``:
    start from a copy of these weights (fine-tuning) instead of a fresh network."""
    total = sum(len(rows) for _, rows in pools)
    if share is not None and (len(pools) != 2 or not 0 <= share <= 1):
        raise ConfigError(f"{desc}: a batch share needs exactly two pools and a value in [0, 1], got {share}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    augment = build_augment(cfg.augment, key="segmenter.augment")     # draws from torch's seeded generator
    model = SegUNet(width=cfg.width).to(memory_format=NHWC)
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    model.train()
    cpu = torch.device("cpu")
    precision = resolve_precision(cfg.precision, cpu)        # auto: bf16 autocast only where native (AMX)
    loss_ema = None
    bar = tqdm(range(cfg.iterations), desc=desc, disable=quiet(), unit="step")
    for step in bar:
        picks = (rng.choice(total, cfg.batch_size, replace=total < cfg.batch_size) if share is None
                 else _share_picks(rng, [len(r) for _, r in pools], cfg.batch_size, share))
        images, masks = _load_pooled(pools, picks)
        if cfg.augment != "none":
            images, masks = augment_labelled(augment, images, masks)
        with autocast(precision, cpu):
            logits = model(images[:, None].contiguous(memory_format=NHWC))
        logits = logits.float()                                  # the losses in fp32 either way
        loss = F.cross_entropy(logits, masks) + _soft_dice_loss(logits, masks)
        if not torch.isfinite(loss):
            raise InputError(f"{desc}: non-finite loss at step {step}; check the processed store")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_ema = float(loss.detach()) if loss_ema is None else 0.9 * loss_ema + 0.1 * float(loss.detach())
        if step % 25 == 0 or step == cfg.iterations - 1:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
            log.debug("%s step %d loss %.4f", desc, step, loss_ema)
    log.info("%s: final loss (running mean) %.4f (%s)", desc, loss_ema, precision)
    return (model if ema is None else ema.module), float(loss_ema)


def _share_picks(rng: np.random.Generator, sizes: list[int], batch: int, share: float) -> np.ndarray:
    """Positions in the concatenation of two pools: ``round(share * batch)`` from the second."""
    k = int(round(share * batch))
    first = rng.choice(sizes[0], batch - k, replace=sizes[0] < batch - k)
    second = rng.choice(sizes[1], k, replace=sizes[1] < k) + sizes[0]
    return np.concatenate([first, second])


def _load_pooled(pools: list[tuple[ProcessedStore, np.ndarray]], picks: np.ndarray):
    """Positions in the concatenation of the pools' rows -> one batch (images, masks)."""
    parts, offset = [], 0
    for store, rows in pools:
        own = picks[(picks >= offset) & (picks < offset + len(rows))] - offset
        if own.size:
            parts.append(_load_batch(store, rows[own]))
        offset += len(rows)
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run(params: Params, processed_dir: str | Path, split_path: str | Path,
        out_path: str | Path) -> dict:
    """Train :class:`SegUNet` on the real training slices (:func:`train_segmenter`); save it
    atomically to ``out_path``. Returns the training summary stored in the file."""
    cfg = params.segmenter
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train",))
    train_rows = store.rows_for_cases(split["train"])
    if train_rows.size == 0:
        raise InputError(f"{split_path}: no training slices in {processed_dir} for the train cases")
    log.info("segmenter: %d training slices from %d cases, %d iterations, batch %d, width %d",
             train_rows.size, len(split["train"]), cfg.iterations, cfg.batch_size, cfg.width)
    model, loss_ema = train_segmenter(cfg, segmenter_seed(params), [(store, train_rows)])
    val_dice = _validation_dice(model, store, split.get("val", []))
    config = segmenter_config(cfg, store)
    summary = {"iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr, "ema": cfg.ema,
               "augment": cfg.augment, "precision": cfg.precision,
               "precision_used": resolve_precision(cfg.precision, torch.device("cpu")),
               "seed": segmenter_seed(params), "final_loss": loss_ema,
               "train_cases": list(split["train"]), "n_train_slices": int(train_rows.size),
               "val_dice": val_dice, "runtime": runtime_record("cpu")}
    save_segmenter(model, config, summary, out_path)
    return summary


def segmenter_config(cfg, store: ProcessedStore) -> dict:
    """What a segmenter file records about its input: width, classes and the store's preprocessing."""
    return {"width": cfg.width, "n_classes": N_CLASSES, "in_channels": 1,
            "image_size": store.image_size, "structures": store.structures,
            "hu_window": [float(v) for v in store.meta["hu_window"]]}


def save_segmenter(model: SegUNet, config: dict, summary: dict, out_path: str | Path) -> None:
    """Write weights + config + training summary (tensors and plain types only) atomically."""
    payload = {"format": SEGMENTER_FORMAT, "version": SEGMENTER_VERSION, "config": config,
               "train": summary, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    save_torch(out_path, payload)
    log.info("segmenter written to %s", out_path)


def check_segmenter(seg: Segmenter, store: ProcessedStore, split: dict, path) -> None:
    """A segmenter must match the store's slice size and never have seen a test case."""
    cfg = seg.config
    if cfg.get("image_size") not in (None, store.image_size):
        raise ModelFileError(f"{path}: segmenter trained at {cfg['image_size']}², store is "
                             f"{store.image_size}² (run `dvc repro segmenter`)")
    leak = set(seg.train.get("train_cases", [])) & set(split["test"])
    if leak:
        raise ModelFileError(f"{path}: segmenter was trained on test case(s) {sorted(leak)}")


def segmenter_seed(params: Params) -> int:
    """The seed the segmenter is trained with: ``segmenter.seed`` where the params have one that
    is set, else the top-level ``seed``."""
    own = getattr(params.segmenter, "seed", None)
    return params.seed if own is None else int(own)


def check_segmenter_params(seg: Segmenter, params: Params, path) -> None:
    """A segmenter that is *reused* (the utility stage's real-only model) must have been trained
    with the ``segmenter.*`` params and seed the other models of the comparison get, or the
    comparison mixes two budgets. Compares every ``segmenter.*`` key the file records (``width``
    in its config, the training keys in its summary) and the seed :func:`train_segmenter` was
    given (the summary's ``seed``) with :func:`segmenter_seed`. InputError naming the file, every
    differing key with the saved and the wanted value, and the fix."""
    problems, unrecorded = [], []
    wanted = {k: v for k, v in vars(params.segmenter).items() if k != "seed"}
    wanted["seed"] = segmenter_seed(params)
    for key, value in wanted.items():
        source = seg.train if key in seg.train else seg.config if key in seg.config else None
        if source is None:
            unrecorded.append(key)
        elif source[key] != value:
            name = f"segmenter.{key}" if key != "seed" else "the seed train_segmenter was given"
            problems.append(f"{path}: trained with {name} = {source[key]!r}, the params want {value!r}")
    if unrecorded:
        log.info("%s does not record segmenter %s; not checked", path, ", ".join(unrecorded))
    if problems:
        raise InputError(problems + [f"{path}: trained with other segmenter params than the current ones; "
                                     f"run `dvc repro segmenter` to retrain it"])


def load_segmenter(path: str | Path) -> Segmenter:
    """Load a file written by :func:`run` (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: segmenter not found (run `dvc repro segmenter`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for non-torch / truncated files
        raise ModelFileError(f"{path}: not a readable segmenter file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != SEGMENTER_FORMAT:
        raise ModelFileError(f"{path}: not a ctsynth segmenter (no '{SEGMENTER_FORMAT}' header)")
    config = payload.get("config", {})
    model = SegUNet(width=int(config.get("width", 16)), n_classes=int(config.get("n_classes", N_CLASSES)),
                    in_channels=int(config.get("in_channels", 1)))
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as e:
        raise ModelFileError(f"{path}: segmenter weights do not match its config ({e})") from None
    return Segmenter(model, config, payload.get("train"))
