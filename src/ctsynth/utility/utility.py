"""utility: does the synthetic labelled data help segmentation?

The evaluate stage's segmenter (:class:`ctsynth.segmenter.segmenter.SegUNet`, same ``segmenter.*``
architecture and budget, same seed) trained three ways and scored on the *real* test slices:

* ``real``: real training slices only — the segmenter stage's model, reused;
* ``synthetic``: the synthetic cases of ``data/synthetic`` only;
* ``mixed``: real training + synthetic slices, drawn uniformly from both together.

The synthetic folder is read the way the pipeline reads any data — ``ingest`` + ``preprocess``
with the pipeline's params, into a temporary folder — so this stage also proves that
``data/synthetic`` is ingestible. Dice is pooled per structure over the test slices; a structure
absent from their ground truth is not scored (null, with the reason) and every mean over
structures leaves it out. The 95 % intervals (:class:`ctsynth.evaluate.intervals.Resampling`,
``evaluate.interval_method``) resample the test patients, the same replicates for all three
models, so the paired contrasts (``utility_ratio_synthetic`` = synthetic / real,
``utility_gain_mixed`` = mixed − real) get intervals of their own. The reused real-only model must
have been trained with the current ``segmenter.*`` params and seed
(:func:`ctsynth.segmenter.segmenter.check_segmenter_params`), else the three are not comparable.
One training per model: the intervals hold patient sampling, not training noise; the seed spread
of the contrasts comes from ``ctsynth compare`` over ``segmenter.seed`` (docs/experiments/utility.md).

Output: ``reports/utility.json`` (``metrics``, ``ci`` in the ``metrics_ci.json`` form, ``notes``,
``null_reasons``: why each null metric is null),
merged into ``metrics.json`` / ``metrics_ci.json`` by the evaluate stage, and
``reports/utility.csv`` (model, structure, dice, lo, hi) for the report's bar chart.
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ctsynth.core.config import Params
from ctsynth.core.errors import InputError
from ctsynth.core.io import write_csv, write_json
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.bootstrap import dice_replicates
from ctsynth.evaluate.intervals import Resampling
from ctsynth.evaluate.metrics import DICE_ABSENT, DICE_NONE_PRESENT, dice_mean, reported_structures
from ctsynth.evaluate.registry import SUFFIX
from ctsynth.evaluate.results import fmt
from ctsynth.segmenter.segmenter import (
    check_segmenter,
    check_segmenter_params,
    dice_accumulator,
    load_segmenter,
    segmenter_seed,
    train_segmenter,
)

log = logging.getLogger("ctsynth.utility.utility")

KINDS = ("real", "synthetic", "mixed")


def synthetic_store(params: Params, synthetic_dir, work_dir: Path) -> ProcessedStore:
    """``ingest`` + ``preprocess`` of the synthetic folder with the pipeline's params (no anatomy: the
    segmenters and the privacy search read images and heart labels only)."""
    from ctsynth.core.config import AnatomyCfg
    from ctsynth.data import ingest, preprocess
    cfg = dataclasses.replace(params, data=dataclasses.replace(params.data, on_error="fail",
                                                               anatomy=AnatomyCfg(source="none")))
    ingest.run(cfg, work_dir / "interim", raw_dir=synthetic_dir)
    preprocess.run(cfg, work_dir / "interim", work_dir / "processed")
    return ProcessedStore(work_dir / "processed")


def _ratio(a, b):
    """a / b where b > 0, else NaN (no division warnings)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def summarise(counts: dict[str, np.ndarray], cases: np.ndarray, labels: dict[int, str],
              n_boot: int, seed: int, method: str = "jackknife") -> tuple[dict, dict, pd.DataFrame, dict]:
    """Pooled Dice per model and structure, their mean over the structures present, and the paired
    contrasts, each with a patient-level 95 % interval (the same resamples for every model).

    A structure absent from the test ground truth (Σ|T| = 0) cannot be scored: its Dice is null
    and every mean leaves it out (the three models share the test slices, so they leave out the
    same ones, in every resample too). Returns (metrics, ci, table, {null key: reason})."""
    idx = np.array(sorted(labels))
    names = [labels[i] for i in idx]
    point = {k: dice_replicates(np.ones((1, len(cases))), c)[0, idx] for k, c in counts.items()}  # (S,), NaN: absent
    rs = Resampling.build(method, cases, n_boot, seed) if n_boot else None    # see ctsynth.evaluate.intervals
    W = rs.W if rs is not None else np.zeros((0, len(cases)))
    reps = {k: dice_replicates(W, c)[:, idx] for k, c in counts.items()}                          # (B, S)
    means = {k: (dice_mean(point[k]), dice_mean(reps[k])) for k in counts}                       # (), (B,)
    metrics, ci, rows, reasons = {}, {}, [], {}

    def add(key, value, replicates, model, structure, reason):
        value = round(float(value), 6) if np.isfinite(value) else None
        metrics[key] = value
        if value is None:
            reasons[key] = reason
        interval = rs.interval(replicates) if rs is not None and value is not None else None
        lo, hi = (interval.lo, interval.hi) if interval is not None else (None, None)
        if lo is not None:
            ci[key + SUFFIX] = {"lo": round(lo, 6), "hi": round(hi, 6)}
        if model:
            rows.append({"model": model, "structure": structure, "dice": np.nan if value is None else value,
                         "lo": lo, "hi": hi})

    for kind in counts:
        add(f"utility_dice_{kind}", *means[kind], kind, "mean", DICE_NONE_PRESENT)
        for j, name in enumerate(names):
            add(f"utility_dice_{kind}_{name}", point[kind][j], reps[kind][:, j], kind, name, f"{name} {DICE_ABSENT}")
    if {"real", "synthetic"} <= set(counts):
        add("utility_ratio_synthetic", _ratio(means["synthetic"][0], means["real"][0]),
            _ratio(means["synthetic"][1], means["real"][1]), None, None,
            "utility_dice_real or utility_dice_synthetic is null, or utility_dice_real is 0")
    if {"real", "mixed"} <= set(counts):
        add("utility_gain_mixed", means["mixed"][0] - means["real"][0], means["mixed"][1] - means["real"][1],
            None, None, DICE_NONE_PRESENT)
    return metrics, ci, pd.DataFrame(rows), reasons


def run(params: Params, synthetic_dir, processed_dir, split_path, segmenter_path,
        out_json, *, out_csv) -> dict:
    """Train the synthetic-only and mixed segmenters, score all three on the real test slices."""
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train", "test"))
    real_seg = load_segmenter(segmenter_path)
    check_segmenter(real_seg, store, split, segmenter_path)
    check_segmenter_params(real_seg, params, segmenter_path)
    seed = segmenter_seed(params)             # the real-only model's: the three differ only in their data
    train_rows, test_rows = store.rows_for_cases(split["train"]), store.rows_for_cases(split["test"])
    if test_rows.size == 0:
        raise InputError(f"{split_path}: no test slices in {processed_dir}")
    cfg = params.segmenter
    counts = {"real": dice_accumulator(real_seg, store, test_rows).per_slice()}
    with tempfile.TemporaryDirectory(prefix="ctsynth-utility-") as tmp:
        synth = synthetic_store(params, synthetic_dir, Path(tmp))
        if synth.meta["image_size"] != store.image_size or synth.structures != store.structures:
            raise InputError(f"{synthetic_dir}: preprocessed to {synth.meta['image_size']}² "
                             f"{synth.structures}, the real store is {store.image_size}² {store.structures}")
        synth_rows = np.arange(len(synth.slices))
        pools = {"synthetic": [(synth, synth_rows)], "mixed": [(store, train_rows), (synth, synth_rows)]}
        for kind, pool in pools.items():
            log.info("utility: segmenter on %s slices (%s), %d iterations", kind,
                     " + ".join(str(len(r)) for _, r in pool), cfg.iterations)
            model, _ = train_segmenter(cfg, seed, pool, desc=f"segmenter ({kind})")
            counts[kind] = dice_accumulator(model.eval(), store, test_rows).per_slice()
        n_synth_cases = len(synth.meta["cases"])
    cases = store.slices.case.to_numpy()[test_rows]
    labels = reported_structures(store.structures)
    metrics, ci, table, reasons = summarise(counts, cases, labels, params.evaluate.bootstrap, params.seed,
                                            params.evaluate.interval_method)
    metrics.update({"utility_n_synthetic_cases": n_synth_cases, "utility_n_synthetic_slices": int(len(synth_rows)),
                    "utility_n_real_train_slices": int(len(train_rows))})
    notes = {"utility": f"segmenter ({cfg.iterations} steps, batch {cfg.batch_size}, width {cfg.width}, "
                        f"seed {seed}) trained on real training slices ({len(train_rows)}), synthetic "
                        f"slices ({len(synth_rows)} from {n_synth_cases} cases) or both; Dice on the "
                        f"{len(test_rows)} real test slices of {len(set(cases))} patients, pooled per "
                        f"structure; 95 % intervals over the test patients ({params.evaluate.interval_method}), "
                        f"the same replicates for the three models. This rests on ONE training per model (seed "
                        f"{seed}): the intervals do not hold training noise. The seed spread: `ctsynth compare run "
                        f"--seeds 1,2,3,4,5 --seed-key segmenter.seed` (docs/experiments/utility.md)"}
    absent = [name for name in labels.values() if f"utility_dice_real_{name}" in reasons]
    if absent:
        notes["utility_absent"] = (f"absent from the ground truth of the real test slices: {', '.join(absent)}; "
                                   f"their Dice is null (not scored) and every mean over structures leaves them out")
    write_csv(out_csv, table)
    write_json(out_json, {"metrics": metrics, "ci": ci, "notes": notes, "null_reasons": reasons})
    log.info("utility: Dice on real test slices — real-only %s, synthetic-only %s (%s× real), real + synthetic "
             "%s (%s)", *(fmt(metrics[f"utility_{k}"]) for k in ("dice_real", "dice_synthetic", "ratio_synthetic",
                                                                  "dice_mixed", "gain_mixed")))
    return metrics
