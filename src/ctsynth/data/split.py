"""split: patient-level train/val/test split of the processed cases -> ``data/split.json``.

Cases (patients), never slices, are assigned to a split: either from explicit lists
(``split.cases``) or by a seeded shuffle with the ``split.train/val/test`` fractions. The stage
asserts that no slice of a test (or val) case can reach training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ctsynth.core.config import Params
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.io import write_json
from ctsynth.data.store import ProcessedStore

log = logging.getLogger("ctsynth.data.split")
SPLITS = ("train", "val", "test")


def assign(cases: list[str], params: Params) -> dict[str, list[str]]:
    """Return {train, val, test} case lists (sorted) for the processed ``cases``."""
    cfg = params.split
    if cfg.cases is not None:
        given = {k: [str(c) for c in cfg.cases.get(k) or []] for k in SPLITS}
        problems = []
        for k, names in given.items():
            unknown = sorted(set(names) - set(cases))
            if unknown:
                problems.append(f"split.cases.{k}: unknown case(s) {unknown}; processed cases: {sorted(cases)}")
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                both = sorted(set(given[a]) & set(given[b]))
                if both:
                    problems.append(f"split.cases: {both} listed in both {a} and {b}")
        if problems:
            raise ConfigError(problems)
        return {k: sorted(v) for k, v in given.items()}
    n = len(cases)
    n_test = max(1, round(cfg.test * n))
    n_val = max(1, round(cfg.val * n)) if cfg.val > 0 else 0
    if n - n_test - n_val < 1:
        raise InputError(f"split: {n} case(s) cannot give train/val/test of "
                         f"{cfg.train}/{cfg.val}/{cfg.test} with at least one training case")
    order = np.random.default_rng(params.seed).permutation(sorted(cases))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": sorted(map(str, train)), "val": sorted(map(str, val)), "test": sorted(map(str, test))}


def load_split(path: str | Path, need: tuple[str, ...] = ()) -> dict:
    """Read a split file written by :func:`run`. InputError naming the file when it is missing,
    not JSON, lacks a non-empty list for a key in ``need``, or puts a case in two of train, val and
    test (every overlapping pair and its cases at once: a val case in training biases the noise
    floors and model selection as a test case in training biases the evaluation)."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found (run `dvc repro split`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable split file ({e})") from None
    if not isinstance(split, dict):
        raise InputError(f"{path}: not a split file (expected an object with train/val/test case lists)")
    empty = [k for k in need if not (isinstance(split.get(k), list) and split[k])]
    if empty:
        raise InputError(f"{path}: needs non-empty {' and '.join(repr(k) for k in empty)} case lists "
                         f"(run `dvc repro split`)")
    overlaps = [f"{path}: cases {both} are in both {a} and {b}"
                for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]
                if (both := sorted(set(split.get(a) or []) & set(split.get(b) or [])))]
    if overlaps:
        raise InputError(overlaps)
    return split


def run(params: Params, processed_dir: str | Path, out_path: str | Path) -> dict:
    store = ProcessedStore(processed_dir)
    cases = sorted(store.meta["cases"])
    split = assign(cases, params)
    rows = {k: store.rows_for_cases(split[k]) for k in SPLITS}
    # The guarantee the whole evaluation rests on: no held-out slice is a training slice.
    assert not set(split["train"]) & (set(split["test"]) | set(split["val"])), "case leak"
    assert not np.intersect1d(rows["train"], rows["test"]).size, "test slice in training rows"
    assert not np.intersect1d(rows["train"], rows["val"]).size, "val slice in training rows"
    result = {"seed": params.seed, **split, "slices": {k: int(len(v)) for k, v in rows.items()}}
    write_json(out_path, result)
    log.info("split: %s cases, %s slices -> %s",
             {k: len(split[k]) for k in SPLITS}, result["slices"], out_path)
    return result
