"""utility: does the synthetic labelled data help segmentation?

The evaluate stage's segmenter (:class:`ctsynth.segmenter.SegUNet`, same ``segmenter.*``
architecture and budget, same seed) trained three ways and scored on the *real* test slices:

* ``real``: real training slices only — the segmenter stage's model, reused;
* ``synthetic``: the synthetic cases of ``data/synthetic`` only;
* ``mixed``: real training + synthetic slices, drawn uniformly from both together.

The synthetic folder is read the way the pipeline reads any data — ``ingest`` + ``preprocess``
with the pipeline's params, into a temporary folder — so this stage also proves that
``data/synthetic`` is ingestible. Dice is pooled per structure over the test slices; the 95 %
intervals come from one patient-level bootstrap shared by the three models, so the paired
contrasts (``utility_ratio_synthetic`` = synthetic / real, ``utility_gain_mixed`` = mixed − real)
get intervals of their own.

Output: ``reports/utility.json`` (``metrics``, ``ci`` in the ``metrics_ci.json`` form, ``notes``),
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
from ctsynth.evaluate.bootstrap import cluster_weights, dice_replicates, percentile_interval
from ctsynth.evaluate.metrics import reported_structures
from ctsynth.evaluate.registry import SUFFIX
from ctsynth.evaluate.segmenter import check_segmenter, dice_accumulator, load_segmenter, train_segmenter

log = logging.getLogger("ctsynth.evaluate.utility")

KINDS = ("real", "synthetic", "mixed")


def synthetic_store(params: Params, synthetic_dir, work_dir: Path) -> ProcessedStore:
    """``ingest`` + ``preprocess`` of the synthetic folder with the pipeline's params."""
    from ctsynth.data import ingest, preprocess
    cfg = dataclasses.replace(params, data=dataclasses.replace(params.data, on_error="fail"))
    ingest.run(cfg, work_dir / "interim", raw_dir=synthetic_dir)
    preprocess.run(cfg, work_dir / "interim", work_dir / "processed")
    return ProcessedStore(work_dir / "processed")


def summarise(counts: dict[str, np.ndarray], cases: np.ndarray, labels: dict[int, str],
              n_boot: int, seed: int) -> tuple[dict, dict, pd.DataFrame]:
    """Pooled Dice per model and structure, their mean, and the paired contrasts, each with a
    patient-level 95 % interval (the same resamples for every model)."""
    idx = np.array(sorted(labels))
    names = [labels[i] for i in idx]
    point = {k: dice_replicates(np.ones((1, len(cases))), c)[0, idx] for k, c in counts.items()}  # (S,)
    W = cluster_weights(cases, n_boot, np.random.default_rng(seed)) if n_boot else np.zeros((0, len(cases)))
    reps = {k: dice_replicates(W, c)[:, idx] for k, c in counts.items()}                          # (B, S)
    metrics, ci, rows = {}, {}, []

    def add(key, value, replicates, model, structure):
        metrics[key] = round(float(value), 6)
        lo, hi = percentile_interval(replicates) if n_boot else (None, None)
        if lo is not None:
            ci[key + SUFFIX] = {"lo": round(lo, 6), "hi": round(hi, 6)}
        if model:
            rows.append({"model": model, "structure": structure, "dice": metrics[key], "lo": lo, "hi": hi})

    for kind in counts:
        add(f"utility_dice_{kind}", point[kind].mean(), reps[kind].mean(1), kind, "mean")
        for j, name in enumerate(names):
            add(f"utility_dice_{kind}_{name}", point[kind][j], reps[kind][:, j], kind, name)
    if {"real", "synthetic"} <= set(counts):
        add("utility_ratio_synthetic", point["synthetic"].mean() / point["real"].mean(),
            reps["synthetic"].mean(1) / reps["real"].mean(1), None, None)
    if {"real", "mixed"} <= set(counts):
        add("utility_gain_mixed", point["mixed"].mean() - point["real"].mean(),
            reps["mixed"].mean(1) - reps["real"].mean(1), None, None)
    return metrics, ci, pd.DataFrame(rows)


def run(params: Params, synthetic_dir, processed_dir, split_path, segmenter_path,
        out_json, out_csv) -> dict:
    """Train the synthetic-only and mixed segmenters, score all three on the real test slices."""
    store = ProcessedStore(processed_dir)
    split = load_split(split_path, need=("train", "test"))
    real_seg = load_segmenter(segmenter_path)
    check_segmenter(real_seg, store, split, segmenter_path)
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
            model, _ = train_segmenter(cfg, params.seed, pool, desc=f"segmenter ({kind})")
            counts[kind] = dice_accumulator(model.eval(), store, test_rows).per_slice()
        n_synth_cases = len(synth.meta["cases"])
    cases = store.slices.case.to_numpy()[test_rows]
    labels = reported_structures(store.structures)
    metrics, ci, table = summarise(counts, cases, labels, params.evaluate.bootstrap, params.seed)
    metrics.update({"utility_n_synthetic_cases": n_synth_cases, "utility_n_synthetic_slices": int(len(synth_rows)),
                    "utility_n_real_train_slices": int(len(train_rows))})
    notes = {"utility": f"segmenter ({cfg.iterations} steps, batch {cfg.batch_size}, width {cfg.width}, "
                        f"seed {params.seed}) trained on real training slices ({len(train_rows)}), synthetic "
                        f"slices ({len(synth_rows)} from {n_synth_cases} cases) or both; Dice on the "
                        f"{len(test_rows)} real test slices of {len(set(cases))} patients, pooled per "
                        f"structure; 95 % intervals from {params.evaluate.bootstrap} patient-level resamples "
                        f"shared by the three models"}
    write_csv(out_csv, table)
    write_json(out_json, {"metrics": metrics, "ci": ci, "notes": notes})
    log.info("utility: Dice on real test slices — real-only %.3f, synthetic-only %.3f (%.2f× real), "
             "real + synthetic %.3f (%+.3f)", metrics["utility_dice_real"], metrics["utility_dice_synthetic"],
             metrics["utility_ratio_synthetic"], metrics["utility_dice_mixed"], metrics["utility_gain_mixed"])
    return metrics
