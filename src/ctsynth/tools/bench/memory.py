"""Peak resident memory of the train step loop and of the evaluate stage, for ``ctsynth bench``.

Each measurement runs in a fresh interpreter (``python -m ctsynth.tools.bench.memory SPEC``) so the
peak belongs to that work alone; set-up done in the child before the measured work (writing a
synthetic test set) is excluded by resetting the peak count first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctsynth.core.config import Params, TrackingCfg, load_params


def _status_mb() -> dict[str, float]:
    """The kB fields of ``/proc/self/status`` in MB ({} where there is no procfs)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM (ru_maxrss also counts the parent's at fork)."""
    return _status_mb().get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_split_mb() -> dict:
    """Current anonymous and file-backed resident memory (MB): memory-mapped inputs read so far
    count as file-backed pages, which the kernel reclaims under pressure."""
    status = _status_mb()
    return {f"{key[3:].lower()}_rss_mb_end": status[key] for key in ("RssAnon", "RssFile") if key in status}


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count from its current RSS (Linux: ``/proc/self/clear_refs``
    value 5), so set-up work is not charged to what is measured next. False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(spec: dict) -> None:
    """Subprocess body of a peak-memory run; prints one JSON line (peak RSS in MB)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    extra = {"import_rss_mb": peak_rss_mb()}
    params = load_params(spec["params"]) if spec.get("params") else Params()
    if spec["what"] == "train":                       # the default path's step loop, paper batch
        from ctsynth.core.accel import sync
        from ctsynth.tools.bench.training import default_path, make_trainer, paper_preset
        step = make_trainer(default_path(params, device), spec["size"], spec["batch"], device, spec["model"],
                            paper_preset()[1])
        for _ in range(spec["steps"]):
            step()
        sync(device)
    else:                                             # the evaluate stage on a synthetic test set
        import pandas as pd

        from ctsynth.data.store import ProcessedStore
        from ctsynth.evaluate import evaluate
        from ctsynth.segmenter.segmenter import SegUNet, save_segmenter
        root, w = Path(spec["root"]), params.segmenter.width
        cases = sorted(pd.read_csv(root / "processed" / "slices.csv", dtype={"case": str})["case"].unique())
        split = {"train": cases[: len(cases) // 2], "val": [], "test": cases[len(cases) // 2:]}
        (root / "split.json").write_text(json.dumps(split))
        store = ProcessedStore(root / "processed")
        rows = store.rows_for_cases(split["test"])[: spec["n_test"]]
        gen = root / "generated"
        gen.mkdir(exist_ok=True)
        fake = np.lib.format.open_memmap(gen / "fake.npy", "w+", np.float16, (len(rows),) + store.images.shape[1:])
        rng = np.random.default_rng(0)
        for i in range(len(rows)):                    # slice by slice: set-up memory stays flat too
            fake[i] = np.clip(store.images[rows[i]] + rng.normal(0, 0.05, fake.shape[1:]), -1, 1)
        fake.flush()
        del fake
        np.save(gen / "index.npy", rows.astype(np.int64))
        torch.manual_seed(0)
        save_segmenter(SegUNet(width=w), {"width": w, "image_size": store.image_size},
                       {"train_cases": split["train"]}, root / "segmenter.pt")
        params = dataclasses.replace(params, tracking=TrackingCfg(enabled=False))
        extra["setup_peak_rss_mb"], extra["peak_reset"] = peak_rss_mb(), reset_peak_rss()
        evaluate.run(params, root / "processed", root / "split.json", gen, root / "segmenter.pt", root / "reports")
        extra["n_test_slices"] = int(len(rows))
    if device.type == "cuda":
        extra["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), **extra, **rss_split_mb()}))


def bench_memory(what: str, spec: dict) -> dict:
    """Run :func:`child` in a fresh interpreter; a memory record."""
    spec = {"what": what, **spec}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ctsynth.tools.bench.memory", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "CI": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"bench: memory run of {what} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    keep = {k: spec[k] for k in ("size", "batch", "steps") if k in spec}
    return {"case": "memory", "what": what, **keep, **res, "wall_s": time.perf_counter() - t0}


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
