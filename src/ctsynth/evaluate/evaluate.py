"""evaluate: paired image metrics, feature distances with noise floors, segmentation
consistency and privacy of the generated test set, with 95 % intervals, written as DVC metrics.

Inputs (docs/contracts.md): the processed store, ``data/split.json``, ``data/generated/fake.npy``
(float16 (N, S, S) in [-1, 1]) with ``index.npy`` (int64 store rows, aligned), and
``models/segmenter.pt``. One pass over the generated slices in batches of
``evaluate.batch_size``; per batch:

* paired metrics (MSE, PSNR, SSIM, MAE in HU, per-structure MAE) → running sums
  (:class:`~ctsynth.evaluate.metrics.PairedAccumulator`), per-slice values streamed to
  ``reports/plots/per_slice.csv``;
* segmenter on generated and on real slices → Dice running counts and encoder features
  (N × D floats kept for FD/KID); InceptionV3 features when weights could be had;
* nearest training slice of each generated and real slice (:mod:`ctsynth.privacy`) → rows
  streamed to ``reports/privacy.csv``, counts and histogram accumulated.

Then one pass over the real *validation* slices gives the noise floors: FD/KID between real
validation and real test slices (``<key>_floor``, "as good as real") and between real
validation and generated test slices (``<key>_vs_val``, the same comparison). Then the test
slices are reassembled into one volume per case (:mod:`ctsynth.evaluate.throughplane`): adjacent-slice
consistency, through-plane gradient and the tri-planar Fréchet distances. Finally the
patient-level bootstrap (:mod:`ctsynth.evaluate.intervals`) turns the per-slice statistics kept on the
way (O(N × 44) numbers) into 95 % intervals: ``reports/metrics_ci.json`` and per-case columns.

So memory is flat in the number of test slices except the N × D feature matrices, a few
numbers per slice and the list of shareable (case, z) pairs. Every output is written
atomically; ``metrics.json`` holds only numbers (or null), ``metrics_ci.json`` the intervals
``{"<metric>_ci95": {"lo", "hi"}}``, reasons and definitions go to ``metrics_notes.json``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ctsynth.core.accel import runtime_record
from ctsynth.core.config import Params
from ctsynth.core.errors import InputError, MetricUnavailable
from ctsynth.core.io import atomic_file, write_csv, write_json
from ctsynth.core.paths import GENERATED_PROVENANCE, HEART_ONLY
from ctsynth.core.progress import quiet
from ctsynth.data import modality
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate import realism, validation
from ctsynth.evaluate.inception import InceptionFeatures
from ctsynth.evaluate.intervals import PER_CASE_KEYS, FeatureSpace, describe, metric_intervals, per_case_intervals
from ctsynth.evaluate.metrics import (
    DATA_RANGE,
    DiceAccumulator,
    FeatureBank,
    PairedAccumulator,
    frechet_distance,
    kernel_distance,
    reported_structures,
)
from ctsynth.evaluate.nearest import NearestTrainingSearch, PrivacyAccumulator, privacy_rule, reference_similarities
from ctsynth.evaluate.registry import SUFFIX
from ctsynth.evaluate.results import Interval, Results, clean
from ctsynth.evaluate.throughplane import body_mask, case_volumes, evaluate_volumes, per_case_table, ratio_intervals
from ctsynth.segmenter.segmenter import check_segmenter, load_segmenter

log = logging.getLogger("ctsynth.evaluate.evaluate")


def load_generated(generated_dir: str | Path, store: ProcessedStore, cases: list[str], what: str = "test",
                   exact: bool = False):
    """Open fake.npy (memory-mapped) and index.npy; check them against the store and the split's
    ``what`` cases (no other case; ``exact``: every one of them too). The generate stage writes the
    test set in its folder and the validation set in ``val/``."""
    gen = Path(generated_dir)
    missing = [f"{gen / n}: missing (run `dvc repro generate`)" for n in ("fake.npy", "index.npy")
               if not (gen / n).exists()]
    if missing:
        raise InputError(missing)
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
        found = sorted(set(store.slices["case"].to_numpy()[index]))
        leaked = sorted(set(found) - set(cases))
        if leaked or (exact and found != sorted(cases)):
            problems.append(f"{gen}: slices of cases {found}, the split's {what} cases are {sorted(cases)} "
                            f"(non-{what} case(s) {leaked}); rerun `dvc repro generate`")
    if problems:
        raise InputError(problems)
    return fake, index.astype(np.int64)


def merge_utility(path, res: Results, notes: dict) -> None:
    """The utility stage's metrics, intervals and notes into this evaluation's."""
    path = Path(path)
    try:
        blob = json.loads(path.read_text())
        values = dict(blob["metrics"])
        intervals = {k.removesuffix(SUFFIX): Interval(v["lo"], v["hi"]) for k, v in blob.get("ci", {}).items()}
        res.update(values, blob.get("null_reasons"))
        res.add_intervals(intervals)
        notes.update(blob.get("notes", {}))
    except FileNotFoundError:
        raise InputError(f"{path}: not found (run `dvc repro utility`)") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not a utility stage result ({type(e).__name__}: {e})") from None


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


def _open_inception(setting, notes: dict):
    """InceptionFeatures for ``evaluate.inception_weights``, or None with the reason in ``notes``."""
    try:
        inception = InceptionFeatures(setting)
        kind = "standard FID weights, torch hub" if inception.standard else "local file"
        notes["fid_inception"] = f"InceptionV3 ({inception.flavour}, {kind}) from {inception.path}"
        return inception
    except MetricUnavailable as e:
        notes["fid_inception"] = str(e)
        log.warning("%s", e)
        return None


class _TestPass:
    """Everything gathered in the one pass over the generated test slices."""

    def __init__(self, params: Params, store: ProcessedStore, split: dict, with_inception: bool, n_queries: int):
        labels = reported_structures(store.structures)
        self.paired = PairedAccumulator(store.meta["hu_window"], store.structures)
        self.texture = realism.TextureAccumulator(store.meta["hu_window"], labels, modality.unit(store.meta) == "HU")
        self.dice = {"generated": DiceAccumulator(labels), "real": DiceAccumulator(labels)}
        self.feats = {space: {"generated": FeatureBank(), "real": FeatureBank()}
                      for space in (("seg", "inception") if with_inception else ("seg",))}
        val_rows = store.rows_for_cases(split.get("val") or [])      # the threshold's reference: unseen patients
        self.search = NearestTrainingSearch(store.images, store.rows_for_cases(split["train"]),
                                            params.privacy.downsample, params.privacy.candidates,
                                            hu_window=store.meta["hu_window"], budget=params.privacy.exhaustive_budget,
                                            n_queries=n_queries + val_rows.size,
                                            body_hu=modality.body_level(store.meta))
        self.rule = privacy_rule(reference_similarities(self.search, store.images, val_rows),
                                 params.privacy.quantile, params.privacy.max_similarity)
        self.privacy = PrivacyAccumulator(self.rule.threshold)
        self.shareable: list[dict] = []


def _test_pass(params: Params, store: ProcessedStore, split: dict, fake, index, generated_dir, *, seg,
               inception, out: Path) -> _TestPass:
    """Paired metrics, Dice, features and privacy of every generated test slice, in batches;
    per_slice.csv and privacy.csv are streamed to disk as they come."""
    acc = _TestPass(params, store, split, inception is not None, 2 * len(index))   # generated + real queries
    case_of, z_of = store.slices["case"].to_numpy(), store.slices["z"].to_numpy()
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
            per_slice.write(acc.paired.update(gen, real, masks, cases, zs))
            acc.texture.update(gen, real, masks, cases, body_mask(real.numpy(), store.meta["hu_window"],
                                                                  modality.body_level(store.meta)))
            for kind, img in (("generated", gen), ("real", real)):
                pred, feats = seg.run(img)
                acc.dice[kind].update(pred, masks, cases)
                acc.feats["seg"][kind].add(feats)
                if inception is not None:
                    acc.feats["inception"][kind].add(inception.features(img))
            nn_rows, sims = acc.search.query(gen)
            _, real_sims = acc.search.query(real)
            acc.privacy.update("generated", sims)
            acc.privacy.update("real", real_sims)
            ok = acc.privacy.shareable(sims)
            priv_rows.write(pd.DataFrame({"case": cases, "z": zs, "nn_case": case_of[nn_rows],
                                          "nn_z": z_of[nn_rows], "similarity": sims,
                                          "real_similarity": real_sims, "shareable": ok}))
            acc.shareable += [{"case": c, "z": int(z)} for c, z, k in zip(cases, zs, ok) if k]
    return acc


HEART_ONLY_KEYS = ("mse", "psnr", "ssim", "mae_hu", "dice_generated_mean")   # heart_only_<key> of the test


def heart_only_pass(params: Params, store: ProcessedStore, fake, index, seg) -> tuple[dict, dict]:
    """The generated test slices drawn from the heart masks alone (the paper's condition):
    ``heart_only_<key>`` for the paired metrics and the segmenter's mean Dice, and their patient
    intervals (the same resampling as the headline's). → (metrics, intervals)."""
    paired, dice = validation.paired_pass(store, fake, index, params.evaluate.batch_size, seg=seg,
                                          desc="evaluate (heart only)")
    values = {**paired.summary(), "dice_generated_mean": dice.mean()}
    found = metric_intervals(values, paired.per_slice(), {"generated": dice.per_slice()}, paired.labels, [], None,
                             n_boot=params.evaluate.bootstrap, seed=params.seed, method=params.evaluate.interval_method)
    return ({f"heart_only_{k}": values[k] for k in HEART_ONLY_KEYS},
            {f"heart_only_{k}": found[k] for k in HEART_ONLY_KEYS if k in found})


def _validation_features(store: ProcessedStore, split: dict, seg, inception, batch: int):
    """Features of the real validation slices (the reference set of the noise floors):
    ({space: (M, D) tensor}, case of each row); ({}, None) without validation cases."""
    rows = store.rows_for_cases(split.get("val") or [])
    if rows.size == 0:
        return {}, None
    banks = {"seg": FeatureBank(), **({"inception": FeatureBank()} if inception is not None else {})}
    for s in tqdm(range(0, rows.size, batch), desc="validation", disable=quiet(), unit="batch"):
        real = torch.from_numpy(np.asarray(store.images[rows[s:s + batch]], dtype=np.float32))  # (B, S, S)
        banks["seg"].add(seg.features(real))
        if inception is not None:
            banks["inception"].add(inception.features(real))
    return {k: b.tensor() for k, b in banks.items()}, store.slices["case"].to_numpy()[rows]


def run(params: Params, processed_dir, split_path, generated_dir, segmenter_path, out_dir,
        *, utility_path=None) -> dict:
    """Evaluate the generated test set; write every report file; return the metrics dict.

    ``utility_path``: the utility stage's JSON, merged into metrics.json / metrics_ci.json."""
    t0 = time.time()
    _pin_malloc_mmap_threshold()
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train", "test"))
    fake, index = load_generated(generated_dir, store, split["test"])
    seg = load_segmenter(segmenter_path)
    check_segmenter(seg, store, split, segmenter_path)
    notes: dict = {"data_range": f"PSNR/SSIM on images mapped to [0,1], data_range={DATA_RANGE} "
                                 f"= HU window {store.meta['hu_window']}; MSE in [-1,1] space"}
    inception = _open_inception(params.evaluate.inception_weights, notes)
    out = Path(out_dir)
    acc = _test_pass(params, store, split, fake, index, generated_dir, seg=seg, inception=inception, out=out)
    val_feats, val_cases = _validation_features(store, split, seg, inception, params.evaluate.batch_size)
    test_alone = Path(generated_dir) / HEART_ONLY
    test_alone = load_generated(test_alone, store, split["test"]) if test_alone.is_dir() else None
    val_scores, val_nulls, val_set, alone_sets = _validation(params, store, split, generated_dir, seg, test_alone)

    res, spaces = _metrics(params, store, index, acc, inception, val_feats, val_cases=val_cases, notes=notes)
    n_boot = params.evaluate.bootstrap
    labels = reported_structures(store.structures)
    z_metrics, z_nulls, z_sums = evaluate_volumes(case_volumes(store, fake, index), labels,
                                                  store.meta["hu_window"], inception, notes.get("fid_inception", ""),
                                                  body_hu=modality.body_level(store.meta))
    res.update(z_metrics, z_nulls)
    notes["throughplane"] = THROUGHPLANE_NOTE
    r_metrics, r_nulls, r_intervals = realism.evaluate(
        acc.texture, acc.paired.pixel_sums, labels, realism.slice_set(store, fake, index), val_set,
        params.realism, seed=params.seed, n_boot=n_boot, method=params.evaluate.interval_method,
        heart_only=alone_sets)
    res.update(r_metrics, r_nulls)
    res.add_intervals(r_intervals)
    if test_alone is not None:                           # the paper's condition: heart masks alone
        h_metrics, h_intervals = heart_only_pass(params, store, *test_alone, seg)
        res.update(h_metrics)
        res.add_intervals(h_intervals)
    else:
        alone_keys = [f"heart_only_{k}" for k in HEART_ONLY_KEYS] + list(realism.HEART_ONLY_C2ST)
        res.update(dict.fromkeys(alone_keys), dict.fromkeys(alone_keys, validation.NO_HEART_ONLY))
    notes["realism"] = realism.__doc__.split("\n\n")[0].replace("\n", " ")
    slices = acc.paired.per_slice()
    method = params.evaluate.interval_method
    res.add_intervals(metric_intervals(res.metrics(), slices, {k: d.per_slice() for k, d in acc.dice.items()},
                                       acc.paired.labels, spaces, val_cases, n_boot=n_boot, seed=params.seed,
                                       kid_subset=params.evaluate.kid_subset_size, method=method))
    res.add_intervals(ratio_intervals(z_sums, labels, n_boot, params.seed, method))
    if utility_path is not None:
        merge_utility(utility_path, res, notes)
    _write_tables(out, acc.paired, acc.dice, acc.privacy, per_case_intervals(slices, n_boot, params.seed),
                  per_case_table(z_sums))
    write_json(out / "shareable.json", {"threshold": acc.privacy.threshold, "rule": acc.rule.describe(),
                                        "distance": acc.search.distance,
                                        "n_generated": res.value("n_test_slices"),
                                        "n_shareable": len(acc.shareable), "slices": acc.shareable})
    n_val = None if val_cases is None else len(set(val_cases))
    notes.update({"privacy_distance": acc.search.distance, "privacy_threshold": acc.rule.describe(),
                  "intervals": describe(method, n_boot, params.seed, res.value("n_test_cases"), n_val),
                  "feature_dims": {"seg": seg.dim, "inception": 2048 if inception is not None else None}})
    notes["runtime"] = runtime_note(generated_dir, seg)
    notes["validation"] = {"about": validation.__doc__.split("\n\n")[0].replace("\n", " "), "null": val_nulls}
    write_json(out / "validation.json", val_scores)
    res.write(out, notes)
    log.info("evaluate: %d slices of %d test patients in %.1f s; headline (95 %% patient-level intervals; "
             "floor = real validation vs real test slices):\n%s", len(index), res.value("n_test_cases"),
             time.time() - t0, res.headline_text())
    return res.metrics()


def _validation(params: Params, store: ProcessedStore, split: dict, generated_dir, seg, test_alone):
    """The validation patients' scores (``val_*``: what defaults are chosen on) and the slice sets the
    classifier tests learn from: (scores, null reasons, validation set, (validation, test) heart-only
    sets or None). ``test_alone``: the test slices drawn from the heart masks alone, or None."""
    val_split = list(split.get("val") or [])
    if not val_split:
        return (*validation.empty(), None, None)
    val_fake, val_index = load_generated(Path(generated_dir) / "val", store, val_split, "validation", exact=True)
    alone = Path(generated_dir) / "val" / HEART_ONLY
    alone = load_generated(alone, store, val_split, "validation", exact=True) if alone.is_dir() else None
    scores, nulls = validation.score(store, val_fake, val_index, seg, params.evaluate.batch_size,
                                     params.evaluate.kid_subset_size, seed=params.seed,
                                     realism_cfg=params.realism, heart_only=alone)
    alone_sets = None
    if alone is not None and test_alone is not None:
        alone_sets = realism.slice_set(store, *alone), realism.slice_set(store, *test_alone)
    return scores, nulls, realism.slice_set(store, val_fake, val_index), alone_sets


def runtime_note(generated_dir, seg) -> dict:
    """Where each result was computed (:func:`ctsynth.core.accel.runtime_record`): the generator's
    training (from ``model.json`` of the generated folder), the segmenter's training, this stage.
    A repeat run gives the same bits only with the same records (docs/design.md, "Repeatability")."""
    path = Path(generated_dir) / GENERATED_PROVENANCE
    try:
        model = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        model = {}
    note = {"generator_trained_on": (model.get("generator") or {}).get("runtime"),
            "generated_on": model.get("generate_runtime"),
            "segmenter_trained_on": seg.train.get("runtime"),
            "evaluated_on": runtime_record("cpu")}
    missing = [k for k, v in note.items() if not v]
    note["about"] = ("CPU model, torch thread count and versions of each step; results repeat bit for bit "
                     "only where these match" + (f" (not recorded: {', '.join(missing)}: files written "
                                                 "before this was recorded)" if missing else ""))
    return note


def _metrics(params: Params, store: ProcessedStore, index, acc, inception, val_feats, *, val_cases,
             notes: dict) -> tuple[Results, list]:
    """The results of one test pass (values, reasons of null ones) and the feature spaces the
    intervals resample."""
    case_of = store.slices["case"].to_numpy()
    res = Results()
    res.update({"n_test_slices": len(index), "n_test_cases": len(set(case_of[index]))})
    if val_cases is not None:
        res.update({"n_val_slices": len(val_cases), "n_val_cases": len(set(val_cases))})
    res.update(acc.paired.summary())
    spaces = []
    if inception is None:
        res.set("fid_inception", None, notes["fid_inception"])
        res.set("kid_inception", None, notes["fid_inception"])
    else:
        spaces.append(_feature_distances(res, notes, acc.feats["inception"], val_feats.get("inception"),
                                         "fid_inception", "kid_inception", params=params))
    spaces.append(_feature_distances(res, notes, acc.feats["seg"], val_feats.get("seg"), "fd_seg", "kid_seg",
                  params=params))
    dice_scores = {kind: d.summary() for kind, d in acc.dice.items()}
    for kind in ("generated", "real"):
        res.update({f"dice_{kind}_{name}": value for name, value in dice_scores[kind].items()},
                   {f"dice_{kind}_{name}": why for name, why in acc.dice[kind].absent().items()})
        res.set(f"dice_{kind}_mean", acc.dice[kind].mean(), DiceAccumulator.NONE_PRESENT)
    res.update({**acc.privacy.summary(), **acc.rule.summary()})
    res.explain_nulls("undefined on this test set (e.g. structure absent from every test slice)")
    return res, spaces


THROUGHPLANE_NOTE = (
    "through-plane metrics (zcons_*, zgrad_*, fd_tri_*, fid_tri_*) on each test case's slices "
    "reassembled into a volume on the processed grid (image_size² in-plane, one slice per stored z; "
    "real and generated on the same grid). fd_tri_rand_* use a fixed, seeded, untrained random CNN "
    "averaged over the 8 rotations/flips of each image: it has no preferred orientation, so axial, "
    "coronal and sagittal slices are described by the same function on equal terms. The segmenter's "
    "features are not used for this: it was trained on axial slices only, so coronal/sagittal slices "
    "are out of its distribution. fid_tri_inception_* use InceptionV3 (ImageNet-trained, not "
    "CT-orientation-specific) when weights are available.")

_NO_VAL = "no validation slices (split.val is empty): no noise floor"


def _feature_distances(res: Results, notes: dict, banks: dict, val, fd_key: str, kid_key: str,
                       *, params: Params) -> FeatureSpace:
    """Fréchet distance and KID between real and generated test features, and the noise floors
    beside them: ``<key>_floor`` = real validation vs real test slices (what 'as good as real'
    gets), ``<key>_vs_val`` = real validation vs generated test slices (the same comparison with
    the generated slices in their place). Into ``res``; returns the space for the intervals.

    ``notes[<fd_key>_numerical_floor]`` records the FD of the real set with itself (0 up to
    float64 rounding), so a reader can tell a small FD from the arithmetic's floor.
    """
    real, gen = banks["real"].tensor(), banks["generated"].tensor()      # (N, D) each
    try:
        notes[f"{fd_key}_numerical_floor"] = clean(frechet_distance(real, real.clone()))
    except MetricUnavailable:
        pass
    k, seed = params.evaluate.kid_subset_size, params.seed
    jobs = [(fd_key, lambda: frechet_distance(real, gen)),
            (kid_key, lambda: kernel_distance(real, gen, k, seed=seed))]
    if val is not None:
        jobs += [(fd_key + "_floor", lambda: frechet_distance(val, real)),
                 (kid_key + "_floor", lambda: kernel_distance(val, real, k, seed=seed, paired=False)),
                 (fd_key + "_vs_val", lambda: frechet_distance(val, gen)),
                 (kid_key + "_vs_val", lambda: kernel_distance(val, gen, k, seed=seed, paired=False))]
    else:
        for key in (fd_key, kid_key):
            res.set(key + "_floor", None, _NO_VAL)
            res.set(key + "_vs_val", None, _NO_VAL)
    for key, compute in jobs:
        try:
            res.set(key, compute())
        except MetricUnavailable as e:
            res.set(key, None, str(e))
    for key in (fd_key, kid_key):          # like with like: generated vs real test, same validation patients
        vs_val, floor = res.value(key + "_vs_val"), res.value(key + "_floor")
        if vs_val is not None and floor is not None:
            res.set(key + "_gap", vs_val - floor)
        else:
            why = _null_reason(res, key + "_vs_val") or _null_reason(res, key + "_floor") or _NO_VAL
            res.set(key + "_gap", None, why)
    return FeatureSpace(fd_key, kid_key, gen.numpy(), real.numpy(), None if val is None else val.numpy())


def _null_reason(res: Results, key: str) -> str | None:
    return res[key].null_reason if key in res else None


def _with_intervals(table: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    """Insert each ``<key>_ci95_lo/hi`` column pair right after the ``<key>`` column."""
    table = table.merge(intervals, on="case", how="left")
    order = [c for c in table.columns if c not in intervals.columns or c == "case"]
    for key in PER_CASE_KEYS:
        pair = [c for c in (f"{key}{SUFFIX}_lo", f"{key}{SUFFIX}_hi") if c in table.columns]
        if key in order and pair:
            at = order.index(key) + 1
            order[at:at] = pair
    return table[order + [c for c in table.columns if c not in order]]


def _write_tables(out: Path, paired: PairedAccumulator, dice: dict, privacy: PrivacyAccumulator,
                  case_intervals: pd.DataFrame, case_extra: pd.DataFrame | None = None) -> None:
    """per_case.csv (with per-case intervals and the through-plane ratios of ``case_extra``),
    per_structure.csv, plots/dice.csv, plots/privacy_hist.csv."""
    per_case = paired.per_case()
    if not case_intervals.empty:
        per_case = _with_intervals(per_case, case_intervals)
    if case_extra is not None and not case_extra.empty:
        per_case = per_case.merge(case_extra, on="case", how="left")
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
