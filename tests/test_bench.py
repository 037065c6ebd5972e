"""`ctsynth bench`: functional test on a tiny model (structure of bench.json only, no timings)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO
from ctsynth.cli import BENCH_PATHS
from ctsynth.cli import main as cli_main
from ctsynth.core.errors import ConfigError
from ctsynth.tools.bench import suite as bench

TINY = {"encoding": "index", "gen_depth": 5, "ngf": 8, "ndf": 8, "disc_layers": 2,
        "skip_connections": True, "upsample": "transpose", "dropout": 0.0, "output": "tanh"}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_bench_writes_structured_json(tmp_path):
    out = tmp_path / "reports" / "bench.json"
    lines = []
    result = bench.run_bench(sizes=[(32, 2)], repeats=1, out=out, device="cpu", model=TINY,
                             paths=("fp32_cl",), gen_size=32, gen_batch=4, loader=(32, 32),
                             memory={"size": 32, "batch": 2, "steps": 1, "n_slices": 32, "n_test": [8]},
                             params_file=None, block_s=0.0, threads=1, echo=lines.append)
    on_disk = json.loads(out.read_text())
    assert on_disk == result
    machine, records = on_disk["machine"], on_disk["records"]
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "device", "default_path"):
        assert key in machine, key
    assert machine["device"] == "cpu"

    train = {r["path"]: r for r in records if r["case"] == "train"}
    assert set(train) == {"baseline", "default", "fp32_cl"}
    assert train["baseline"]["settings"]["adam"] == "plain"
    assert train["default"]["settings"]["adam"] == "default"
    for r in train.values():
        assert (r["size"], r["batch"]) == (32, 2)
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0
    ratios = [r for r in records if r["case"] == "ratio"]
    assert {r["what"] for r in ratios} == {"default/baseline", "fp32_cl/baseline"}
    assert all(r["ratio"] > 0 for r in ratios)
    (gen,) = [r for r in records if r["case"] == "generate"]
    assert gen["size"] == 32 and gen["batch"] == 4 and gen["img_per_s"] > 0
    (loader,) = [r for r in records if r["case"] == "loader"]
    assert loader["img_per_s"] > 0 and loader["x_train"] > 0
    mem = {r["what"]: r for r in records if r["case"] == "memory"}
    assert set(mem) == {"train", "evaluate"}
    assert all(r["peak_rss_mb"] > 0 for r in mem.values())
    assert mem["evaluate"]["peak_reset"] is True                         # set-up not charged (Linux)
    assert mem["evaluate"]["setup_peak_rss_mb"] > 0
    gemm = {r["precision"]: r["gflop_s"] for r in records if r["case"] == "gemm"}
    assert set(gemm) == {"fp32", "bf16"} and all(g > 0 for g in gemm.values())
    (flops,) = [r for r in records if r["case"] == "flops"]            # train and generate size 32
    assert flops["size"] == 32
    assert flops["train_gflop_per_img"] > 3 * flops["generate_gflop_per_img"] > 0   # fwd+bwd of G and D
    assert flops["generate_ceiling_img_s"] == pytest.approx(max(gemm.values()) / flops["generate_gflop_per_img"])
    for r in train.values():
        assert r["of_ceiling"] == pytest.approx(r["img_per_s"] / flops["train_ceiling_img_s"])
    assert all(r["ceiling_ratio"] == pytest.approx(flops["train_ceiling_img_s"] / train["baseline"]["img_per_s"])
               for r in ratios)
    assert all(math.isfinite(x) for x in _numbers(on_disk))
    assert any("default/baseline" in line for line in lines)       # the printed table


def test_quick_skips_loader_and_memory(tmp_path):
    result = bench.run_bench(sizes=[(32, 2)], repeats=1, quick=True, out=tmp_path / "b.json", device="cpu",
                             model=TINY, gen_size=32, gen_batch=2, params_file=None, block_s=0.0, threads=1,
                             memory={"size": 32, "batch": 2, "steps": 1, "n_slices": 32, "n_test": [8]},
                             echo=lambda _: None)
    cases = {r["case"] for r in result["records"]}
    assert cases == {"gemm", "flops", "train", "ratio", "generate"}


def test_flops_scale_with_image_area():
    """Known answer: every generator layer halves or doubles the grid exactly, so 4x the pixels is
    4x the work; a training step costs more than G's forward and backward (3x its forward)."""
    small, large = (bench.flops_per_image(s, bench.torch.device("cpu"), TINY) for s in (32, 64))
    assert large["generate"] == 4 * small["generate"]
    assert large["train"] > 3 * large["generate"]


def test_unknown_path_is_rejected():
    with pytest.raises(ConfigError, match="unknown path 'nope'"):
        bench.extra_path("nope", bench.BASELINE)


def test_cli_help_names_every_path(capsys):
    """`ctsynth bench --help` (and `python -m ctsynth.tools.bench.suite --help`) list every --paths name."""
    assert set(BENCH_PATHS) == set(bench.EXTRA_PATHS)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "usage: ctsynth bench" in shown and "--quick" in shown and "--threads" in shown
    assert all(name in shown for name in bench.EXTRA_PATHS)
    as_module = subprocess.run([sys.executable, "-m", "ctsynth.tools.bench.suite", "--help"], capture_output=True,
                               text=True, timeout=120)
    assert as_module.returncode == 0 and " ".join(as_module.stdout.split()) == shown


def test_the_bench_times_the_paper_preset():
    """One source of truth: the bench's model and optimiser settings are params/paper.yaml's."""
    from ctsynth.core.config import load_params, to_dict

    paper = load_params(REPO / "params" / "paper.yaml")
    model, hp = bench.paper_preset()
    assert model == to_dict(paper.model) and model["skip_connections"] is False
    assert hp == {"lr_g": paper.train.lr_g, "lr_d": paper.train.lr_d,
                  "betas": (paper.train.beta1, paper.train.beta2), "lambda_l1": paper.train.lambda_l1}
