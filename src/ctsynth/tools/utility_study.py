"""The data-efficiency study: does synthetic data save real patients?

A grid the user runs on demand (``dvc repro studies/utility/dvc.yaml``; docs/experiments/
utility-study.md). Each **cell** is a number of real training patients ``n`` and a draw of *which*
``n`` (``default_rng([study.seed, n, draw])`` over the split's training patients; ``n`` = 0 means
all of them, one draw). In a cell, ``study.synthetic_cases`` new cases are synthesized from those
patients' masks only (the pipeline's generator: trained on the full training split, the scenario
of a generator shared by another site), and the evaluate stage's segmenter (``segmenter.*``; one
budget, ``study.iterations`` or ``segmenter.iterations``) is trained per training seed in arms:

* ``real``: the real slices of the ``n`` patients, no augmentation;
* ``classic``: the same with nnU-Net-style augmentation (``segmenter.augment: classic``), the
  baseline synthetic data must beat;
* ``synthetic@<share>``: classic augmentation, ``share`` of every batch from the synthetic slices
  (one arm per ``study.shares``; the share is chosen per ``n`` on the validation patients);
* ``pretrain``: half the budget on the synthetic slices, then half on the real ones (classic
  augmentation both), starting from the pre-trained weights;
* ``own-G@<share>`` (cells with ``n`` <= ``study.own_generator_max_n``): like ``synthetic@<share>``,
  but the synthetic cases come from a generator trained (``model.*``, ``train.*``) on the same
  ``n`` patients only: it separates "synthetic data helps" from "the generator knows more patients".

Every model is scored on the real validation and test patients (pixel counts per patient and
structure). The **summary** chooses on the validation patients (the share; the best synthetic arm)
and reports on the test patients: Dice per ``n`` and arm, the contrast of the best synthetic arm
with ``classic`` with a 95 % interval from a two-way bootstrap over replicates (draws x seeds) and
test patients, and how many real patients that is worth (the classic curve interpolated in log n).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ctsynth.core.config import Params
from ctsynth.core.errors import ConfigError, InputError
from ctsynth.core.io import write_csv, write_json, write_text
from ctsynth.data.split import load_split
from ctsynth.data.store import ProcessedStore
from ctsynth.evaluate.metrics import DiceAccumulator, reported_structures
from ctsynth.segmenter.segmenter import Segmenter, train_segmenter

log = logging.getLogger("ctsynth.tools.utility_study")

@dataclasses.dataclass
class StudyCfg:
    n_real: list = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 0])   # 0: all training patients
    draws: list = dataclasses.field(default_factory=lambda: [1, 2])   # which draws of n patients (n = all: 1)
    seeds: list = dataclasses.field(default_factory=lambda: [1, 2])             # segmenter training seeds
    shares: list = dataclasses.field(default_factory=lambda: [0.25, 0.5])       # synthetic share per batch
    synthetic_cases: int = 12               # synthetic cases per cell, from the drawn patients' masks
    iterations: int | None = None           # per arm; null: segmenter.iterations
    own_generator_max_n: int = 2            # cells with n <= this also train a generator on their n patients
    own_generator_share: float = 0.5        # ... and add the arm own-G@<share> (its synthetic cases, this share)
    seed: int = 7                           # draws of the patients and of the synthetic cases
    bootstrap: int = 2000                   # two-way bootstrap resamples of the summary's intervals


def load_study(path, n_train: int | None = None) -> StudyCfg:
    """The ``study`` section of ``path``, validated (every problem at once; exit 2 through the CLI)."""
    path = Path(path)
    raw = (yaml.safe_load(path.read_text()) or {}).get("study", {}) if path.is_file() else {}
    names = {f.name for f in dataclasses.fields(StudyCfg)}
    problems = [f"{path}: study.{k}: unknown key; allowed: {', '.join(sorted(names))}" for k in raw if k not in names]
    cfg = StudyCfg(**{k: v for k, v in raw.items() if k in names})
    ints = lambda v: isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)  # noqa: E731
    if not ints(cfg.n_real) or any(n < 0 for n in cfg.n_real):
        problems.append(f"{path}: study.n_real: a list of patient counts >= 1 (0: all), got {cfg.n_real}")
    elif n_train is not None and max(cfg.n_real) > n_train:
        problems.append(f"{path}: study.n_real: asks for {max(cfg.n_real)} real patients, the split has "
                        f"{n_train} training patients")
    if not ints(cfg.seeds):
        problems.append(f"{path}: study.seeds: a list of integer seeds, got {cfg.seeds}")
    if not (isinstance(cfg.shares, list) and cfg.shares and all(isinstance(x, (int, float)) and 0 <= x <= 1
                                                                 for x in cfg.shares)):
        problems.append(f"{path}: study.shares: synthetic shares per batch in [0, 1], got {cfg.shares}")
    if not isinstance(cfg.synthetic_cases, int) or cfg.synthetic_cases < 1:
        problems.append(f"{path}: study.synthetic_cases: must be >= 1 (the synthetic arms need cases), "
                        f"got {cfg.synthetic_cases}")
    if not ints(cfg.draws) or min(cfg.draws) < 1:
        problems.append(f"{path}: study.draws: a list of draw ids >= 1, got {cfg.draws}")
    if not isinstance(cfg.own_generator_max_n, int) or cfg.own_generator_max_n < 0:
        problems.append(f"{path}: study.own_generator_max_n: must be >= 0 (0: never), got {cfg.own_generator_max_n}")
    if not isinstance(cfg.own_generator_share, (int, float)) or not 0 <= cfg.own_generator_share <= 1:
        problems.append(f"{path}: study.own_generator_share: a synthetic share per batch in [0, 1], got "
                        f"{cfg.own_generator_share}")
    if cfg.iterations is not None and (not isinstance(cfg.iterations, int) or cfg.iterations < 2):
        problems.append(f"{path}: study.iterations: must be >= 2 or null, got {cfg.iterations}")
    if problems:
        raise ConfigError(problems)
    return cfg


def arms(cfg: StudyCfg) -> list[str]:
    return ["real", "classic", *(f"synthetic@{s:g}" for s in cfg.shares), "pretrain"]


def patients_for(cfg: StudyCfg, train: list[str], n: int, draw: int) -> list[str]:
    """The ``n`` training patients of a cell (all of them for ``n`` = 0 or ``n`` = all)."""
    if n in (0, len(train)):
        return sorted(train)
    rng = np.random.default_rng([cfg.seed, n, draw])
    return sorted(rng.choice(sorted(train), n, replace=False).tolist())


def patient_counts(model, store: ProcessedStore, rows: np.ndarray) -> dict[str, list]:
    """{patient: (3, 8) pixel counts Σ|P∩T|, Σ|P|, Σ|T| per label} of ``model`` on the store's rows."""
    seg = model if isinstance(model, Segmenter) else Segmenter(model.eval())
    acc = DiceAccumulator(reported_structures(store.structures))
    cases = store.slices.case.to_numpy()
    for s in range(0, len(rows), 64):
        r = rows[s:s + 64]
        images = torch.from_numpy(np.asarray(store.images[r], dtype=np.float32))
        masks = torch.from_numpy(np.asarray(store.masks[r]).astype(np.int64))
        acc.update(seg.predict(images), masks, cases[r].tolist())
    return {c: v.astype(int).tolist() for c, v in acc.counts.items()}


def _train_arm(arm: str, seg_cfg, seed: int, real, synth, iterations: int):
    classic = dataclasses.replace(seg_cfg, augment="classic", iterations=iterations)
    if arm == "real":
        return train_segmenter(dataclasses.replace(seg_cfg, augment="none", iterations=iterations), seed, [real],
                               desc=f"study {arm} s{seed}")[0]
    if arm == "classic":
        return train_segmenter(classic, seed, [real], desc=f"study {arm} s{seed}")[0]
    if arm.startswith(("synthetic@", "own-G@")):
        return train_segmenter(classic, seed, [real, synth], desc=f"study {arm} s{seed}",
                               share=float(arm.split("@")[1]))[0]
    half = dataclasses.replace(classic, iterations=iterations // 2)
    pre = train_segmenter(half, seed, [synth], desc=f"study pretrain s{seed}")[0]
    return train_segmenter(half, seed, [real], desc=f"study finetune s{seed}", init=pre)[0]


def run_cell(params: Params, study_path, n: int, draw: int, processed_dir, split_path, *, interim_dir,
             model_path, out_json) -> dict:
    """One cell of the grid: synthesize from the drawn patients, train every arm per seed, score."""
    t0 = time.time()
    split = load_split(split_path, need=("train", "test"))
    train = sorted(split["train"])
    cfg = load_study(study_path, len(train))
    if n not in cfg.n_real:
        raise ConfigError(f"{study_path}: n {n} is not in study.n_real {cfg.n_real}")
    record = {"n": n, "draw": draw, "n_train_total": len(train)}
    if draw not in cfg.draws:
        raise ConfigError(f"{study_path}: draw {draw} is not in study.draws {cfg.draws}")
    if (n in (0, len(train))) and draw != min(cfg.draws):     # all patients: one draw; the others repeat it
        write_json(out_json, {**record, "skipped": "n = all training patients: one draw"})
        return {}
    store = ProcessedStore(processed_dir)
    patients = patients_for(cfg, train, n, draw)
    real = (store, store.rows_for_cases(patients))
    iterations = cfg.iterations or params.segmenter.iterations
    scored = {"val": store.rows_for_cases(split.get("val") or []), "test": store.rows_for_cases(split["test"])}
    results, own = {}, n <= cfg.own_generator_max_n and n not in (0, len(train))
    with tempfile.TemporaryDirectory(prefix="ctsynth-study-") as tmp:
        synth_cfg = dataclasses.replace(params.synthesize, cases=cfg.synthetic_cases,
                                        seed=int(np.random.default_rng([cfg.seed, n, draw, 1]).integers(2**31)))
        pools = {"shared": _synthetic_pool(params, model_path, interim_dir, patients, synth_cfg, Path(tmp) / "shared")}
        if own:                               # a generator that saw only these n patients
            own_model = _train_own_generator(params, processed_dir, split, patients, Path(tmp) / "own-G")
            pools["own"] = _synthetic_pool(params, own_model, interim_dir, patients, synth_cfg, Path(tmp) / "own")
        todo = arms(cfg) + ([f"own-G@{cfg.own_generator_share:g}"] if own else [])
        for seed in cfg.seeds:
            for arm in todo:
                synth = pools["own" if arm.startswith("own-G@") else "shared"]
                net = _train_arm(arm, params.segmenter, seed, real, synth, iterations)
                results.setdefault(arm, {})[str(seed)] = {k: patient_counts(net, store, rows)
                                                          for k, rows in scored.items() if rows.size}
        synth = pools["shared"]
    out = {**record, "patients": patients, "n_real_slices": int(real[1].size), "n_synthetic_cases": cfg.synthetic_cases,
           "n_synthetic_slices": int(synth[1].size), "iterations": iterations, "seeds": cfg.seeds,
           "structures": list(reported_structures(store.structures).values()), "results": results,
           "wall_s": round(time.time() - t0, 1), "segmenter": dataclasses.asdict(params.segmenter)}
    write_json(out_json, out)
    log.info("study cell n=%d draw %d (%s): %d arms x %d seeds in %.0f s", n, draw, ", ".join(patients),
             len(results), len(cfg.seeds), out["wall_s"])
    return out


def _synthetic_pool(params: Params, model_path, interim_dir, patients: list[str], synth_cfg, work: Path):
    """``synth_cfg.cases`` cases warped from ``patients``' masks, drawn by the generator of
    ``model_path``, read back through ingest + preprocess: (store, all its rows)."""
    from ctsynth.synth import synthesize as syn
    from ctsynth.utility.utility import synthetic_store

    model, meta = syn.load_model(model_path)
    syn.check_model_structures(meta, params.preprocess.structures, model_path)
    syn.synthesize_dataset(syn.MaskToCT(model, meta, batch_size=params.generate.batch_size),
                           syn.interim_sources(interim_dir, patients), synth_cfg, work / "synthetic",
                           params.data.label_map, suffixes=(params.data.image_suffix, params.data.label_suffix))
    store = synthetic_store(params, work / "synthetic", work)
    return store, np.arange(len(store.slices))


def _train_own_generator(params: Params, processed_dir, split: dict, patients: list[str], work: Path) -> Path:
    """The pipeline's generator config (``model.*``, ``train.*``) trained on ``patients`` only, in
    ``work`` (no MLflow run; checkpoints there too). Returns the model file."""
    from ctsynth.train import train

    work.mkdir(parents=True)
    own_split = work / "split.json"
    write_json(own_split, {**split, "train": list(patients)})
    quiet = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, enabled=False))
    train.run(quiet, processed_dir, own_split, work / "generator.pt", work / "checkpoints", work / "reports",
             run_file=work / "run.json")
    return work / "generator.pt"


# ------------------------------------------------------------------------------ the summary

def long_table(cells: list[dict]) -> pd.DataFrame:
    """One row per (n, draw, seed, arm, set, patient): mean Dice over the structures present."""
    rows = []
    for c in cells:
        if "results" not in c:
            continue
        n = c["n_train_total"] if c["n"] == 0 else c["n"]
        for arm, per_seed in c["results"].items():
            for seed, per_set in per_seed.items():
                for which, per_patient in per_set.items():
                    for patient, counts in per_patient.items():
                        inter, pred, true = (np.asarray(x, float) for x in counts)
                        present = true[1:] > 0
                        dice = 2 * inter[1:] / np.maximum(pred[1:] + true[1:], 1)
                        rows.append({"n": n, "draw": c["draw"], "seed": int(seed), "arm": arm, "set": which,
                                     "patient": patient, "dice": float(dice[present].mean()) if present.any()
                                     else np.nan, **{f"dice_{s}": float(d) if p else np.nan for s, d, p in
                                                     zip(c["structures"], dice, present)}})
    return pd.DataFrame(rows)


def two_way_bootstrap(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (replicates R x patients P), resampling
    replicates and patients independently (both sources of spread at once)."""
    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    R, P = v.shape
    means = np.array([v[np.ix_(rng.integers(0, R, R), rng.integers(0, P, P))].mean() for _ in range(n_boot)])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _matrix(table: pd.DataFrame, n: int, arm: str, which: str) -> np.ndarray:
    """Replicates (draw, seed) x patients of mean Dice."""
    sub = table[(table.n == n) & (table.arm == arm) & (table.set == which)]
    return sub.pivot_table(index=["draw", "seed"], columns="patient", values="dice").to_numpy()


def worth(curve: pd.Series, n: int, value: float) -> float | None:
    """Real patients the classic arm needs to reach ``value`` (log-linear in n between points),
    minus ``n``; None when it never does within the grid."""
    xs, ys = np.log(curve.index.to_numpy(float)), curve.to_numpy(float)
    if value <= ys[0]:
        return float(np.exp(xs[0]) - n) if value >= ys[0] else None
    for i in range(1, len(xs)):
        if ys[i] >= value > ys[i - 1] or (ys[i - 1] >= value >= ys[i]):
            f = (value - ys[i - 1]) / (ys[i] - ys[i - 1]) if ys[i] != ys[i - 1] else 0.0
            return float(np.exp(xs[i - 1] + f * (xs[i] - xs[i - 1])) - n)
    return None


def summarize(cells_dir, out_dir, study_path, params: Params | None = None, publish=None) -> dict:
    """Read every cell; write curve.csv, contrasts.csv, per_structure.csv, summary.json, results.md
    and curve.png into ``out_dir``; log them to MLflow (with ``params``: its tracking section);
    with ``publish``, also write there what the pipeline's report leads with (:func:`published`);
    return the summary."""
    cfg = load_study(study_path)
    cells = [json.loads(p.read_text()) for p in sorted(Path(cells_dir).glob("*.json"))]
    table = long_table(cells)
    if table.empty:
        raise InputError(f"{cells_dir}: no study cell with results (run the cell stages first)")
    ns = sorted(table.n.unique())
    chosen, curve, contrasts, per_structure = {}, [], [], []
    for n in ns:
        val = table[(table.n == n) & (table.set == "val")].groupby("arm").dice.mean()
        shares = [a for a in val.index if a.startswith("synthetic@")]
        share_arm = max(shares, key=lambda a: val[a]) if shares else None
        candidates = [a for a in (share_arm, "pretrain") if a in val.index]      # the shared generator's arms
        best = max(candidates, key=lambda a: val[a]) if candidates else None
        chosen[int(n)] = {"share_arm": share_arm, "best_synthetic": best,
                          "val_dice": {a: round(float(v), 4) for a, v in val.items()}}
        for arm in sorted(table[table.n == n].arm.unique()):
            m = _matrix(table, n, arm, "test")
            lo, hi = two_way_bootstrap(m, cfg.bootstrap, cfg.seed)
            curve.append({"n": int(n), "arm": arm, "dice": float(m.mean()), "lo": lo, "hi": hi,
                          "sd_replicates": float(m.mean(1).std(ddof=1)) if m.shape[0] > 1 else np.nan,
                          "replicates": m.shape[0], "test_patients": m.shape[1]})
            sub = table[(table.n == n) & (table.arm == arm) & (table.set == "test")]
            per_structure.append({"n": int(n), "arm": arm, **{c[5:]: round(float(sub[c].mean()), 4)
                                                               for c in sub.columns if c.startswith("dice_")}})
        owns = [a for a in val.index if a.startswith("own-G@")]
        for arm, minus in [(best, "classic")] + [(a, "classic") for a in owns] + [(a, share_arm) for a in owns]:
            if arm is None or minus is None:
                continue
            diff = _matrix(table, n, arm, "test") - _matrix(table, n, minus, "test")
            lo, hi = two_way_bootstrap(diff, cfg.bootstrap, cfg.seed)
            contrasts.append({"n": int(n), "arm": arm, "minus": minus, "gain": float(diff.mean()), "lo": lo,
                              "hi": hi, "excludes_0": bool(lo > 0 or hi < 0)})
    curve, contrasts = pd.DataFrame(curve), pd.DataFrame(contrasts)
    classic = curve[curve.arm == "classic"].set_index("n").dice.sort_index()
    contrasts["worth_patients"] = None
    for i, row in contrasts.iterrows():
        if row.minus != "classic":
            continue
        best_dice = curve[(curve.n == row.n) & (curve.arm == row.arm)].dice.iloc[0]
        contrasts.loc[i, "worth_patients"] = worth(classic, row.n, best_dice)
    sentence = lead_sentence(contrasts.to_dict("records")) or "no synthetic arm was run"
    out = Path(out_dir)
    write_csv(out / "curve.csv", curve.round(5))
    write_csv(out / "contrasts.csv", contrasts.round(5))
    write_csv(out / "per_structure.csv", pd.DataFrame(per_structure))
    summary = {"sentence": sentence, "chosen_on_validation": chosen, "n_cells": len(cells),
               "wall_s_cells": round(sum(c.get("wall_s", 0) for c in cells), 1),
               "study": dataclasses.asdict(cfg), "iterations": sorted({c.get("iterations") for c in cells
                                                                        if "iterations" in c})}
    write_json(out / "summary.json", summary)
    write_text(out / "results.md", _markdown(curve, contrasts, chosen, sentence, summary))
    _figure(curve, contrasts, out / "curve.png")
    if publish is not None:
        write_json(Path(publish), published(summary, curve, contrasts))
    if params is not None:
        from ctsynth.core.tracking import log_study
        metrics = {f"dice/{mlflow_name(r.arm)}/n{r.n}": r.dice for r in curve.itertuples()}
        metrics.update({f"gain_over_classic/n{r.n}": r.gain for r in contrasts.itertuples()})
        log_study(params, "utility-study", dataclasses.asdict(cfg), metrics,
                  [out / f for f in ("summary.json", "results.md", "curve.csv", "contrasts.csv", "curve.png")])
    log.info("study: %s", sentence)
    return summary


def published(summary: dict, curve: pd.DataFrame, contrasts: pd.DataFrame) -> dict:
    """What the pipeline's report shows of the study (``studies/utility/published.json``, a git-tracked
    dependency of the report stage, so a new study result makes the report stale and nothing else):
    the sentence, the set it was measured on, the curve and the contrasts with classic augmentation."""
    keep = ["n", "arm", "minus", "gain", "lo", "hi", "excludes_0", "worth_patients"]
    return {"study": "utility", "sentence": summary["sentence"],
            "measured_on": "test patients; share and best synthetic arm chosen on the validation patients",
            "iterations": summary["iterations"], "n_cells": summary["n_cells"],
            "details": "studies/utility/results/results.md, docs/experiments/utility-study.md",
            "curve": curve[["n", "arm", "dice", "lo", "hi"]].round(4).to_dict("records"),
            "contrasts": contrasts[[c for c in keep if c in contrasts]].round(4).to_dict("records")}


def mlflow_name(arm: str) -> str:
    """An arm's name as MLflow accepts it in a metric name (no '@'): synthetic@0.5 -> synthetic_share0.5."""
    return arm.replace("@", "_share")


def lead_sentence(contrasts: list[dict]) -> str | None:
    """The study's answer by one stated rule, not its best cell: the chosen synthetic arm against
    classic augmentation at *every* number of real patients, grouped by what the interval says
    (helps: above 0; costs: below 0; not resolved), then the strongest caveat: what a generator
    trained only on those real patients (own-G) adds at the smallest n it was run at. None without
    contrasts."""
    frame = pd.DataFrame(contrasts or [])
    if frame.empty or "minus" not in frame:
        return None
    main = frame[(frame.minus == "classic") & ~frame.arm.str.startswith("own-G@")].sort_values("n")
    if main.empty:
        return None

    def cell(r) -> str:
        return f"{r.gain:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}] at {int(r.n)}"

    groups = [("helps", main[main.lo > 0]), ("costs Dice", main[main.hi < 0]),
              ("is not resolved", main[(main.lo <= 0) & (main.hi >= 0)])]
    parts = [f"{what} at {'/'.join(str(int(n)) for n in g.n)} real patient(s) "
             f"({'; '.join(cell(r) for r in g.itertuples())})" for what, g in groups if not g.empty]
    text = ("Against classic augmentation, synthetic data (the arm chosen on validation at each n) "
            + ", ".join(parts) + " (Dice, 95 % over draws, seeds and test patients).")
    own = frame[frame.arm.str.startswith("own-G@") & (frame.minus == "classic")].sort_values("n")
    if not own.empty:
        r = own.iloc[0]
        text += (f" Caveat: with a generator trained only on the user's own {int(r.n)} patient(s), the gain is "
                 f"{r.gain:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}]: the gain above needs a generator trained on more "
                 f"patients than the user has.")
    return text


def _markdown(curve, contrasts, chosen, sentence, summary) -> str:
    order = [a for a in ("real", "classic") if a in set(curve.arm)]
    order += sorted(a for a in set(curve.arm) if a.startswith("synthetic@")) + [a for a in ("pretrain",)
                                                                                  if a in set(curve.arm)]
    order += sorted(a for a in set(curve.arm) if a.startswith("own-G@"))
    lines = ["# Utility study: results", "", f"**{sentence}**", "",
             "Test patients; choices (share, best synthetic arm) made on the validation patients. Mean Dice "
             "over structures, mean over replicates (draws x seeds) and test patients, 95 % two-way bootstrap "
             "interval.", "", "| n real | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for n, sub in curve.groupby("n"):
        cells = {r.arm: f"{r.dice:.3f} [{r.lo:.3f}, {r.hi:.3f}]" for r in sub.itertuples()}
        lines.append(f"| {n} | " + " | ".join(cells.get(a, "") for a in order) + " |")
    lines += ["", "Contrasts (test patients): the best synthetic arm of the shared generator (chosen on validation) "
              "minus classic augmentation, and, where it ran, the own-generator arm minus classic and minus the "
              "shared generator's chosen arm.", "",
              "| n real | arm | minus | difference | 95 % | excludes 0 | worth (patients) |",
              "|---|---|---|---|---|---|---|"]
    for r in contrasts.itertuples():
        w = "" if r.worth_patients is None or not np.isfinite(r.worth_patients) else f"{r.worth_patients:+.1f}"
        lines.append(f"| {r.n} | {r.arm} | {r.minus} | {r.gain:+.4f} | [{r.lo:+.4f}, {r.hi:+.4f}] | "
                     f"{r.excludes_0} | {w} |")
    lines += ["", f"Cells: {summary['n_cells']}, {summary['wall_s_cells'] / 60:.1f} min of cell time; "
              f"segmenter iterations per arm: {summary['iterations']}.", ""]
    return "\n".join(lines)


def _figure(curve: pd.DataFrame, contrasts: pd.DataFrame, path: Path) -> None:
    """Left: Dice per arm against the number of real patients (bands: 95 %). Right: the paired
    contrasts (same replicates and patients) with their 95 % intervals: the question itself, which the
    overlapping bands of the left panel cannot answer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(curve.n.unique())
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.25, 1]})
    colours = {arm: f"C{i}" for i, arm in enumerate(sorted(curve.arm.unique()))}
    for arm, sub in curve.sort_values("n").groupby("arm"):
        ax.plot(sub.n, sub.dice, "-o", color=colours[arm], label=arm + (" (95 %)" if arm == "classic" else ""),
                ms=4, lw=2.2 if arm == "classic" else 1.2)
        if arm == "classic":                  # the baseline's band only: six overlapping bands hide the lines
            ax.fill_between(sub.n, sub.lo, sub.hi, color=colours[arm], alpha=0.15)
    ax.set(xlabel="real training patients", ylabel="Dice on real test patients (mean over structures)",
           title="Dice per arm")
    ax.legend(fontsize=8)
    if len(contrasts):
        labels = (contrasts.arm.str.replace(r"@.*", "", regex=True) + " − "
                  + contrasts.minus.str.replace(r"@.*", "", regex=True))
        # side by side on the log axis, centred on n among the contrasts at that n
        shift = 1.07 ** (contrasts.groupby("n").cumcount() - (contrasts.groupby("n").n.transform("size") - 1) / 2)
        for label, sub in contrasts.groupby(labels, sort=False):
            colour = colours.get(sub.arm.iloc[0], "k")
            bx.errorbar(sub.n * shift[sub.index], sub.gain, yerr=[sub.gain - sub.lo, sub.hi - sub.gain], fmt="o", ms=5,
                        color=colour, mfc=colour if label.endswith("classic") else "white", capsize=3,
                        label=label + (" (best arm on validation)" if not label.startswith("own-G") else ""))
        bx.legend(fontsize=7)
    bx.axhline(0, color="k", lw=0.8)
    bx.set(xlabel="real training patients", ylabel="Dice difference (paired)",
           title="Does it beat classic augmentation? (95 %)")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xticks(ns, [str(n) for n in ns])
        a.grid(alpha=.3)
    fig.suptitle("Does synthetic data save real patients? Test patients", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from ctsynth.core.io import atomic_file
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
