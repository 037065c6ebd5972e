"""Hardware facts the fast paths depend on: device choice, CPU features, which precision pays.

``precision: auto`` (the default) trains in bf16 autocast only where the hardware multiplies bf16
natively and faster than fp32: CUDA devices that support bf16, CPUs with AMX (``amx_bf16``) and
CPUs with AVX512_BF16 dot products (``avx512_bf16``: the default training step 1.20-1.27x faster,
validation unmoved over 3 seeds, docs/experiments/precision.md). Everywhere else (e.g. AVX2-only
CPUs, where bf16 convolutions are emulated and run 5-50x slower than fp32) it resolves to fp32.
``ctsynth bench`` measures both GEMM rates on the machine at hand.
"""
from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}   # native bf16 matrix units or dot products


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, ISA flags) from /proc/cpuinfo; ``(platform name, {})`` where unavailable."""
    model, flags = "", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (so bf16 autocast can pay)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(BF16_CPU_FLAGS & cpu_info()[1])


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` / ``bf16`` as given; ``auto``: bf16 where :func:`native_bf16`, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """``true`` / ``false`` as given; ``auto``: NHWC on CUDA (tensor-core convolutions want it), NCHW
    on CPU (oneDNN trained the paper model at 0.87-1.00x the NCHW speed on the development CPU)."""
    if channels_last == "auto":
        return device.type == "cuda"
    return bool(channels_last)


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context for a resolved precision (disabled for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device, n: int = 1, cpu: list | None = None) -> float:
    """Wall seconds per call over ``n`` calls (device synchronised); CPU seconds appended to ``cpu``."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    sync(device)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / n)
    return (time.perf_counter() - t0) / n


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32, budget_s: float = 2.0,
                min_s: float = 0.05) -> float:
    """Measured rate of a dense n x n matrix product (GFLOP/s, the best of products repeated for
    ``budget_s`` after a warm-up): the practical ceiling that convolution-heavy work on ``device``
    can approach in ``dtype``. ``n`` doubles from 256 until one product takes ``min_s`` (up to 2048
    on CPU, 8192 on CUDA), so an emulated dtype (bf16 without hardware support: ~100x slower than
    fp32) is measured in about a second."""
    def product() -> None:
        torch.mm(a, b)

    n, n_max, gen = 256, 8192 if device.type == "cuda" else 2048, torch.Generator().manual_seed(0)
    while True:
        a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
        clock(product, device)                                # warm-up (kernel choice, caches)
        if n >= n_max or clock(product, device) >= min_s:
            break
        n *= 2
    times, end = [], time.perf_counter() + budget_s            # threads and clocks ramp up first
    while len(times) < 3 or time.perf_counter() < end:
        times.append(clock(product, device))
    return 2 * n ** 3 / min(times) / 1e9


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all CPUs' time spent busy over ``seconds`` (/proc/stat): others' load before we start."""
    def sample():
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(vals), vals[3] + vals[4]                   # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def runtime_record(device: torch.device | str = "cpu") -> dict:
    """What decides the bits of a CPU run besides the commit and the data: CPU model, thread count,
    torch and numpy versions, device. Same record = same floating-point results (docs/design.md,
    "Repeatability"); a different thread count alone changes how sums are split, hence the weights.
    Written into generator.pt, segmenter.pt, data/generated/model.json and metrics_notes.json."""
    import numpy

    device = torch.device(device)
    return {"cpu": cpu_info()[0], "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "numpy": str(numpy.__version__), "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def runtime_summary(record: dict | None) -> str:
    """One line for logs and the report: ``Intel Xeon @ 2.00GHz, 2 threads, torch 2.x, cpu``."""
    if not record:
        return "not recorded"
    return (f"{record.get('cpu', '?')}, {record.get('torch_threads', '?')} threads, torch "
            f"{record.get('torch', '?')}, {record.get('device', '?')}")


def machine_info(device: torch.device) -> dict:
    flags = cpu_info()[1]
    return {**runtime_record(device), "torch_interop_threads": torch.get_num_interop_threads(),
            "platform": platform.platform(),
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                    if k in os.environ}, "loadavg_start": list(os.getloadavg()), "cpu_busy_start": cpu_busy()}
