"""``ctsynth bench`` / ``python -m ctsynth.tools.bench.suite``: training, generation and loader speed, peak memory.

    ctsynth bench                # train 256² b1, 256² b4, 128² b8; generation; loader; memory
    ctsynth bench --quick        # the 256² batch-4 training pair and generation only
    python -m ctsynth.tools.bench.suite --compile --paths nchw_fused,bf16_cl   # extra paths beside the pair

Model: the paper preset's architecture, read from ``params/paper.yaml`` (7 down / 7 up without
skips as in the authors' config, ngf 64; PatchGAN 4+1, ndf 64; LSGAN + λ·L1, index condition,
paper learning rates). Training runs the real :func:`ctsynth.train.gan.gan_step` on a
fixed synthetic batch (the loader is measured on its own):

* ``baseline``: fp32, NCHW, eager, single-tensor Adam (``foreach=False, fused=False``), losses
  read on the host every step;
* ``default``: what the train stage does with ``params.yaml``'s TrainCfg: its precision,
  channels_last and compile, :func:`ctsynth.train.gan.make_optimizer`, no per-step host sync, and
  deterministic algorithms (``stage_main`` enables them).

Paths are timed interleaved (A B B A ...) so load from other processes biases none of them; the
median of the repeats is reported (warm-up and compilation excluded), with this process's CPU time
per step beside it (``cpu_ms_per_step``; with ``--threads 1`` it stays close to the idle wall time
on a busy machine, with more OpenMP threads it includes their spin-waiting). Other processes' CPU
use just before the start is recorded (``machine.cpu_busy_start``). Writes ``{"machine",
"records"}`` atomically to ``--out``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ctsynth.core.accel import clock, gemm_gflops, machine_info, pick_device
from ctsynth.core.config import Params, load_params
from ctsynth.core.io import write_json
from ctsynth.tools.bench.memory import bench_memory
from ctsynth.tools.bench.training import (  # noqa: F401
    BASELINE,
    EXTRA_PATHS,
    STRUCTURES,
    TrainPath,
    default_path,
    extra_path,
    make_trainer,
    paper_preset,
    synthetic_slices,
    write_store,
)

FULL_SIZES, QUICK_SIZES = [(256, 1), (256, 4), (128, 8)], [(256, 4)]
FULL_MEMORY = {"size": 256, "batch": 8, "steps": 3, "n_slices": 400, "n_test": [50, 200]}


def flops_per_image(size: int, device: torch.device, model: dict) -> dict:
    """Floating-point operations per image (convolutions and matrix products, torch's FlopCounterMode)
    of one training step (G and D forward and backward) and of one generator forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from ctsynth.core.labels import condition_channels
    from ctsynth.train.networks import build_generator

    batch, out = 2, {}
    step = make_trainer(BASELINE, size, batch, device, model, paper_preset()[1])
    with FlopCounterMode(display=False) as fc:
        step()
    out["train"] = fc.get_total_flops() / batch
    in_ch = condition_channels(STRUCTURES, model["encoding"])
    G = build_generator(model, in_ch).to(device).eval()
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        G(torch.zeros(batch, in_ch, size, size, device=device))
    out["generate"] = fc.get_total_flops() / batch
    return out


def roofline(sizes: list[int], device: torch.device, model: dict) -> list[dict]:
    """Measured fp32 and bf16 GEMM rates, and per image size the work per image and the
    throughput ceiling it implies (work / fastest GEMM rate): what no code path can exceed."""
    peaks = {p: gemm_gflops(device, dtype) for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    recs = [{"case": "gemm", "precision": p, "gflop_s": g} for p, g in peaks.items()]
    for size in sizes:
        f = flops_per_image(size, device, model)
        recs.append({"case": "flops", "size": size, "train_gflop_per_img": f["train"] / 1e9,
                     "generate_gflop_per_img": f["generate"] / 1e9,
                     "train_ceiling_img_s": max(peaks.values()) * 1e9 / f["train"],
                     "generate_ceiling_img_s": max(peaks.values()) * 1e9 / f["generate"]})
    return recs


def bench_train(paths: list[TrainPath], size: int, batch: int, repeats: int, device, model, *, hp,
                block_s: float = 1.5) -> list[dict]:
    """Time ``paths`` side by side (interleaved repeats of ~``block_s`` s); one record per path."""
    was_det = torch.are_deterministic_algorithms_enabled()
    trainers, first, steps = {}, {}, {}
    times = {p.name: [] for p in paths}
    cpu = {p.name: [] for p in paths}
    try:
        for p in paths:
            trainers[p.name] = make_trainer(p, size, batch, device, model, hp)
            first[p.name] = clock(trainers[p.name], device)               # includes compilation
            steps[p.name] = max(1, round(block_s / clock(trainers[p.name], device)))
        for r in range(repeats):
            for p in paths if r % 2 == 0 else paths[::-1]:
                times[p.name].append(clock(trainers[p.name], device, steps[p.name], cpu[p.name]))
    finally:
        torch.use_deterministic_algorithms(was_det, warn_only=True)
        torch.backends.mkldnn.enabled = True
    out = []
    for p in paths:
        med = statistics.median(times[p.name])
        rec = {"case": "train", "path": p.name, "size": size, "batch": batch, "img_per_s": batch / med,
               "ms_per_step": 1000 * med, "cpu_ms_per_step": 1000 * statistics.median(cpu[p.name]),
               "spread_ms": [1000 * min(times[p.name]), 1000 * max(times[p.name])], "repeats": repeats,
               "steps_per_repeat": steps[p.name], "settings": dataclasses.asdict(p)}
        if p.compile:
            rec["compile_s"] = first[p.name] - med
        out.append(rec)
    return out


def bench_generate(size: int, batch: int, repeats: int, device, model, n_batches: int = 2) -> dict:
    """Slices/s through :class:`ctsynth.synth.inference.MaskToCT` (inference_mode, channels_last)."""
    from ctsynth.core.labels import condition_channels
    from ctsynth.synth.inference import MaskToCT
    from ctsynth.train.networks import build_generator

    torch.manual_seed(0)
    G = build_generator(model, condition_channels(STRUCTURES, model["encoding"])).to(device).eval()
    synth = MaskToCT(G, {"image_size": size, "hu_window": [-1000.0, 1000.0], "structures": STRUCTURES,
                     "encoding": model["encoding"]}, batch_size=batch)
    _, masks = synthetic_slices(batch * n_batches, size, seed=2)
    synth.unit(masks[:batch])                                              # warm-up
    med = statistics.median(clock(lambda: synth.unit(masks), device) / len(masks) for _ in range(repeats))
    return {"case": "generate", "size": size, "batch": batch, "img_per_s": 1 / med,
            "ms_per_batch": 1000 * med * batch, "repeats": repeats}


def bench_loader(store_dir: Path, batch: int, repeats: int, params: Params, device, n_batches: int = 16) -> dict:
    """Slices/s of the training input path: SliceDataset + the train stage's DataLoader."""
    from torch.utils.data import DistributedSampler

    from ctsynth.data.store import ProcessedStore, SliceDataset, train_batches

    store = ProcessedStore(store_dir)
    ds = SliceDataset(store, np.arange(len(store.slices)), paper_preset()[0]["encoding"])
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    kw = {"num_workers": params.train_run.num_workers, "pin_memory": device.type == "cuda"}
    batches = train_batches(ds, sampler, batch, 0, **kw)
    next(batches)

    def pull():
        for _ in range(n_batches):
            for t in next(batches):
                t.to(device, non_blocking=True)
    med = statistics.median(clock(pull, device) for _ in range(repeats))
    return {"case": "loader", "size": store.image_size, "batch": batch, "img_per_s": batch * n_batches / med,
            "num_workers": params.train_run.num_workers, "repeats": repeats}


# ------------------------------------------------------------------------------ driver

def _fmt(r: dict) -> str:
    if r["case"] == "gemm":
        return f"{'gemm':9}{r['precision'] + ' matrix product':40}{r['gflop_s']:>8.1f} GFLOP/s"
    what, size = r.get("path") or r.get("what", ""), f"{r['size']}²"
    if r["case"] == "flops":
        return (f"{'flops':9}{'train step / generator':22}{size:>6}{'':6}{r['train_gflop_per_img']:>8.1f} / "
                f"{r['generate_gflop_per_img']:.1f} GFLOP per image; ceiling {r['train_ceiling_img_s']:.2f} / "
                f"{r['generate_ceiling_img_s']:.1f} img/s")
    if r["case"] == "ratio":
        ceiling = f"  (ceiling {r['ceiling_ratio']:.2f}x)" if "ceiling_ratio" in r else ""
        return f"{'ratio':9}{r['what']:22}{size:>6}{r['batch']:>6}{r['ratio']:>10.2f}x{ceiling}"
    if r["case"] == "memory":
        n = f", {r['n_test_slices']} test slices" if "n_test_slices" in r else ""
        n += f" (at the end {r['anon_rss_mb_end']:.0f} MB anonymous)" if "anon_rss_mb_end" in r else ""
        return f"{'memory':9}{what:22}{size:>6}{r.get('batch', ''):>6}{r['peak_rss_mb']:>10.0f} MB peak RSS{n}"
    tail = f"{r['ms_per_step']:>10.0f}{r['cpu_ms_per_step']:>10.0f}" if "ms_per_step" in r else ""
    note = f"  {100 * r['of_ceiling']:.0f}% of ceiling" if "of_ceiling" in r else ""
    note += f"  compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
    note += f"  ({r['x_train']:.0f}x default training)" if "x_train" in r else ""
    return f"{r['case']:9}{what:22}{size:>6}{r['batch']:>6}{r['img_per_s']:>10.2f}{tail}{note}"


def run_bench(sizes=None, repeats: int = 5, quick: bool = False, out: str | Path = "reports/bench.json",
              device: str = "auto", paths: tuple[str, ...] = (), *, model: dict | None = None,
              gen_size: int = 256, gen_batch: int = 16, loader: tuple[int, int] | None = (512, 256),
              memory: dict | None = None, params_file: str | None = "params.yaml", block_s: float = 1.5,
              threads: int | None = None, with_roofline: bool = True, echo=print) -> dict:
    """Run the benchmark; write and return ``{"machine", "records"}``. Every knob shrinks for tests:
    ``loader=(slices, size)`` or None, ``memory={"size", "batch", "steps", "n_slices", "n_test": [..]}``."""
    dev = pick_device(device)
    model, pfile = dict(model or paper_preset()[0]), params_file if params_file and Path(params_file).exists() else None
    params = load_params(pfile) if pfile else Params()
    default = default_path(params, dev)
    plist = [BASELINE, default] + [extra_path(n, default) for n in paths]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    machine = {**machine_info(dev), "params_file": pfile, "default_path": dataclasses.asdict(default), "model": model}
    echo(f"ctsynth bench: {machine['cpu']}, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads, "
         f"torch {machine['torch']}, device {machine['device']}, load average {machine['loadavg_start'][0]:.1f}")
    if (machine["cpu_busy_start"] or 0) > 0.25 and dev.type == "cpu":
        echo(f"note: other processes kept the CPUs {100 * machine['cpu_busy_start']:.0f}% busy before the start; "
             "wall times are pessimistic (with 2 OpenMP threads a busy core slows torch several-fold)")
    echo(f"{'case':9}{'path / what':22}{'size':>6}{'batch':>6}{'img/s':>10}{'ms/step':>10}{'cpu ms':>10}")
    records: list[dict] = []

    def add(rec: dict) -> None:
        records.append(rec)
        echo(_fmt(rec))
    train_sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    try:
        ceiling = {}                                  # size -> the flops record (throughput ceilings)
        if with_roofline:
            for rec in roofline(sorted({s for s, _ in train_sizes} | {gen_size}), dev, model):
                add(rec)
                if rec["case"] == "flops":
                    ceiling[rec["size"]] = rec
        for size, batch in train_sizes:
            recs = bench_train(plist, size, batch, repeats, dev, model, hp=paper_preset()[1], block_s=block_s)
            for rec in recs:
                if size in ceiling:
                    rec["gflop_s"] = rec["img_per_s"] * ceiling[size]["train_gflop_per_img"]
                    rec["of_ceiling"] = rec["img_per_s"] / ceiling[size]["train_ceiling_img_s"]
                add(rec)
            for rec in recs[1:]:
                ratio = {"case": "ratio", "what": f"{rec['path']}/baseline", "size": size, "batch": batch,
                         "ratio": rec["img_per_s"] / recs[0]["img_per_s"],
                         "cpu_ratio": recs[0]["cpu_ms_per_step"] / rec["cpu_ms_per_step"]}
                if size in ceiling:                   # the most any path could gain over the baseline
                    ratio["ceiling_ratio"] = ceiling[size]["train_ceiling_img_s"] / recs[0]["img_per_s"]
                add(ratio)
        rec = bench_generate(gen_size, gen_batch, repeats, dev, model)
        if gen_size in ceiling:
            rec["of_ceiling"] = rec["img_per_s"] / ceiling[gen_size]["generate_ceiling_img_s"]
        add(rec)
        with tempfile.TemporaryDirectory(prefix="ctsynth-bench-") as tmp:
            if loader and not quick:
                rec = bench_loader(write_store(Path(tmp) / "loader", *loader), 8, repeats, params, dev)
                train = [r["img_per_s"] for r in records if r["case"] == "train" and r["path"] == "default"
                         and r["size"] == rec["size"]]
                if train:
                    rec["x_train"] = rec["img_per_s"] / max(train)
                add(rec)
            if memory and not quick:
                common = {"device": str(dev), "params": pfile, "model": model, "threads": threads}
                add(bench_memory("train", {**common, **{k: memory[k] for k in ("size", "batch", "steps")}}))
                write_store(Path(tmp) / "eval" / "processed", memory["n_slices"], memory["size"])
                for n in memory["n_test"]:
                    add(bench_memory("evaluate", {**common, "root": str(Path(tmp) / "eval"),
                                                  "size": memory["size"], "n_test": n}))
    finally:
        torch.set_num_threads(old_threads)
    machine["loadavg_end"] = list(os.getloadavg())
    result = json.loads(json.dumps({"machine": machine, "records": records}))
    write_json(out, result)
    echo(f"wrote {out}")
    return result


def main(quick: bool = False, out: str = "reports/bench.json", device: str = "auto",
         paths: tuple[str, ...] = (), repeats: int | None = None, threads: int | None = None) -> int:
    run_bench(repeats=repeats or (3 if quick else 5), quick=quick, out=out, device=device, paths=paths,
              memory=FULL_MEMORY, threads=threads)
    return 0


if __name__ == "__main__":                     # python -m ctsynth.tools.bench.suite ARGS = ctsynth bench ARGS
    from ctsynth.cli import main as cli_main

    cli_main(["bench", *sys.argv[1:]])
