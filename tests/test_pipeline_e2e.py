"""End to end: the real `dvc repro` on a tiny config, in a scratch copy of the repository.

Checks the whole chain phantom -> ... -> report, the MLflow run, DVC's caching behaviour
(no-op second repro, param edits rerun only dependent stages), metrics/plots commands,
atomicity under SIGKILL, bit-for-bit repeatability of metrics.json on CPU, the experiment loop
(compare, switch back without retraining, queue; every run in the repo's MLflow store), a
DVC remote round trip into a fresh clone, the expert review in a real headless Chromium
followed by `dvc repro share`, and the utility study as its own DVC pipeline.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from html import escape
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

TINY = {
    "phantom": {"cases": 5, "shape": [48, 48, 16], "spacing": [6.0, 6.0, 7.0]},
    "split": {"train": 0.6, "val": 0.2, "test": 0.2},            # 3 / 1 / 1 of the 5 cases
    "preprocess": {"image_size": 32, "margin": 1},
    "model": {"gen_depth": 5, "ngf": 8, "ndf": 8, "disc_layers": 2},
    "train": {"iterations": 6, "batch_size": 4, "snapshot_count": 2},
    "train_run": {"checkpoint_every": 3, "log_every": 2},
    "segmenter": {"iterations": 6, "batch_size": 4, "width": 4},
    "generate": {"batch_size": 8, "grid_slices": 3},
    "synthesize": {"cases": 3},
    # 5 cases = 1 test patient: the default jackknife rightly gives no patient-level interval from one patient
    # (tests/test_evaluate.py and test_intervals.py cover it); the bootstrap keeps the interval plumbing under test
    "evaluate": {"batch_size": 8, "kid_subset_size": 4, "interval_method": "bootstrap", "bootstrap": 200},
    "privacy": {"downsample": 16},
    "realism": {"c2st_steps": 10, "c2st_width": 4},
}


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)      # the default store in the repo root is under test
    env["DVC_NO_ANALYTICS"] = "1"
    env["CI"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "ctsynth-test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return env


# No single command of these tests takes more than a few minutes on 2 cores; a command still running
# after this is stuck (once: a DVC queue worker, upstream's treeverse/dvc#10398 / #10428), and the test
# fails with what it printed instead of CI running out of time with nothing to show.
COMMAND_TIMEOUT_S = 900


class CommandHung(AssertionError):
    """A command still running after its time limit (killed)."""


def sh(root: Path, *cmd: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = kill_processes_in(root, proc.pid)
        stdout, stderr = proc.communicate()
        raise CommandHung(f"{' '.join(cmd)} still running after {timeout:.0f} s; killed it and {killed} other "
                             f"process(es) working in {root}:\n{stdout[-4000:]}\n{stderr[-4000:]}"
                             f"{queue_worker_logs(root)}") from None
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def kill_processes_in(root: Path, pid: int) -> int:
    """SIGKILL ``pid``'s process group and every other process whose working directory lies under
    ``root`` (DVC's queue workers detach from the group); how many others there were."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    others = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (pid, os.getpid()):
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(root):
                os.kill(int(entry.name), signal.SIGKILL)
                others += 1
    return others


def queue_worker_logs(root: Path) -> str:
    """The tails of DVC's queue worker logs, if the repo ran a queue."""
    logs = sorted((root / ".dvc" / "tmp" / "exps" / "celery").glob("*.out"))
    return "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def make_repo(dest: Path) -> Path:
    """A scratch git+DVC repo holding the project's tracked and untracked-but-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and (not rel.startswith(("dvc.lock", "reports/", "studies/"))   # results of this checkout;
                              or rel in ("studies/utility/published.json",    # the report's study inputs:
                                         "studies/utility/dvc.lock")):        # its answer, its generator
            # the on-demand studies have pipelines of their own (their test copies them in)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(dest, "git", "init", "-q")
    if not (dest / ".dvc").exists():
        sh(dest, sys.executable, "-m", "dvc", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "scratch")
    return dest


def stages_run(output: str) -> list[str]:
    return [ln.split("'")[1] for ln in output.splitlines() if ln.startswith("Running stage '")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("e2e"))
    out = sh(root, "dvc", "repro")
    assert stages_run(out.stdout) == ["phantom", "ingest", "preprocess", "split", "train", "segmenter",
                                      "generate", "synthesize", "privacy", "utility", "evaluate", "share",
                                      "report"], out.stdout
    return root


def test_outputs_and_metrics(repo):
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    for key in ("mse", "psnr", "ssim", "mae_hu", "fd_seg", "kid_seg"):
        assert isinstance(metrics[key], (int, float)), key
    assert 0 <= metrics["ssim"] <= 1 and metrics["mse"] >= 0
    assert metrics.get("fid_inception") is None          # offline, empty torch hub: missing, never estimated
    notes = json.loads((repo / "reports" / "metrics_notes.json").read_text())
    assert "fid_inception" in json.dumps(notes)           # ... with the reason
    runtime = notes["runtime"]                             # every step says where it ran
    assert all(runtime[k]["torch_threads"] >= 1 for k in ("generator_trained_on", "generated_on",
                                                          "segmenter_trained_on", "evaluated_on"))
    assert "not recorded" not in runtime["about"] and "computed on" in (repo / "reports" / "report.html").read_text()
    intervals = json.loads((repo / "reports" / "metrics_ci.json").read_text())
    lo, hi = intervals["ssim_ci95"]["lo"], intervals["ssim_ci95"]["hi"]
    assert lo <= metrics["ssim"] <= hi and "fd_seg_floor" in metrics
    html = (repo / "reports" / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html
    cases = pd.read_csv(repo / "reports" / "privacy_cases.csv")            # the privacy stage: a verdict per case
    synthetic = pd.read_csv(repo / "data" / "synthetic" / "manifest.csv")
    assert sorted(cases.case) == sorted(synthetic.case) and set(cases.verdict) <= {"pass", "withheld"}
    screening = json.loads((repo / "reports" / "privacy_synthetic.json").read_text())
    assert screening["privacy_threshold"] == pytest.approx(metrics["privacy_threshold"], abs=1e-5)  # one rule
    assert f"{screening['privacy_synthetic_n_pass']} of {len(cases)} cases pass" in html
    assert (repo / "models" / "generator.pt").stat().st_size > 0
    split = json.loads((repo / "data" / "split.json").read_text())
    synth = sorted(p.name for p in (repo / "data" / "generated").glob("*_synth.nii.gz"))
    assert synth == sorted(f"{c}_synth.nii.gz" for c in split["test"])


def test_synthetic_cases_feed_back_into_ingest_and_utility_metrics(repo, tmp_path):
    """data/synthetic: labelled pairs from the training cases that `ingest` accepts as data.raw_dir
    (the pipeline's own stage, run on them); the utility Dice and its chart reach metrics.json and
    the report."""
    manifest = pd.read_csv(repo / "data" / "synthetic" / "manifest.csv")
    split = json.loads((repo / "data" / "split.json").read_text())
    assert len(manifest) == 3 and set(manifest.source) <= set(split["train"])
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["raw_dir"] = str(repo / "data" / "synthetic")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, sys.executable, "stages/ingest.py", "--params", str(tmp_path / "params.yaml"),
       "--raw", str(repo / "data" / "synthetic"), "--out", str(tmp_path / "interim"))
    assert sorted(pd.read_csv(tmp_path / "interim" / "manifest.csv").case) == sorted(manifest.case)
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    intervals = json.loads((repo / "reports" / "metrics_ci.json").read_text())
    for key in ("utility_dice_real", "utility_dice_synthetic", "utility_dice_mixed", "utility_gain_mixed"):
        assert isinstance(metrics[key], float) and f"{key}_ci95" in intervals, key
    assert metrics["utility_dice_real"] == pytest.approx(metrics["dice_real_mean"], abs=2e-6)  # same model, same slices
    html = (repo / "reports" / "report.html").read_text()
    assert "Does synthetic data help segmentation?" in html and "synthetic case synth_0001" in html


def test_mlflow_run_has_params_metrics_and_model(repo):
    import mlflow

    run_info = json.loads((repo / "models" / "mlflow_run.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run = client.get_run(run_info["run_id"])
    assert run.data.params["train.iterations"] == "6"
    assert "Headline/ssim" in run.data.metrics and "g_l1" in run.data.metrics
    assert not [k for k in run.data.metrics if "ci95" in k]                             # intervals: an artifact
    assert {a.path for a in client.list_artifacts(run.info.run_id, "metrics")} == {"metrics/metrics.json",
                                                                                  "metrics/metrics_ci.json"}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"       # opens as model training
    assert len(run.data.tags.get("git_commit", "")) == 40
    assert run.info.run_name.startswith("train-") and run.data.tags["ctsynth.data_hash"]
    assert " threads, torch " in run.data.tags["ctsynth.runtime"]                        # where it ran
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)


def test_second_repro_is_noop_and_param_edit_reruns_dependents(repo):
    # importing the code outside a stage (the CLI, tests) writes byte-code caches into src/: .dvcignore
    # keeps them out of the code deps' hashes, else every stage would look modified and rerun
    env = {**_env(repo), "PYTHONPATH": str(repo / "src")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", "import ctsynth.data.masks"], cwd=repo, env=env, check=True)
    assert list((repo / "src" / "ctsynth" / "data" / "__pycache__").glob("masks.*.pyc"))
    out = sh(repo, "dvc", "repro")
    assert stages_run(out.stdout) == [], out.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["preprocess"]["image_size"] = 64
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout)
    assert "preprocess" in status and "ingest" not in status and "phantom" not in status
    sh(repo, "git", "checkout", "params.yaml")
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


def test_dvc_metrics_and_plots_commands(repo):
    """`dvc metrics show` / `dvc exp show` compare the headline (a screen wide); every metric stays
    one `--targets reports/metrics.json` away."""
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    headline = json.loads((repo / "reports" / "headline.json").read_text())
    assert "ssim" in json.dumps(shown) and "mae_hu_LV" not in json.dumps(shown) and len(headline) <= 15
    assert set(headline) < set(json.loads((repo / "reports" / "metrics.json").read_text()))
    every = json.loads(sh(repo, "dvc", "metrics", "show", "--json", "reports/metrics.json").stdout)
    assert "mae_hu_LV" in json.dumps(every)
    sh(repo, "dvc", "metrics", "diff")
    sh(repo, "dvc", "plots", "show", "-o", str(repo / "plots_html"))
    assert (repo / "plots_html" / "index.html").exists()


def test_sigkill_mid_stage_leaves_previous_outputs(repo):
    """Kill preprocess half-way: the old data/processed stays byte-identical and valid for DVC."""
    before = {p.name: p.read_bytes() for p in (repo / "data" / "processed").iterdir()}
    proc = subprocess.Popen([sys.executable, "stages/preprocess.py", "--set", "preprocess.image_size=512",
                             "--set", "preprocess.slices=all"], cwd=repo, env=_env(repo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((repo / "data").glob(".processed.*.tmp/images.npy")):
        time.sleep(0.05)
    assert list((repo / "data").glob(".processed.*.tmp")), "stage never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = {p.name: p.read_bytes() for p in (repo / "data" / "processed").iterdir()}
    assert after == before
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


def _mlflow_runs(root: Path) -> dict[str, object]:
    """Runs of the repo's store by name; of runs sharing a name, a finished one (a queued experiment
    killed when the queue hung, then run again, leaves a run RUNNING)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ctsynth")
    runs = {}
    for run in client.search_runs([exp.experiment_id]):
        if run.info.run_name not in runs or run.info.status == "FINISHED":
            runs[run.info.run_name] = run
    return runs


def _exp_metrics(root: Path) -> dict[str, dict]:
    """{baseline or experiment name: headline.json content} from `dvc exp show --json` (None: no
    metrics, e.g. queued; a name shown twice, finished and as a stale queue entry, keeps its metrics)."""
    found = {}
    for rev in json.loads(sh(root, "dvc", "exp", "show", "--json").stdout):
        revs = [rev] + [r for e in rev.get("experiments") or [] for r in e.get("revs", [])]
        for r in revs:
            data = ((r.get("data") or {}).get("metrics") or {}).get("reports/headline.json", {})
            name = r.get("name") or r["rev"]
            found[name] = found.get(name) or data.get("data")
    return found


def _finished_exps(root: Path) -> set[str]:
    """Names of the experiments of HEAD that finished (`dvc exp list`: their refs; a queued, running
    or failed one has none, though `exp show` may list it with the metrics its copy of the workspace
    holds)."""
    return set(sh(root, "dvc", "exp", "list", "--name-only").stdout.split())


QUEUE_TIMEOUT_S = 600     # three tiny experiments on two workers: about 2 minutes on 2 cores


def run_queue(root: Path, queued: dict[str, str], jobs: int) -> None:
    """Queue each ``name: key=value`` experiment and run the queue on ``jobs`` workers. DVC's queue
    sometimes never finishes (upstream's treeverse/dvc#10398, #10428: workers racing in the file-system
    message broker; `--run-all` then waits forever for a task no worker will run). When that happens the
    stuck processes are killed and the experiments that did not finish run one by one in the workspace
    (`dvc exp run` without the queue), with a warning, so the rest of the test still checks them."""
    for name, setting in queued.items():
        sh(root, "dvc", "exp", "run", "--queue", "-S", setting, "-n", name)
    try:
        sh(root, "dvc", "exp", "run", "--run-all", "-j", str(jobs), timeout=QUEUE_TIMEOUT_S)
        return
    except CommandHung as err:
        hang = str(err)
    missing = [name for name in queued if name not in _finished_exps(root)]
    warnings.warn(f"DVC's queue hung with {missing} unfinished; running those in the workspace:\n{hang[-3000:]}",
                  stacklevel=2)
    for name in missing:
        sh(root, "git", "checkout", "--", ".")
        sh(root, "dvc", "exp", "run", "-S", queued[name], "-n", name)
    sh(root, "git", "checkout", "--", ".")
    sh(root, "dvc", "checkout")


def test_experiment_loop_compare_switch_back_queue(repo, tmp_path):
    """A second clean copy gives byte-identical metrics; then the user's loop: commit, `dvc exp
    run -S`, compare (exp show / metrics / params / plots diff), switch back and forth without
    retraining, run-only params leave train up to date, queued experiments (-j 2) log into the
    repo's one MLflow store under their experiment names."""
    other = make_repo(tmp_path / "loop")
    sh(other, "dvc", "repro")
    assert (other / "reports" / "metrics.json").read_bytes() == (repo / "reports" / "metrics.json").read_bytes()
    sh(other, "git", "add", "-A")
    sh(other, "git", "commit", "-qm", "baseline run")
    assert not sh(other, "git", "status", "--porcelain").stdout.strip()      # results are committed
    base = json.loads((other / "reports" / "metrics.json").read_text())

    out = sh(other, "dvc", "exp", "run", "-S", "train.lambda_l1=50", "-n", "l1-50")
    assert "train" in stages_run(out.stdout) and "segmenter" not in stages_run(out.stdout)
    shown = _exp_metrics(other)
    assert shown["l1-50"]["ssim"] != base["ssim"] and any(v and v["ssim"] == base["ssim"] for v in shown.values())
    diff = json.loads(sh(other, "dvc", "metrics", "diff", "HEAD", "l1-50", "--json").stdout)
    assert "ssim" in diff["reports/headline.json"]
    params_diff = json.loads(sh(other, "dvc", "params", "diff", "HEAD", "l1-50", "--json").stdout)
    assert "train.lambda_l1" in params_diff["params.yaml"]
    plots = json.loads(sh(other, "dvc", "plots", "diff", "HEAD", "l1-50", "--json").stdout)["data"]
    assert any(set(p.get("revisions", [])) == {"HEAD", "l1-50"} for v in plots.values() for p in v)

    for back in (["git", "checkout", "--", "."], ["dvc", "exp", "apply", "l1-50"], ["git", "checkout", "--", "."]):
        sh(other, *back)
        sh(other, "dvc", "checkout")
        assert json.loads(sh(other, "dvc", "status", "--json").stdout) == {}, back
        assert stages_run(sh(other, "dvc", "repro").stdout) == [], back
    assert json.loads((other / "reports" / "metrics.json").read_text()) == base

    params = yaml.safe_load((other / "params.yaml").read_text())
    params["train_run"].update(log_every=3, checkpoint_every=5)
    params["tracking"]["experiment"] = "elsewhere"
    (other / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert set(json.loads(sh(other, "dvc", "status", "--json").stdout)) == {"report"}   # shows params
    sh(other, "git", "checkout", "params.yaml")

    queued = {"q-long": "train.iterations=8", "q-l1": "train.lambda_l1=20", "q-eval": "evaluate.kid_subset_size=3"}
    run_queue(other, queued, jobs=2)
    assert set(queued) <= _finished_exps(other)
    shown = _exp_metrics(other)
    assert all(shown[name] for name in queued), shown
    runs = _mlflow_runs(other)
    baseline_run = json.loads((other / "models" / "mlflow_run.json").read_text())["run_id"]
    assert runs["q-eval"].data.tags["ctsynth.train_run_id"] == baseline_run    # cached training,
    assert "Headline/ssim" in runs["q-eval"].data.metrics and "g_l1" not in runs["q-eval"].data.metrics  # own run
    for name in ("l1-50", "q-long", "q-l1"):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.tags["dvc.exp_name"] == name
        assert run.data.tags["dvc.baseline_rev"] == sh(other, "git", "rev-parse", "HEAD").stdout.strip()
        assert "Headline/ssim" in run.data.metrics and "g_l1" in run.data.metrics       # train, evaluate, report
    assert runs["q-long"].data.params["train.iterations"] == "8"


def test_remote_round_trip_into_a_fresh_clone(repo, tmp_path):
    """`dvc push` to a remote, then a fresh clone's `dvc pull` restores every result: `dvc
    status` is clean, `dvc repro` runs nothing and the report is there."""
    sh(repo, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results and remote")
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models" / "generator.pt").exists()
    sh(clone, "dvc", "pull")
    assert json.loads(sh(clone, "dvc", "status", "--json").stdout) == {}
    assert stages_run(sh(clone, "dvc", "repro").stdout) == []
    assert (clone / "reports" / "metrics.json").read_bytes() == (repo / "reports" / "metrics.json").read_bytes()
    assert "data:image/png;base64," in (clone / "reports" / "report.html").read_text()
    assert (clone / "models" / "generator.pt").read_bytes() == (repo / "models" / "generator.pt").read_bytes()


def _browser():
    """Headless Debian Chromium driven by Selenium through Debian's chromedriver (no download:
    Selenium Manager is not asked). `.ci/run` installs both and sets CTSYNTH_BROWSER_TESTS=required,
    so in CI a missing browser fails this test instead of skipping it."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CTSYNTH_BROWSER_TESTS") == "required":
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_review_in_the_browser_then_share_exports_exactly_the_accepted_passing_cases(repo, tmp_path):
    """`ctsynth review` in a real headless Chromium: accept two cases (a click, a key), reject one
    with a reason, reload and see the decisions kept; then with share.require_review, `dvc repro
    share` exports exactly the accepted cases that passed privacy, with a card whose counts match."""
    import socket

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ctsynth.cli", "review", "--reviewer", "alice", "--no-browser",
                               "--port", str(port)], cwd=repo, env=_env(repo), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    verdicts = pd.read_csv(repo / "reports" / "privacy_cases.csv").set_index("case").verdict
    cases = sorted(verdicts.index, key=lambda c: (verdicts[c] != "pass", c))      # passing cases first
    accept, reject = cases[:2], cases[2]
    try:
        wait = WebDriverWait(browser, 30)
        deadline = time.time() + 60
        while True:
            try:
                browser.get(f"http://127.0.0.1:{port}/")
                wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#detail h2")))  # first case open:
                break                                                    # the list is not re-rendered under us
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)

        def open_case(case):
            wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'#cases li[data-case="{case}"]'))).click()
            wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#detail h2"), case))
            wait.until(lambda d: d.execute_script("return document.querySelector('#img-axial').complete"))

        def saved(text):
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), text))

        open_case(accept[0])
        browser.find_element(By.ID, "accept").click()                               # by click
        saved("saved: accepted")
        open_case(accept[1])
        browser.find_element(By.TAG_NAME, "body").send_keys("a")                   # by keyboard
        saved("saved: accepted")
        open_case(reject)
        browser.find_element(By.CSS_SELECTOR, 'button[data-reason="artefact"]').click()
        saved("saved: rejected (artefact)")
        browser.refresh()                                                           # decisions survive a reload
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "3 of 3 reviewed"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#detail h2")))     # the list's last render
        badges = {li.get_attribute("data-case"): li.text for li in
                  browser.find_elements(By.CSS_SELECTOR, "#cases li[data-case]")}
        assert all("accepted" in badges[c] for c in accept) and "rejected" in badges[reject], badges
        browser.save_screenshot(str(tmp_path / "review.png"))
        assert (tmp_path / "review.png").stat().st_size > 10_000
    finally:
        browser.quit()
        server.terminate()
        server.wait(10)
    lines = [json.loads(x) for x in (repo / "reviews" / "alice.jsonl").read_text().splitlines()]
    assert [(x["case"], x["decision"], x["reason"]) for x in lines] == [
        (accept[0], "accept", None), (accept[1], "accept", None), (reject, "reject", "artefact")]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["share"]["require_review"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(sh(repo, "dvc", "repro", "share").stdout) == ["share"]       # reviews and params: share only
    expected = sorted(c for c in accept if verdicts[c] == "pass")
    shared = sorted(p.name[:-len("_image.nii.gz")] for p in (repo / "data" / "share" / "pairs").glob("*_image.nii.gz"))
    shared_as = json.loads((repo / "reports" / "share.json").read_text())["shared_as"]      # internal -> shared name
    assert sorted(shared_as) == expected and shared == sorted(shared_as.values())
    split = json.loads((repo / "data" / "split.json").read_text())
    patients = [c for cases in split.values() if isinstance(cases, list) for c in cases]
    for path in (repo / "data" / "share").rglob("*"):                 # no patient, no internal name leaves the site
        if path.is_file():
            data = path.read_bytes() + (gzip.decompress(path.read_bytes())[:352] if path.suffix == ".gz" else b"")
            assert not [c for c in patients + list(verdicts.index) if c.encode() in data], path
    card = json.loads((repo / "data" / "share" / "dataset_card.json").read_text())
    assert card["counts"] == {"made": len(verdicts), "passed_privacy": int((verdicts == "pass").sum()), "accepted": 2,
                              "rejected": 1, "stale_decisions": 0, "shared": len(expected)}
    assert card["reviews"]["reviewers"][0]["reviewer"] == "alice" and card["selection"]["review_required"]
    run_id = json.loads((repo / "models" / "mlflow_run.json").read_text())["run_id"]
    assert card["generator"]["mlflow"]["run_id"] == run_id
    import mlflow

    tags = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id).data.tags
    assert card["training_data"]["data_hash"] == tags["ctsynth.data_hash"]       # what the training saw
    assert json.loads((repo / "reports" / "share.json").read_text())["shared"] == expected


def test_the_utility_study_runs_as_its_own_resumable_dvc_pipeline(repo):
    """`dvc repro studies/utility/dvc.yaml` on the pipeline's outputs: one stage per cell, then the
    summary (table, figure, sentence); a second run does nothing, a lost cell reruns alone with the
    summary, and a grid asking for more patients than the split has stops with one clear line."""
    shutil.copytree(REPO / "studies", repo / "studies", ignore=shutil.ignore_patterns("cells", "results", "dvc.lock"),
                    dirs_exist_ok=True)
    spec = repo / "studies" / "utility" / "params.yaml"
    spec.write_text(yaml.safe_dump({"study": {"n_real": [1, 0], "draws": [1, 2], "seeds": [1], "shares": [0.5],
                                              "synthetic_cases": 1, "iterations": 4, "bootstrap": 50}}))
    ran = stages_run(sh(repo, "dvc", "repro", "studies/utility/dvc.yaml").stdout)
    cells = [f"studies/utility/dvc.yaml:cell@{n}-{d}" for n in (1, 0) for d in (1, 2)]
    assert sorted(ran) == sorted(cells + ["studies/utility/dvc.yaml:summary"]) and ran[-1].endswith("summary")
    results = repo / "studies" / "utility" / "results"
    n_train = len(json.loads((repo / "data" / "split.json").read_text())["train"])
    assert sorted(pd.read_csv(results / "curve.csv").n.unique()) == [1, n_train]
    sentence = json.loads((results / "summary.json").read_text())["sentence"]   # the stated rule: every n, a caveat
    assert sentence.startswith("Against classic augmentation, synthetic data (") and "Caveat:" in sentence
    assert all(f" {n}" in sentence or f"/{n}" in sentence for n in (1, n_train))
    assert (results / "curve.png").stat().st_size > 1000
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ctsynth-studies").experiment_id])
    assert len(runs) == 1 and "gain_over_classic/n1" in runs[0].data.metrics
    assert runs[0].info.run_name.startswith("utility-study-")
    # the study's answer reaches the pipeline's report through published.json alone: the report (and only
    # the report) is stale, reruns without running the study, and leads with the new sentence
    published = json.loads((repo / "studies" / "utility" / "published.json").read_text())
    assert published["sentence"] == json.loads((results / "summary.json").read_text())["sentence"]
    assert "report" in sh(repo, "dvc", "status").stdout
    assert stages_run(sh(repo, "dvc", "repro").stdout) == ["report"]
    page = (repo / "reports" / "report.html").read_text()
    assert escape(published["sentence"], quote=True) in page.split("id='metrics'")[0]
    assert stages_run(sh(repo, "dvc", "repro", "studies/utility/dvc.yaml").stdout) == []
    lost = repo / "studies" / "utility" / "cells" / "n1-d2.json"
    old = json.loads(lost.read_text())
    lost.unlink()                                                                    # an interrupted study
    ran = stages_run(sh(repo, "dvc", "repro", "studies/utility/dvc.yaml").stdout)
    new = json.loads(lost.read_text())
    assert {k: v for k, v in new.items() if k != "wall_s"} == {k: v for k, v in old.items() if k != "wall_s"}
    # the lost cell reruns alone, with the same results; the summary reruns when the cell file differs,
    # i.e. by its wall time (DVC compares the bytes, and the same wall time to 0.1 s leaves it up to date)
    assert ran == ["studies/utility/dvc.yaml:cell@1-2"] + (["studies/utility/dvc.yaml:summary"] if new != old else [])
    before = (results / "curve.csv").read_bytes()
    spec.write_text(spec.read_text().replace("- 1\n  - 0", f"- 1\n  - {n_train + 5}"))
    out = sh(repo, "dvc", "repro", "studies/utility/dvc.yaml", check=False)
    message = f"asks for {n_train + 5} real patients, the split has {n_train}"
    assert out.returncode != 0 and message in out.stdout + out.stderr
    assert (results / "curve.csv").read_bytes() == before


def test_the_whole_pipeline_runs_on_the_mr_phantom_with_anatomy(tmp_path):
    """`data.modality: mr`: the phantom draws bright-blood MR (mr_train_*), ingest normalises each volume to
    nu and derives its anatomy, the generator is conditioned on it (model.anatomy, anatomy_drop), and every
    stage runs; the report says MR and shows no Hounsfield unit."""
    root = make_repo(tmp_path / "mr")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["modality"] = "mr"
    params["model"]["anatomy"], params["train"]["anatomy_drop"] = True, 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "commit", "-qam", "mr")
    out = sh(root, "dvc", "repro")
    assert stages_run(out.stdout)[-1] == "report" and len(stages_run(out.stdout)) == 13
    manifest = pd.read_csv(root / "data" / "interim" / "manifest.csv")
    assert manifest.case.str.startswith("mr_train_").all() and set(manifest.modality) == {"mr"}
    meta = json.loads((root / "data" / "processed" / "meta.json").read_text())
    assert (meta["modality"], meta["unit"], meta["anatomy"]) == ("mr", "nu", "derived")
    validation = json.loads((root / "reports" / "validation.json").read_text())
    assert validation["val_heart_only_ssim"] is not None                  # drawn without its anatomy too
    synthetic = pd.read_csv(root / "data" / "synthetic" / "manifest.csv")
    image = nib.load(root / "data" / "synthetic" / synthetic.image_file.iloc[0]).get_fdata()
    assert image.min() >= 0 and image.max() <= 2000                       # magnitude-like: ingest takes it as MR
    page = (root / "reports" / "report.html").read_text()
    text = re.sub(r"<[^>]+>|data:image/png;base64,[A-Za-z0-9+/=]+", " ", page)
    assert "<b>MR.</b>" in page and " nu" in text and not re.search(r"\bHU\b", text)
    assert json.loads((root / "reports" / "metrics.json").read_text())["ssim"] is not None
