"""MLflow tracking: URI resolution, a complete run from training, fail-fast on a bad store."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import make_store, tiny_params
from ctsynth.core import tracking
from ctsynth.core.errors import TrainingError
from ctsynth.train.networks import load_generator
from ctsynth.train.train import run as train

SPLIT = {"train": ["c1", "c2"], "val": ["c3"], "test": ["c4"]}


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Path:
    make_store(tmp_path / "data" / "processed")
    (tmp_path / "data" / "split.json").write_text(json.dumps(SPLIT))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _train(ws: Path, p, **kw):
    return train(p, ws / "data/processed", ws / "data/split.json", ws / "models/generator.pt",
                 ws / "models/checkpoints", ws / "reports/train", run_file=ws / "models/mlflow_run.json", **kw)


def test_tracking_uri_precedence(ws, monkeypatch):
    p = tiny_params()
    assert tracking.tracking_uri(p) == f"sqlite:///{ws.resolve()}/mlflow.db"
    p.tracking.uri = "sqlite:////somewhere/else.db"
    assert tracking.tracking_uri(p) == "sqlite:////somewhere/else.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////from/env.db")
    assert tracking.tracking_uri(p) == "sqlite:////from/env.db"


def test_data_version_reads_dvc_lock(ws):
    assert tracking.data_version() == {}
    (ws / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  preprocess:\n    cmd: x\n    outs:\n    - path: data/processed\n"
        "      md5: abc.dir\n  split:\n    cmd: y\n    outs:\n    - path: data/split.json\n      md5: def\n")
    assert tracking.data_version() == {"data.processed_md5": "abc.dir", "data.split_md5": "def"}


def test_training_run_has_params_metrics_tags_images_and_a_loadable_model(ws):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    (ws / "dvc.lock").write_text("stages:\n  preprocess:\n    outs:\n    - path: data/processed\n"
                                 "      md5: 0123.dir\n")
    p = tiny_params(train={"iterations": 4, "snapshot_at": [0, 1]}, train_run={"log_every": 2})
    assert _train(ws, p).exit_code == 0
    info = json.loads((ws / "models/mlflow_run.json").read_text())
    assert info["tracking_uri"] == f"sqlite:///{ws.resolve()}/mlflow.db" and info["experiment"] == "ctsynth"
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr_g"] == "0.0002" and run.data.params["model.gen_depth"] == "5"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g_l1")] == [2, 4]
    assert {"d_acc_real", "d_acc_fake", "g_adv", "d_real", "d_fake"} <= set(run.data.metrics)
    assert run.data.tags["data.processed_md5"] == "0123.dir" and "data.split_sha256" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "snapshots")}
    assert artifacts == {"snapshots/step_0000000.png", "snapshots/step_0000004.png"}

    # the MLflow model computes what the model file computes, for any batch size
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/generator")
    ours, _ = load_generator(ws / "models/generator.pt")
    x = (torch.rand(3, 7, 32, 32) > 0.7).float()
    with torch.no_grad():
        assert torch.allclose(logged(x), ours(x), atol=1e-6)

    # later stages log into the same run
    with tracking.resume_run(ws / "models/mlflow_run.json") as r:
        assert r.run_id == run.info.run_id
        r.log_metrics({"ssim": 0.5})
    assert client.get_run(run.info.run_id).data.metrics["ssim"] == 0.5

    # the first evaluation logs into the training run; a re-evaluation of the same (cached)
    # training gets a run of its own that points back at it, so nothing is overwritten
    with tracking.evaluation_run(ws / "models/mlflow_run.json", p) as r:
        assert r.run_id == run.info.run_id
    with tracking.evaluation_run(ws / "models/mlflow_run.json", p) as r:
        assert r.run_id != run.info.run_id
        r.log_metrics({"ssim": 0.25})
    again = client.get_run(r.run_id)
    assert again.data.tags["ctsynth.train_run_id"] == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["train.iterations"] == "4" and again.info.run_name.startswith("eval-")
    assert client.get_run(run.info.run_id).data.metrics["ssim"] == 0.5


def test_unopenable_store_fails_before_training(ws, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/no/such/folder/mlflow.db")
    with pytest.raises(TrainingError, match="does not exist"):
        _train(ws, tiny_params())
    assert not (ws / "models/checkpoints").exists() and not (ws / "reports/train").exists()
    (ws / "not_a_db").write_text("this is not sqlite")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws}/not_a_db")
    with pytest.raises(TrainingError, match="cannot be opened"):
        _train(ws, tiny_params())


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Parallel queue workers on a fresh clone: without the store lock two of three processes failed
    MLflow's schema migration ("duplicate column name"), every time we tried."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = ("import sys, time; from ctsynth.core import tracking\n"
            "while time.time() < float(sys.argv[1]): time.sleep(0.001)\n"
            f"tracking._connect({uri!r}, 'exp')")
    start = str(time.time() + 5)                          # the imports done, all three open it together
    env = {**os.environ, "PYTHONPATH": str(Path(tracking.__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", code, start], stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    client = __import__("mlflow").tracking.MlflowClient(uri)
    assert [e.name for e in client.search_experiments() if e.name == "exp"] == ["exp"]   # created once


def test_disabled_tracking_is_a_no_op(ws):
    p = tiny_params(tracking={"enabled": False})
    tracker = tracking.open_run(p, ws / "run.json")
    assert not tracker.active
    tracker.log_metrics({"x": 1.0}, 1)
    with tracking.resume_run(ws / "run.json") as r:
        assert not r.active
        r.log_metrics({"x": 1.0})
    with pytest.raises(TrainingError, match="not found"):
        with tracking.resume_run(ws / "missing.json"):
            pass


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (free port, SQLite backend, local artifact root that
    the server proxies over HTTP); stopped at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_training_logs_to_a_tracking_server_and_registers_the_model(ws, mlflow_server):
    """tracking.uri at a real server: the run, its per-step metrics and its logged model read
    back over HTTP, and the generator is version 1 of the registered model."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    p = tiny_params(train={"iterations": 4, "snapshot_at": [0, 1]}, train_run={"log_every": 2},
                    tracking={"uri": mlflow_server, "registered_model": "ctsynth-generator"})
    assert _train(ws, p).exit_code == 0
    info = json.loads((ws / "models/mlflow_run.json").read_text())
    assert info["tracking_uri"] == mlflow_server
    assert not (ws / "mlflow.db").exists()                   # nothing went to a local store
    client = MlflowClient(mlflow_server)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.iterations"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g_l1")] == [2, 4]
    versions = client.search_model_versions("name='ctsynth-generator'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run.info.run_id)]

    mlflow.set_tracking_uri(mlflow_server)
    logged = mlflow.pytorch.load_model("models:/ctsynth-generator/1")
    ours, _ = load_generator(ws / "models/generator.pt")
    x = (torch.rand(2, 7, 32, 32) > 0.7).float()
    with torch.no_grad():
        assert torch.allclose(logged(x), ours(x), atol=1e-6)
