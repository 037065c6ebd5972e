"""ctsynth.core.accel: device choice, native-bf16 detection, precision and layout resolution, GEMM rate."""
from __future__ import annotations

import pytest
import torch

from ctsynth.core import accel

CPU = torch.device("cpu")


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names):
        monkeypatch.setattr(accel, "cpu_info", lambda: ("test cpu", frozenset(names)))
    return set_flags


def test_auto_is_bf16_only_on_cpus_with_native_bf16(flags):
    flags("avx2", "fma")
    assert not accel.native_bf16(CPU)
    assert accel.resolve_precision("auto", CPU) == "fp32"
    flags("avx2", "avx512f", "avx512bw")                    # AVX-512 without its bf16 extension: emulated
    assert accel.resolve_precision("auto", CPU) == "fp32"
    flags("avx2", "avx512f", "avx512_bf16")                 # bf16 dot products (docs/experiments/precision.md)
    assert accel.native_bf16(CPU) and accel.resolve_precision("auto", CPU) == "bf16"
    flags("avx2", "avx512f", "amx_tile", "amx_bf16")
    assert accel.native_bf16(CPU)
    assert accel.resolve_precision("auto", CPU) == "bf16"


@pytest.mark.parametrize("given", ["fp32", "bf16"])
def test_explicit_precision_is_kept(flags, given):
    flags("amx_bf16")
    assert accel.resolve_precision(given, CPU) == given
    flags()
    assert accel.resolve_precision(given, CPU) == given


def test_channels_last_auto_follows_the_device():
    assert accel.resolve_channels_last("auto", CPU) is False
    assert accel.resolve_channels_last("auto", torch.device("cuda")) is True
    assert accel.resolve_channels_last(True, CPU) is True
    assert accel.resolve_channels_last(False, torch.device("cuda")) is False


def test_autocast_matches_precision():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with accel.autocast("bf16", CPU):
        assert (x @ w).dtype == torch.bfloat16
    with accel.autocast("fp32", CPU):
        assert (x @ w).dtype == torch.float32


def test_cpu_info_reads_this_machine():
    model, isa = accel.cpu_info()
    assert isinstance(model, str) and model
    assert isinstance(isa, frozenset)


def test_runtime_record_names_what_decides_the_bits(monkeypatch):
    rec = accel.runtime_record("cpu")
    assert rec["cpu"] == accel.cpu_info()[0] and rec["device"] == "cpu" and rec["torch"] == str(torch.__version__)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert accel.runtime_record()["torch_threads"] == 7
    assert "7 threads" in accel.runtime_summary(accel.runtime_record()) and rec["cpu"] in accel.runtime_summary(rec)
    assert accel.runtime_summary(None) == "not recorded"


def test_pick_device():
    assert accel.pick_device("cpu") == CPU
    assert accel.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_gemm_rate_is_a_positive_finite_rate():
    rate = accel.gemm_gflops(CPU, torch.float32, budget_s=0.0, min_s=0.0)     # n = 256, 3 products
    assert 0 < rate < 1e6


def test_clock_times_calls_and_records_cpu_time():
    calls, cpu = [], []
    per_call = accel.clock(lambda: calls.append(sum(range(20000))), CPU, n=4, cpu=cpu)
    assert len(calls) == 4 and per_call > 0 and len(cpu) == 1 and cpu[0] >= 0


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_package_import_sets_passive_omp_waits_unless_set(given, expected):
    """Importing ctsynth (before torch) makes OpenMP waits passive; an explicit value wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", "import ctsynth.train.train, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


def test_runtime_record_is_plain_types_for_weights_only_files():
    rec = accel.runtime_record()
    assert all(type(v) in (str, int, type(None)) for v in rec.values()), {k: type(v) for k, v in rec.items()}
