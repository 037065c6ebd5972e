"""Training loop: learning, determinism, resume, interruption, NaN guard, DDP, fast path."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kornia
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, make_store, tiny_params
from ctsynth.core.config import TrainRunCfg, to_dict
from ctsynth.core.errors import ConfigError, InputError, TrainingError
from ctsynth.train.gan import GanPair, LossWeights, gan_step, lr_factor, make_optimizer
from ctsynth.train.history import LOSS_NAMES
from ctsynth.train.networks import build_discriminator, build_generator, load_generator
from ctsynth.train.train import run as train

SPLIT = {"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}


@pytest.fixture
def ws(tmp_path) -> Path:
    """Workspace with a tiny processed store and split."""
    make_store(tmp_path / "processed")
    (tmp_path / "split.json").write_text(json.dumps(SPLIT))
    return tmp_path


def params(**keys):
    """Tiny params without tracking; keys of train_run (log_every, checkpoint_every, ...) go there."""
    steer = {f.name for f in dataclasses.fields(TrainRunCfg)}
    return tiny_params(train={k: v for k, v in keys.items() if k not in steer},
                       train_run={k: v for k, v in keys.items() if k in steer}, tracking={"enabled": False})


def run(ws: Path, p, name: str = "run", **kw):
    out = ws / name
    result = train(p, ws / "processed", ws / "split.json", out / "generator.pt", out / "ckpt",
                   out / "reports", run_file=out / "mlflow_run.json", **kw)
    return result, out


def ckpts(out: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first (they live in ckpt/<fingerprint>/)."""
    return sorted((out / "ckpt").glob("*/step_*.pt"))


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_steps_on_a_fixed_batch_lower_l1():
    p = params()
    g, d = build_generator(p.model, 7), build_discriminator(p.model, 7)
    opt_g = make_optimizer(g.parameters(), 2e-3, (0.5, 0.999))
    opt_d = make_optimizer(d.parameters(), 2e-4, (0.5, 0.999))
    torch.manual_seed(0)
    cond = (torch.rand(4, 7, 32, 32) > 0.8).float()
    real = cond.sum(1, keepdim=True).clamp(max=1) * 1.4 - 0.7            # target depends on the mask
    amp = torch.autocast("cpu", enabled=False)
    first = gan_step(GanPair(g, d, d, opt_g, opt_d), cond, real, LossWeights(l1=100.0), amp)
    for _ in range(15):
        last = gan_step(GanPair(g, d, d, opt_g, opt_d), cond, real, LossWeights(l1=100.0), amp)
    assert first.shape == (len(LOSS_NAMES),)
    i = LOSS_NAMES.index("g_l1")
    assert last[i] < 0.7 * first[i]
    assert torch.isfinite(last).all()


def test_feature_matching_is_the_mean_block_l1_and_steers_the_generator():
    """train.lambda_fm: g_fm = mean over D's blocks of |D_k(fake) - D_k(real)|, real features from the
    D step's D (before its update), fake ones from the updated D; it changes G's update only when on."""
    import copy
    p = params()
    torch.manual_seed(0)
    g, d = build_generator(p.model, 7), build_discriminator(p.model, 7)
    cond = (torch.rand(4, 7, 32, 32) > 0.8).float()
    real = cond.sum(1, keepdim=True).clamp(max=1) * 1.4 - 0.7
    amp = torch.autocast("cpu", enabled=False)
    scores, feats = d(real, cond, features=True)
    assert torch.equal(scores, d(real, cond)) and len(feats) == p.model.disc_layers
    assert [f.shape[-1] for f in feats] == [32 // 2 ** (i + 1) for i in range(p.model.disc_layers)]

    def one_step(lambda_fm):
        g1, d1 = copy.deepcopy(g), copy.deepcopy(d)
        opt_g = make_optimizer(g1.parameters(), 2e-3, (0.5, 0.999))
        opt_d = make_optimizer(d1.parameters(), 2e-4, (0.5, 0.999))
        losses = gan_step(GanPair(g1, d1, d1, opt_g, opt_d), cond, real, LossWeights(l1=100.0, fm=lambda_fm), amp)
        return losses, g1, d1

    off, g_off, _ = one_step(0.0)
    on, g_on, d_on = one_step(10.0)
    assert off[LOSS_NAMES.index("g_fm")] == 0 and torch.equal(off[:2], on[:2])     # same G output, same D
    with torch.no_grad():
        fake = copy.deepcopy(g)(cond)                                  # G before its step (train-mode BN)
        f_real = copy.deepcopy(d)(real, cond, features=True)[1]        # the D step's D
        f_fake = d_on(fake, cond, features=True)[1]                    # the updated D of the G step
        want = torch.stack([(a - b).abs().mean() for a, b in zip(f_fake, f_real)]).mean()
    assert torch.allclose(on[LOSS_NAMES.index("g_fm")], want, rtol=1e-5) and want > 0
    moved = [not torch.equal(a, b) for a, b in zip(g_off.state_dict().values(), g_on.state_dict().values())]
    assert any(moved)
    with pytest.raises(ConfigError, match="train.lambda_fm: must be >= 0"):
        params(lambda_fm=-1.0)


def test_radial_log_spectrum_known_answers():
    """White noise of variance s² has a flat power spectrum at s² (orthonormal FFT): every ring's
    log power is log s²; a blur takes power from the outer rings only."""
    from ctsynth.train.gan import radial_log_spectrum
    torch.manual_seed(0)
    noise = 0.1 * torch.randn(64, 1, 32, 32)
    prof = radial_log_spectrum(noise)
    assert prof.shape == (16,)
    assert torch.allclose(prof, torch.full_like(prof, math.log(0.01)), atol=0.15)
    blurred = radial_log_spectrum(kornia.filters.gaussian_blur2d(noise, (5, 5), (1.0, 1.0)))
    assert (prof[-4:] - blurred[-4:]).min() > 2.0 and (prof[:2] - blurred[:2]).max() < 1.0


def test_spectral_term_is_the_log_spectrum_gap_and_steers_the_generator():
    """train.lambda_spectral: g_spec = mean |log P_fake(r) - log P_real(r)| over rings; 0 and G's
    update unchanged when off; another G update when on."""
    import copy

    from ctsynth.train.gan import radial_log_spectrum
    p = params()
    torch.manual_seed(0)
    g, d = build_generator(p.model, 7), build_discriminator(p.model, 7)
    cond = (torch.rand(4, 7, 32, 32) > 0.8).float()
    real = cond.sum(1, keepdim=True).clamp(max=1) * 1.4 - 0.7 + 0.05 * torch.randn(4, 1, 32, 32)
    amp = torch.autocast("cpu", enabled=False)

    def one_step(lam):
        g1, d1 = copy.deepcopy(g), copy.deepcopy(d)
        opt_g = make_optimizer(g1.parameters(), 2e-3, (0.5, 0.999))
        opt_d = make_optimizer(d1.parameters(), 2e-4, (0.5, 0.999))
        return gan_step(GanPair(g1, d1, d1, opt_g, opt_d), cond, real, LossWeights(l1=100.0, spectral=lam), amp), g1

    (off, g_off), (on, g_on) = one_step(0.0), one_step(1.0)
    with torch.no_grad():
        want = (radial_log_spectrum(copy.deepcopy(g)(cond)) - radial_log_spectrum(real)).abs().mean()
    i = LOSS_NAMES.index("g_spec")
    assert off[i] == 0 and torch.allclose(on[i], want, rtol=1e-5) and want > 0
    assert torch.equal(off[:2], on[:2])                                  # same G output and D before G's step
    assert any(not torch.equal(a, b) for a, b in zip(g_off.state_dict().values(), g_on.state_dict().values()))
    with pytest.raises(ConfigError, match="train.lambda_spectral: must be >= 0"):
        params(lambda_spectral=-1.0)


def test_train_writes_model_losses_snapshots_checkpoints(ws, caplog):
    with caplog.at_level("INFO", logger="ctsynth.train.train"):
        result, out = run(ws, params(iterations=6, checkpoint_every=2, log_every=2, snapshot_at=[0, 0.5, 1],
                                     lambda_fm=0.0))
    assert result.step == 6 and result.exit_code == 0
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]   # formats cleanly
    assert len(progress) == 3 and "step 6/6 | g_adv" in progress[-1] and "g_fm" not in progress[-1]   # 0: not shown
    model, meta = load_generator(out / "generator.pt")
    assert meta["preprocess"]["image_size"] == 32 and meta["in_channels"] == 7
    assert meta["extra"]["step"] == 6 and meta["extra"]["receptive_field"] == 22
    with torch.no_grad():
        assert model(torch.rand(2, 7, 32, 32)).shape == (2, 1, 32, 32)
    losses = pd.read_csv(out / "reports" / "losses.csv")
    assert list(losses.columns[:len(LOSS_NAMES) + 1]) == ["step", *LOSS_NAMES]
    assert losses["step"].tolist() == [1, 2, 3, 4, 5, 6]        # <= 200 rows: one per step here
    assert losses[["d_acc_real", "d_acc_fake"]].stack().between(0, 1).all()
    snaps = sorted(p.name for p in (out / "reports" / "snapshots").iterdir())
    assert snaps == ["step_0000000.png", "step_0000003.png", "step_0000006.png"]
    assert [p.name for p in ckpts(out)] == ["step_0000004.pt", "step_0000006.pt"]
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] is None
    ck = torch.load(ckpts(out)[-1], weights_only=True)           # loads without pickle
    assert ck["step"] == 6 and ck["losses"].shape == (6, len(LOSS_NAMES))
    assert ckpts(out)[-1].parent.name == meta["extra"]["fingerprint"]     # one folder per run config


def test_a_retrain_replaces_the_snapshot_folder_whole(ws):
    """Snapshots of a longer earlier run never stay beside a shorter retrain's (issue 19: 3000 then
    300 iterations drew steps 30-3000 in one figure), and a longer run resuming a shorter one keeps
    exactly its own steps: those taken before, redrawn from the checkpoint, and its new ones."""
    import numpy as np
    from PIL import Image

    folder = ws / "run" / "reports" / "snapshots"
    steps = lambda: sorted(int(p.stem[5:]) for p in folder.iterdir())             # noqa: E731
    pixels = lambda step: np.asarray(Image.open(folder / f"step_{step:07d}.png"))[14:]   # below the title  # noqa: E731
    kw = dict(checkpoint_every=100, log_every=100, snapshot_at=[0, 0.5, 1])
    run(ws, params(iterations=2, **kw))
    assert steps() == [0, 1, 2]
    run(ws, params(iterations=1, **kw))                # step 2's checkpoint is past 1: a fresh run
    assert steps() == [0, 1]
    first = pixels(0)
    result, _ = run(ws, params(iterations=3, **kw))    # resumes the 1-step run: new steps 0, 2, 3
    assert result.step == 3 and steps() == [0, 2, 3]
    assert np.array_equal(pixels(0), first)            # redrawn from the checkpoint, not from step 1's G


def test_resume_after_changing_snapshot_count_redraws_only_what_it_can(ws):
    """snapshot_count is not in the fingerprint, so a finished run resumes; its stored snapshots hold
    other masks: the folder gets only the current step, redrawn from the resumed weights (it used to
    fail with an IndexError when the count grew)."""
    from PIL import Image

    folder = ws / "run" / "reports" / "snapshots"
    kw = dict(iterations=1, checkpoint_every=100, log_every=100, snapshot_at=[0, 1])
    run(ws, params(snapshot_count=1, **kw))
    one = Image.open(folder / "step_0000001.png").size
    result, _ = run(ws, params(snapshot_count=3, **kw))
    assert result.step == 1 and [p.name for p in folder.iterdir()] == ["step_0000001.png"]
    three = Image.open(folder / "step_0000001.png").size
    assert three == (3 * one[0], one[1])


def test_same_seed_same_weights_other_seed_differs(ws):
    _, a = run(ws, params(iterations=4), "a")
    _, b = run(ws, params(iterations=4), "b")
    assert_same(state(a / "generator.pt"), state(b / "generator.pt"))
    assert (a / "reports/losses.csv").read_bytes() == (b / "reports/losses.csv").read_bytes()
    p = params(iterations=4)
    p.seed = 7
    _, c = run(ws, p, "c")
    assert not torch.equal(state(a / "generator.pt")["down.0.0.weight"], state(c / "generator.pt")["down.0.0.weight"])


def test_interrupted_then_resumed_equals_uninterrupted(ws):
    p = params(iterations=7, checkpoint_every=3, log_every=2)
    _, full = run(ws, p, "full")
    first, part = run(ws, p, "part", stop_after=4)          # same path as SIGTERM at step 4
    assert first.step == 4 and first.exit_code == 128 + signal.SIGTERM
    assert not (part / "generator.pt").exists()
    assert ckpts(part)[-1].name == "step_0000004.pt"
    second, _ = run(ws, p, "part")
    assert second.step == 7 and second.exit_code == 0
    assert_same(state(full / "generator.pt"), state(part / "generator.pt"))
    assert (full / "reports/losses.csv").read_bytes() == (part / "reports/losses.csv").read_bytes()
    # a finished run resumed again does not train further; longer runs continue from it
    again, _ = run(ws, p, "part")
    assert again.step == 7


def test_checkpoints_of_another_configuration_are_not_resumed(ws):
    run(ws, params(iterations=4), "x", stop_after=2)
    result, out = run(ws, params(iterations=4, lr_g=1e-4), "x")
    assert result.step == 4
    _, ref = run(ws, params(iterations=4, lr_g=1e-4), "ref")
    assert_same(state(out / "generator.pt"), state(ref / "generator.pt"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(ws, monkeypatch):
    import torch.nn.functional as F
    calls = {"n": 0}
    real_l1 = F.l1_loss

    def flaky_l1(*a, **kw):
        calls["n"] += 1
        out = real_l1(*a, **kw)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(F, "l1_loss", flaky_l1)
    with pytest.raises(TrainingError, match="non-finite g_l1 loss at step 3"):
        run(ws, params(iterations=6, checkpoint_every=2, log_every=1, lambda_fm=0.0))   # one l1_loss a step
    found = ckpts(ws / "run")
    assert [c.name for c in found] == ["step_0000002.pt"]
    ck = torch.load(found[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["G"].values() if v.is_floating_point())
    assert not (ws / "run" / "generator.pt").exists()


def test_bad_inputs_fail_clearly(ws):
    with pytest.raises(InputError, match="fewer than one batch"):
        run(ws, params(batch_size=64))
    (ws / "split.json").write_text(json.dumps({"train": ["c1", "c4"], "val": [], "test": ["c4"]}))
    with pytest.raises(InputError, match="both train and test"):
        run(ws, params())
    (ws / "split.json").write_text(json.dumps(SPLIT))
    with pytest.raises(ConfigError, match="1x1 bottleneck"):
        run(ws, tiny_params(train={"batch_size": 1}, model={"gen_depth": 5}, tracking={"enabled": False}))


def test_linear_lr_decay():
    p = params(iterations=100, lr_decay_start=0.5)
    assert lr_factor(0, p.train) == 1.0 and lr_factor(50, p.train) == 1.0
    assert lr_factor(75, p.train) == pytest.approx(0.5) and lr_factor(100, p.train) == 0.0
    assert lr_factor(99, params(lr_decay_start=None).train) == 1.0


def test_bf16_channels_last_losses_stay_close_to_fp32(ws):
    """The fast path's loss curve follows fp32's over the first steps (bf16 has ~3 significant
    digits, GAN training amplifies differences; 'close' = within 0.05 + 10 % per logged mean)."""
    kw = dict(iterations=20, log_every=5, checkpoint_every=100, snapshot_at=[])
    run(ws, params(precision="fp32", channels_last=False, **kw), "fp32")
    run(ws, params(precision="bf16", channels_last=True, **kw), "bf16")
    def means_of_5(path):                               # the table is per step here: compare 5-step means
        t = pd.read_csv(path)
        return t.groupby((t.step - 1) // 5).mean()
    a, b = means_of_5(ws / "fp32/reports/losses.csv"), means_of_5(ws / "bf16/reports/losses.csv")
    for name in ("g_l1", "g_adv", "d_real", "d_fake"):
        assert ((a[name] - b[name]).abs() <= 0.05 + 0.1 * a[name].abs()).all(), (name, a[name], b[name])


def test_auto_precision_follows_the_hardware(ws, monkeypatch):
    """precision: auto trains in fp32 on a CPU without native bf16 and in bf16 on one with AMX;
    the resolved precision is recorded and the auto run equals the explicit one bit for bit."""
    from ctsynth.core import accel
    kw = dict(iterations=4, log_every=2, checkpoint_every=100, snapshot_at=[])
    ran = {}
    for name, isa, explicit in (("avx2", {"avx2"}, "fp32"), ("amx", {"avx2", "amx_bf16"}, "bf16")):
        monkeypatch.setattr(accel, "cpu_info", lambda isa=isa: ("test cpu", frozenset(isa)))
        _, out = run(ws, params(precision="auto", **kw), f"auto-{name}")
        _, ref = run(ws, params(precision=explicit, **kw), f"{explicit}-{name}")
        blob = torch.load(out / "generator.pt", weights_only=True)
        assert blob["extra"]["precision"] == explicit
        assert_same(state(out / "generator.pt"), state(ref / "generator.pt"))
        ran[name] = state(out / "generator.pt")
    assert any(not torch.equal(ran["avx2"][k], ran["amx"][k]) for k in ran["avx2"])


def _write_params(path: Path, p) -> Path:
    path.write_text(yaml.safe_dump(to_dict(p)))
    return path


def _stage_cmd(ws: Path, launcher: list[str], params_file: Path, name: str) -> list[str]:
    out = ws / name
    return [*launcher, str(REPO / "stages" / "train.py"), "--params", str(params_file),
            "--processed", str(ws / "processed"), "--split", str(ws / "split.json"),
            "--model", str(out / "generator.pt"), "--checkpoints", str(out / "ckpt"),
            "--reports", str(out / "reports"), "--run-file", str(out / "mlflow_run.json")]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}


def test_ddp_two_cpu_processes_end_with_identical_weights(ws):
    """(With the weights' moving average on: the path a DDP run with train.ema takes.)"""
    pf = _write_params(ws / "params.yaml", params(iterations=4, log_every=2, checkpoint_every=2, ema=0.5))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(_stage_cmd(ws, launcher, pf, "ddp"), cwd=ws, env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, meta = load_generator(ws / "ddp" / "generator.pt")
    hashes = meta["extra"]["rank_weight_hashes"]
    assert meta["extra"]["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    assert meta["extra"]["ema"] == 0.5
    assert "weights identical on all 2 ranks" in proc.stderr


def test_sigterm_saves_checkpoint_and_rerun_resumes_to_same_weights(ws):
    p = params(iterations=30, log_every=3, checkpoint_every=3, snapshot_at=[0, 1])
    pf = _write_params(ws / "params.yaml", p)
    cmd = _stage_cmd(ws, [sys.executable], pf, "sig")
    env = _env()                                       # one thread, like the reference below
    proc = subprocess.Popen(cmd, cwd=ws, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ckpts(ws / "sig") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint saved" in err and "rerun to resume" in err
    assert not (ws / "sig" / "generator.pt").exists()
    rerun = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from" in rerun.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                           # CPU results are bit-exact per thread count
    try:
        _, ref = run(ws, p, "ref")
    finally:
        torch.set_num_threads(threads)
    assert_same(state(ws / "sig" / "generator.pt"), state(ref / "generator.pt"))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_rendezvous_through_torchrun_and_end_with_identical_weights(ws):
    """train.nnodes 2: two 'nodes' (two torchrun agents on 127.0.0.1, one gloo process each) run
    the same stage command; the stage starts itself under torchrun's c10d rendezvous, and both
    ranks end with the same weights."""
    from ctsynth.train.distributed import torchrun_argv

    endpoint = f"127.0.0.1:{_free_port()}"
    p = params(iterations=4, log_every=2, checkpoint_every=2, nproc=1, nnodes=2, rdzv_endpoint=endpoint)
    assert torchrun_argv(1, 2, endpoint, "s.py", [])[3:] == [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "--rdzv-id", "ctsynth", "s.py"]
    cmd = _stage_cmd(ws, [sys.executable], _write_params(ws / "params.yaml", p), "nodes")
    agents = [subprocess.Popen(cmd, cwd=ws, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    errs = [agent.communicate(timeout=300)[1] for agent in agents]
    for agent, err in zip(agents, errs):
        assert agent.returncode == 0, err[-3000:]
    _, meta = load_generator(ws / "nodes" / "generator.pt")
    hashes = meta["extra"]["rank_weight_hashes"]
    assert meta["extra"]["world_size"] == 2 and len(hashes) == 2 and hashes[0] == hashes[1]
    assert any("weights identical on all 2 ranks" in e for e in errs)


def test_one_process_needs_no_torchrun_and_nodes_need_an_endpoint():
    from ctsynth.train.distributed import torchrun_argv

    assert torchrun_argv(1, 1, None, "s.py", ["--x"]) is None
    assert torchrun_argv(2, 1, None, "s.py", ["--x"])[-3:] == ["--standalone", "s.py", "--x"]
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        tiny_params(train={"nnodes": 2})
    with pytest.raises(ConfigError, match="host:port"):
        tiny_params(train_run={"rdzv_endpoint": "no-port"})


def test_model_file_is_bit_for_bit_repeatable_with_tracking_on(ws, monkeypatch):
    """The model file holds no run-specific value (the MLflow run id lives in mlflow_run.json),
    so two identical trainings write identical bytes and dvc.lock does not change on a rerun."""
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = tiny_params(train={"iterations": 2, "snapshot_at": []}, tracking={"log_model": False})
    _, a = run(ws, p, "a")
    _, b = run(ws, p, "b")
    ids = [json.loads((o / "mlflow_run.json").read_text())["run_id"] for o in (a, b)]
    assert ids[0] and ids[0] != ids[1]
    assert (a / "generator.pt").read_bytes() == (b / "generator.pt").read_bytes()


def test_ema_is_the_moving_average_of_weights_and_batchnorm_statistics():
    """Known answer: the first update copies, the next gives decay * old + (1 - decay) * new, for the
    weights and the BatchNorm running statistics alike; decay 0 keeps no average."""
    from ctsynth.train.gan import make_ema
    assert make_ema(torch.nn.Linear(2, 2), 0.0) is None
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = make_ema(net, 0.9)
    ema.update_parameters(net)
    w1, m1 = net[0].weight.detach().clone(), net[1].running_mean.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.randn(4, 1, 5, 5) + 3)                      # moves the running mean
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w1 + 0.1 * net[0].weight.detach())
    torch.testing.assert_close(ema.module[1].running_mean, 0.9 * m1 + 0.1 * net[1].running_mean)
    assert not torch.equal(ema.module[0].weight, net[0].weight)


def test_ema_generator_is_saved_and_resumes_bit_for_bit(ws):
    """train.ema > 0: the model file holds the average (not the last step's weights) and records the
    decay; a run interrupted and resumed ends with the same average as an uninterrupted one."""
    p = params(iterations=6, checkpoint_every=2, log_every=2, ema=0.5)
    _, full = run(ws, p, "full")
    _, plain = run(ws, params(iterations=6, checkpoint_every=2, log_every=2), "plain")
    averaged, last = state(full / "generator.pt"), state(plain / "generator.pt")
    assert averaged.keys() == last.keys()                          # a plain generator's state, loadable as one
    assert not torch.equal(averaged["down.0.0.weight"], last["down.0.0.weight"])
    model, meta = load_generator(full / "generator.pt")
    assert meta["extra"]["ema"] == 0.5 and isinstance(model, torch.nn.Module)
    averaged_stats = torch.load(ckpts(full)[-1], weights_only=True)["G_ema"]      # step 6: before recalibration
    bn = next(k for k in averaged if k.endswith("running_var"))
    assert not torch.equal(averaged[bn], averaged_stats[f"module.{bn}"])       # the model file's are measured anew
    first, part = run(ws, p, "part", stop_after=3)
    assert first.step == 3 and "G_ema" in torch.load(ckpts(part)[-1], weights_only=True)
    run(ws, p, "part")
    assert_same(averaged, state(part / "generator.pt"))
    with pytest.raises(ConfigError, match=r"train.ema: must be in \[0, 1\)"):
        params(ema=1.0)


def test_recalibrated_batchnorm_statistics_are_those_of_the_data():
    """Known answer: after one ordered pass, BatchNorm's running mean and variance are the mean and
    (unbiased) variance of what enters it over the whole dataset (equal batches)."""
    from ctsynth.train.gan import recalibrate_bn
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    data = [(torch.randn(1, 3, 3) * 2 + 1, torch.zeros(1)) for _ in range(8)]
    recalibrate_bn(net, data, batch_size=4)
    with torch.no_grad():
        feats = net[0](torch.stack([x for x, _ in data]))                  # (8, 2, 3, 3)
    torch.testing.assert_close(net[1].running_mean, feats.mean((0, 2, 3)))
    per_batch = [feats[i:i + 4].transpose(0, 1).reshape(2, -1).var(1) for i in (0, 4)]
    torch.testing.assert_close(net[1].running_var, (per_batch[0] + per_batch[1]) / 2)
    assert not net.training                                                    # the mode is restored

