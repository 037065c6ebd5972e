"""evaluate: paired image metrics, feature distances, segmentation consistency and privacy of the
generated test set, written as DVC metrics/plots.

Inputs (docs/contracts.md): the processed store, ``data/split.json``, ``data/generated/fake.npy``
(float16 (N, S, S) in [-1, 1]) with ``index.npy`` (int64 store rows, aligned), and
``models/segmenter.pt``. One pass over the generated slices in batches of
``evaluate.batch_size``; per batch:

* paired metrics (MSE, PSNR, SSIM, MAE in HU, per-structure MAE) → running sums
  (:class:`~ctsynth.metrics.PairedAccumulator`), per-slice values streamed to
  ``reports/plots/per_slice.csv``;
* segmenter on generated and on real slices → Dice running counts and encoder features
  (N × D floats kept for piq's FD/KID); InceptionV3 features when local weights are set;
* nearest training slice of each generated and real slice (:mod:`ctsynth.privacy`) → rows
  streamed to ``reports/privacy.csv``, counts and histogram accumulated.

So memory is flat in the number of test slices except the N × D feature matrices (and the
list of shareable (case, z) pairs). Every output is written atomically; ``metrics.json`` holds
only numbers (or null), reasons and definitions go to ``metrics_notes.json``.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .config import Params
from .data import ProcessedStore
from .errors import InputError, MetricUnavailable, ModelFileError
from .features import InceptionFeatures, load_segmenter
from .io import atomic_file, write_csv, write_json
from .metrics import (DATA_RANGE, DiceAccumulator, FeatureBank, PairedAccumulator, definition,
                      frechet_distance, kernel_distance, reported_structures)
from .privacy import NearestTrainingSearch, PrivacyAccumulator
from .progress import quiet
from .split import load_split

log = logging.getLogger("ctsynth.evaluate")


def load_generated(generated_dir: str | Path, store: ProcessedStore, test_cases: list[str]):
    """Open fake.npy (memory-mapped) and index.npy; check them against the store and split."""
    gen = Path(generated_dir)
    missing = [n for n in ("fake.npy", "index.npy") if not (gen / n).exists()]
    if missing:
        raise InputError(f"{gen}: missing {missing} (run `dvc repro generate`)")
    try:
        fake = np.load(gen / "fake.npy", mmap_mode="r")
        index = np.load(gen / "index.npy")
    except (ValueError, OSError) as e:
        raise InputError(f"{gen}: fake.npy/index.npy not readable as .npy ({e})") from None
    s, n_store = store.image_size, len(store.slices)
    problems = []
    if fake.ndim != 3 or fake.shape[1:] != (s, s):
        problems.append(f"{gen / 'fake.npy'}: shape {fake.shape}, expected (N, {s}, {s})")
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        problems.append(f"{gen / 'index.npy'}: expected a 1-D integer array, got {index.dtype} {index.shape}")
    elif len(index) != len(fake):
        problems.append(f"{gen}: index.npy has {len(index)} rows but fake.npy {len(fake)} slices")
    elif len(index) == 0:
        problems.append(f"{gen}: no generated slices")
    elif index.min() < 0 or index.max() >= n_store:
        problems.append(f"{gen / 'index.npy'}: rows outside the processed store (0..{n_store - 1})")
    else:
        leaked = sorted(set(store.slices["case"].to_numpy()[index]) - set(test_cases))
        if leaked:
            problems.append(f"{gen}: generated slices of non-test case(s) {leaked}; evaluate needs test cases only")
    if problems:
        raise InputError(problems)
    return fake, index.astype(np.int64)


def _check_segmenter(seg, store: ProcessedStore, split: dict, path) -> None:
    cfg = seg.config
    if cfg.get("image_size") not in (None, store.image_size):
        raise ModelFileError(f"{path}: segmenter trained at {cfg['image_size']}², store is "
                             f"{store.image_size}² (run `dvc repro segmenter`)")
    leak = set(seg.train.get("train_cases", [])) & set(split["test"])
    if leak:
        raise ModelFileError(f"{path}: segmenter was trained on test case(s) {sorted(leak)}")


def _clean(value):
    """JSON-safe scalar: ints stay ints, floats rounded to 6 significant digits, NaN/inf → None."""
    if value is None or isinstance(value, (bool, int, np.integer)):
        return None if value is None else int(value)
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


class _CsvStream:
    """Append DataFrames to an open text file, header once."""

    def __init__(self, fh):
        self.fh, self.first = fh, True

    def write(self, frame: pd.DataFrame) -> None:
        frame.to_csv(self.fh, header=self.first, index=False, float_format="%.6g")
        self.first = False


def _pin_malloc_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Keep glibc from raising its mmap threshold as large tensors are freed.

    By default glibc grows the threshold to the size of each freed mmapped block, so later
    batch-sized tensors come from the heap, which fragments and is never trimmed: resident
    memory then creeps up ~3 MB per batch (measured: +350 MB over 3160 slices at 64²). Pinning
    the threshold keeps evaluate's memory flat in the number of slices (+8 MB over the same
    run, the feature matrices). No-op where glibc is absent.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run(params: Params, processed_dir, split_path, generated_dir, segmenter_path, out_dir) -> dict:
    """Evaluate the generated test set; write every report file; return the metrics dict."""
    t0 = time.time()
    _pin_malloc_mmap_threshold()
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train", "test"))
    fake, index = load_generated(generated_dir, store, split["test"])
    seg = load_segmenter(segmenter_path)
    _check_segmenter(seg, store, split, segmenter_path)
    notes: dict = {"data_range": f"PSNR/SSIM on images mapped to [0,1], data_range={DATA_RANGE} "
                                 f"= HU window {store.meta['hu_window']}; MSE in [-1,1] space"}
    try:
        inception = InceptionFeatures(params.evaluate.inception_weights)
        notes["fid_inception"] = f"InceptionV3 ({inception.flavour}) from {inception.path}"
    except MetricUnavailable as e:
        inception, notes["fid_inception"] = None, str(e)
        log.warning("%s", e)

    window = store.meta["hu_window"]
    labels = reported_structures(store.structures)
    paired = PairedAccumulator(window, store.structures)
    dice = {"generated": DiceAccumulator(labels), "real": DiceAccumulator(labels)}
    seg_feats = {"generated": FeatureBank(), "real": FeatureBank()}
    inc_feats = {"generated": FeatureBank(), "real": FeatureBank()}
    train_rows = store.rows_for_cases(split["train"])
    search = NearestTrainingSearch(store.images, train_rows, params.privacy.downsample,
                                   params.privacy.candidates)
    privacy = PrivacyAccumulator(params.privacy.max_similarity)
    shareable: list[dict] = []
    case_of, z_of = store.slices["case"].to_numpy(), store.slices["z"].to_numpy()

    out = Path(out_dir)
    bs = params.evaluate.batch_size
    with atomic_file(out / "plots" / "per_slice.csv") as t1, atomic_file(out / "privacy.csv") as t2, \
            open(t1, "w", newline="") as f1, open(t2, "w", newline="") as f2:
        per_slice, priv_rows = _CsvStream(f1), _CsvStream(f2)
        for s in tqdm(range(0, len(index), bs), desc="evaluate", disable=quiet(), unit="batch"):
            rows = index[s:s + bs]
            gen = torch.from_numpy(np.asarray(fake[s:s + bs], dtype=np.float32))         # (B, S, S)
            if not torch.isfinite(gen).all():
                raise InputError(f"{Path(generated_dir) / 'fake.npy'}: NaN/Inf in slices {s}..{s + len(rows) - 1}")
            real = torch.from_numpy(np.asarray(store.images[rows], dtype=np.float32))    # (B, S, S)
            masks = torch.from_numpy(np.asarray(store.masks[rows]).astype(np.int64))     # (B, S, S)
            cases, zs = case_of[rows].tolist(), z_of[rows].tolist()
            per_slice.write(paired.update(gen, real, masks, cases, zs))
            for kind, img in (("generated", gen), ("real", real)):
                pred, feats = seg.run(img)
                dice[kind].update(pred, masks, cases)
                seg_feats[kind].add(feats)
                if inception is not None:
                    inc_feats[kind].add(inception.features(img))
            nn_rows, sims = search.query(gen)
            _, real_sims = search.query(real)
            privacy.update("generated", sims)
            privacy.update("real", real_sims)
            ok = privacy.shareable(sims)
            priv_rows.write(pd.DataFrame({"case": cases, "z": zs, "nn_case": case_of[nn_rows],
                                          "nn_z": z_of[nn_rows], "similarity": sims,
                                          "real_similarity": real_sims, "shareable": ok}))
            shareable += [{"case": c, "z": int(z)} for c, z, k in zip(cases, zs, ok) if k]

        metrics: dict = {"n_test_slices": len(index), "n_test_cases": len(set(case_of[index]))}
        metrics.update(paired.summary())
        nulls: dict[str, str] = {}
        if inception is None:
            metrics["fid_inception"] = metrics["kid_inception"] = None
            nulls["fid_inception"] = nulls["kid_inception"] = notes["fid_inception"]
        else:
            _feature_distances(metrics, nulls, notes, inc_feats, "fid_inception", "kid_inception", params)
        _feature_distances(metrics, nulls, notes, seg_feats, "fd_seg", "kid_seg", params)
        dice_scores = {kind: acc.summary() for kind, acc in dice.items()}
        for kind in ("generated", "real"):
            for name, value in dice_scores[kind].items():
                metrics[f"dice_{kind}_{name}"] = value
            metrics[f"dice_{kind}_mean"] = float(np.mean(list(dice_scores[kind].values())))
        metrics.update(privacy.summary())
        metrics = {k: _clean(v) for k, v in metrics.items()}
        for k, v in metrics.items():
            if v is None and k not in nulls:
                nulls[k] = "undefined on this test set (e.g. structure absent from every test slice)"
        _write_tables(out, paired, dice, privacy)
        write_json(out / "shareable.json", {"threshold": privacy.threshold, "distance": search.distance,
                                            "n_generated": len(index), "n_shareable": len(shareable),
                                            "slices": shareable})
        notes.update({"privacy_distance": search.distance, "null_metrics": nulls,
                      "feature_dims": {"seg": seg.dim, "inception": 2048 if inception else None},
                      "definitions": {k: definition(k) for k in metrics}})
        write_json(out / "metrics_notes.json", notes)
        write_json(out / "metrics.json", metrics)
    log.info("evaluate: %d slices in %.1f s — ssim %.4f, mae_hu %.1f, fd_seg %s, dice_generated_mean %.3f",
             len(index), time.time() - t0, metrics["ssim"], metrics["mae_hu"], metrics["fd_seg"],
             metrics["dice_generated_mean"])
    return metrics


def _feature_distances(metrics: dict, nulls: dict, notes: dict, banks: dict, fd_key: str, kid_key: str,
                       params: Params) -> None:
    """Fréchet distance and KID between real and generated feature banks (piq), into ``metrics``.

    ``notes[<fd_key>_numerical_floor]`` records piq's FD of the real set with itself (0 in exact
    arithmetic; see ctsynth.metrics), so a reader can tell a small FD from the solver's floor.
    """
    real, gen = banks["real"].tensor(), banks["generated"].tensor()      # (N, D) each
    try:
        notes[f"{fd_key}_numerical_floor"] = _clean(frechet_distance(real, real.clone()))
    except MetricUnavailable:
        pass
    for key, compute in ((fd_key, lambda: frechet_distance(real, gen)),
                         (kid_key, lambda: kernel_distance(real, gen, params.evaluate.kid_subset_size,
                                                           seed=params.seed))):
        try:
            metrics[key] = compute()
        except MetricUnavailable as e:
            metrics[key], nulls[key] = None, str(e)


def _write_tables(out: Path, paired: PairedAccumulator, dice: dict, privacy: PrivacyAccumulator) -> None:
    """per_case.csv, per_structure.csv, plots/dice.csv, plots/privacy_hist.csv."""
    per_case = paired.per_case()
    for kind, acc in dice.items():
        scores = acc.per_case()
        for name in acc.labels.values():
            per_case[f"dice_{kind}_{name}"] = [scores[c][name] for c in per_case["case"]]
    write_csv(out / "per_case.csv", per_case)
    per_struct = paired.per_structure()
    overall = {kind: acc.summary() for kind, acc in dice.items()}
    for kind in dice:
        per_struct[f"dice_{kind}"] = [overall[kind].get(s, np.nan) for s in per_struct["structure"]]
    write_csv(out / "per_structure.csv", per_struct)
    write_csv(out / "plots" / "dice.csv", pd.DataFrame(
        {"structure": list(overall["real"]), "generated": list(overall["generated"].values()),
         "real": list(overall["real"].values())}))
    write_csv(out / "plots" / "privacy_hist.csv", privacy.histogram())
