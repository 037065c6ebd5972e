"""Validation scoring: the generated *validation* slices, scored like the test slices.

Every choice of a default or a variant (a param value, a generator design) is made on these
numbers; the test patients are scored only to report (they never pick anything). The generate
stage writes ``data/generated/val/{fake,index}.npy`` beside the test set; this pass gives the
paired metrics (mse, psnr, ssim, mae_hu), the segmenter's Dice on generated and on real
validation slices, the Fréchet distance / KID between generated and real validation slices
in the segmenter's features, and the through-plane ratios of the validation volumes (in-body
adjacent-slice SSIM, |dI/dz| and flicker, :mod:`ctsynth.evaluate.throughplane`) and the realism
checks (:mod:`ctsynth.evaluate.realism`: texture, contrast, and a classifier two-sample test
cross-fitted over two halves of the validation patients), as ``val_<key>`` (same
definitions as ``<key>`` in docs/metrics.md, on the validation patients) in
``reports/validation.json``: a DVC metrics file, so ``dvc exp show`` and ``ctsynth compare`` see it beside the headline.

No intervals here: a choice between variants needs the spread over training seeds
(``ctsynth compare``), which a patient interval of one model does not hold.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ctsynth.core.errors import MetricUnavailable
from ctsynth.core.progress import quiet
from ctsynth.data import modality
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate import realism
from ctsynth.evaluate.metrics import (
    DiceAccumulator,
    FeatureBank,
    PairedAccumulator,
    frechet_distance,
    kernel_distance,
    reported_structures,
)
from ctsynth.evaluate.results import clean
from ctsynth.evaluate.throughplane import NO_RATIO, RATIO_KEYS, body_mask, case_sums, case_volumes, consistency_metrics

log = logging.getLogger("ctsynth.evaluate.validation")

PREFIX = "val_"
KEYS = ("n_slices", "n_cases", "mse", "psnr", "ssim", "mae_hu", "mae_hu_background", "heart_only_ssim",
        "heart_only_mae_hu", "heart_only_mae_hu_background", "dice_generated_mean", "dice_real_mean",
        "fd_seg", "kid_seg", "zcons_ssim_ratio", "zgrad_ratio", "flicker_ratio", "c2st_auc", "texture_std_ratio",
        "texture_nps_ratio_band4", "contrast_bias_hu_max_abs", "contrast_spread_ratio")
REALISM_KEYS = ("texture_std_ratio", "texture_nps_ratio_band4", "contrast_bias_hu_max_abs", "contrast_spread_ratio")
NO_VAL = "no validation cases in the split (split.val is empty): nothing to choose defaults on"
HEART_ONLY_KEYS = ("ssim", "mae_hu", "mae_hu_background")
NO_HEART_ONLY = ("the generator is not conditioned on the anatomy, or never learned to draw without it "
                 "(model.anatomy false, or train.anatomy_drop 0): no heart-only slices")


def empty() -> tuple[dict, dict]:
    """The scores of a split without validation cases: counts 0, everything else null with the reason."""
    return ({PREFIX + k: (0 if k.startswith("n_") else None) for k in KEYS},
            {PREFIX + k: NO_VAL for k in KEYS if not k.startswith("n_")})


def paired_pass(store: ProcessedStore, fake, index: np.ndarray, batch: int, *, seg=None,
                desc: str | None = None) -> tuple[PairedAccumulator, DiceAccumulator | None]:
    """Generated slices ``fake`` of the store rows ``index`` against their real slices, in batches:
    the paired accumulator and, with a segmenter ``seg``, the Dice of its masks on the generated
    slices (None without). ``desc``: a progress bar's label (None: no bar)."""
    paired = PairedAccumulator(store.meta["hu_window"], store.structures)
    dice = DiceAccumulator(reported_structures(store.structures)) if seg is not None else None
    case_of, z_of = store.slices["case"].to_numpy(), store.slices["z"].to_numpy()
    for s in tqdm(range(0, len(index), batch), desc=desc, disable=desc is None or quiet(), unit="batch"):
        rows = index[s:s + batch]
        gen = torch.from_numpy(np.asarray(fake[s:s + batch], dtype=np.float32))
        masks = torch.from_numpy(np.asarray(store.masks[rows]).astype(np.int64))
        paired.update(gen, torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32)), masks,
                      case_of[rows].tolist(), z_of[rows].tolist())
        if dice is not None:
            dice.update(seg.run(gen)[0], masks, case_of[rows].tolist())
    return paired, dice


def paired_only(store: ProcessedStore, fake, index: np.ndarray, batch: int) -> dict:
    """The paired summary (ssim, mae_hu, mae_hu_<label>, ...) of generated slices ``fake`` of rows ``index``."""
    return paired_pass(store, fake, index, batch)[0].summary()


def score(store: ProcessedStore, fake, index: np.ndarray, seg, batch: int, kid_subset: int,
          *, seed: int, realism_cfg=None, heart_only=None) -> tuple[dict, dict]:
    """``({val_<key>: value}, {val_<key>: reason of a null})`` for the generated validation slices
    ``fake`` (N, S, S) of the store rows ``index``, as checked by
    :func:`ctsynth.evaluate.evaluate.load_generated`. ``realism_cfg``: ``params.realism`` (the
    classifier's budget; None: ``val_c2st_auc`` is null). ``heart_only``: ``(fake, index)`` of the same
    patients drawn without the anatomy (``val_heart_only_*``; None: null with the reason)."""
    labels = reported_structures(store.structures)
    paired = PairedAccumulator(store.meta["hu_window"], store.structures)
    texture = realism.TextureAccumulator(store.meta["hu_window"], labels, modality.unit(store.meta) == "HU")
    body_hu = modality.body_level(store.meta)
    dice = {"generated": DiceAccumulator(labels), "real": DiceAccumulator(labels)}
    feats = {"generated": FeatureBank(), "real": FeatureBank()}
    case_of, z_of = store.slices["case"].to_numpy(), store.slices["z"].to_numpy()
    for s in tqdm(range(0, len(index), batch), desc="validation scores", disable=quiet(), unit="batch"):
        rows = index[s:s + batch]
        gen = torch.from_numpy(np.asarray(fake[s:s + batch], dtype=np.float32))          # (B, S, S)
        real = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))
        masks = torch.from_numpy(np.asarray(store.masks[rows]).astype(np.int64))
        cases = case_of[rows].tolist()
        paired.update(gen, real, masks, cases, z_of[rows].tolist())
        texture.update(gen, real, masks, cases, body_mask(real.numpy(), store.meta["hu_window"], body_hu))
        for kind, img in (("generated", gen), ("real", real)):
            pred, f = seg.run(img)
            dice[kind].update(pred, masks, cases)
            feats[kind].add(f)
    summary = paired.summary()
    values = {"n_slices": len(index), "n_cases": len(set(case_of[index])),
              **{k: summary[k] for k in ("mse", "psnr", "ssim", "mae_hu", "mae_hu_background")},
              "dice_generated_mean": dice["generated"].mean(), "dice_real_mean": dice["real"].mean()}
    values = {k: clean(v) for k, v in values.items()}
    reasons = {k: DiceAccumulator.NONE_PRESENT for k in ("dice_generated_mean", "dice_real_mean") if values[k] is None}
    alone = paired_only(store, *heart_only, batch) if heart_only is not None else {}
    for key in HEART_ONLY_KEYS:                                  # the same patients, drawn without the anatomy
        values[f"heart_only_{key}"] = clean(alone.get(key))
        if values[f"heart_only_{key}"] is None:
            reasons[f"heart_only_{key}"] = NO_HEART_ONLY
    real_f, gen_f = feats["real"].tensor(), feats["generated"].tensor()
    for key, compute in (("fd_seg", lambda: frechet_distance(real_f, gen_f)),
                         ("kid_seg", lambda: kernel_distance(real_f, gen_f, kid_subset, seed=seed))):
        try:
            values[key] = clean(compute())
        except MetricUnavailable as e:
            values[key], reasons[key] = None, str(e)
    z_values = consistency_metrics(pd.DataFrame([case_sums(v, labels, store.meta["hu_window"], body_hu=body_hu)
                                                 for v in case_volumes(store, fake, index)]).fillna(0.0), labels)
    for key in RATIO_KEYS:                                       # through-plane: the validation volumes
        values[key] = clean(z_values[key])
        if values[key] is None:
            reasons[key] = NO_RATIO
    r_values, _ = realism.point_metrics(texture, paired.pixel_sums, labels)
    for key in REALISM_KEYS:
        values[key] = clean(r_values[key])
        if values[key] is None:
            reasons[key] = realism.undefined_reason(key)
    if realism_cfg is None:
        values["c2st_auc"], reasons["c2st_auc"] = None, "no classifier budget given (params.realism)"
    else:
        values["c2st_auc"] = clean(realism.c2st_crossfit(realism.slice_set(store, fake, index), realism_cfg, seed))
        if values["c2st_auc"] is None:
            reasons["c2st_auc"] = "fewer than 2 validation patients: no two halves to cross-fit the classifier on"
    log.info("validation: %d generated slices of %d patients: ssim %.4f, mae_hu %.1f, Dice %s, fd_seg %s",
             len(index), values["n_cases"], values["ssim"], values["mae_hu"], values["dice_generated_mean"],
             values["fd_seg"])
    return {PREFIX + k: v for k, v in values.items()}, {PREFIX + k: v for k, v in reasons.items()}
