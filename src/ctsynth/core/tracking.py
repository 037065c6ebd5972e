"""MLflow tracking -- the only module that imports mlflow.

Training (rank 0 only) opens a run, the later stages log into the same run::

    tracker = open_run(params, "models/mlflow_run.json")     # fails fast if the store won't open
    tracker.log_metrics({"g_l1": 0.1}, step=100)
    tracker.log_generator(generator, example_condition)
    tracker.close()

    with resume_run("models/mlflow_run.json") as run:         # evaluate / report stages
        run.log_metrics({"ssim": 0.8})
        run.log_artifact("reports/report.html")

Tracking URI: ``$MLFLOW_TRACKING_URI``, else ``tracking.uri`` from params, else
``sqlite:///<project root>/mlflow.db``, where the project root is ``$DVC_ROOT`` (DVC sets it for
every stage, and under ``dvc exp run --queue/--temp`` points it at the user's repository, not
the temporary copy) or the nearest folder above the working directory holding ``.dvc/``. So
runs from the workspace, from experiments and from the queue all land in the repo's one store.
Runs are named after the DVC experiment (``$DVC_EXP_NAME``) and tagged with it, its baseline
revision, the git commit and the hash of the training data. With ``tracking.enabled: false``
every call is a no-op.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ctsynth.core.errors import TrainingError
from ctsynth.core.io import project_root, write_json
from ctsynth.core.paths import pipeline_path

log = logging.getLogger(__name__)

_QUIET = ("mlflow", "alembic", "sqlalchemy", "urllib3", "git", "databricks")
# MLflow 3's UI opens an experiment in its GenAI view unless it is marked as model development
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _quiet_mlflow() -> None:
    """Silence mlflow's own info chatter (store migrations, 'view run at ...', env inference)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401 - configures its loggers on import; override them afterwards

    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")


def tracking_uri(params: Any) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``tracking.uri`` > ``sqlite:///<project root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def run_name(kind: str = "train") -> str:
    """The DVC experiment's name (``$DVC_EXP_NAME``, set by ``dvc exp run``), else
    ``<kind>-<commit>-<UTC time>``."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    commit = (git_commit() or "nogit")[:7]
    return f"{kind}-{commit}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def provenance_tags() -> dict[str, str]:
    """``git_commit``, plus ``dvc.exp_name`` and ``dvc.baseline_rev`` under ``dvc exp run``."""
    tags = {"dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV")}
    return {"git_commit": git_commit() or "unknown (no git checkout)", **{k: v for k, v in tags.items() if v}}


def git_commit(cwd: str | Path = ".") -> str | None:
    """Current commit hash, or None outside a git checkout / without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def data_version(lock_path: str | Path = "dvc.lock") -> dict[str, str]:
    """md5s of the processed store and the split (``ctsynth.core.paths``) as recorded in dvc.lock
    (if present)."""
    import yaml

    lock = Path(lock_path)
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    tags = {pipeline_path("processed"): "data.processed_md5", pipeline_path("split"): "data.split_md5"}
    found = {}
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            where = str(out.get("path", "")).rstrip("/")
            if where in tags and out.get("md5"):
                found[tags[where]] = out["md5"]
    return found


def _plain(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text[:6000]


class Tracker:
    """One MLflow run. A disabled tracker (``run_id is None``) accepts every call and does nothing."""

    def __init__(self, run_id: str | None = None, uri: str | None = None, experiment: str | None = None):
        self.run_id, self.uri, self.experiment = run_id, uri, experiment

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.uri)

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log params not yet in the run (MLflow refuses to change a logged value)."""
        if self.active:
            from mlflow.entities import Param
            client = self._client()
            existing = client.get_run(self.run_id).data.params
            new = [Param(k, _plain(v)) for k, v in flat.items() if k not in existing]
            for i in range(0, len(new), 100):
                client.log_batch(self.run_id, params=new[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            from mlflow.entities import RunTag
            self._client().log_batch(self.run_id, tags=[RunTag(k, _plain(v)) for k, v in tags.items()
                                                        if v is not None])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
            self._client().log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._client().log_artifact(self.run_id, str(path), artifact_path)

    def log_generator(self, generator, example, registered_model: str | None = None) -> None:
        """Log the generator with ``mlflow.pytorch.log_model`` (pt2 export, batch >= 2 example);
        with ``registered_model``, also as a new version of that model in the Model Registry.

        ``generator`` is exported as a CPU fp32 copy in eval mode; ``example`` is a condition
        batch (B >= 2, C, S, S) -- a batch-1 example would specialise the exported batch dim.
        """
        if not self.active:
            return
        import copy

        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        raw = getattr(generator, "module", generator)
        raw = getattr(raw, "_orig_mod", raw)
        model = copy.deepcopy(raw).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
        example = example.detach().to("cpu", torch.float32).contiguous()
        if example.shape[0] < 2:
            example = torch.cat([example, example])
        with torch.inference_mode():
            out = model(example)
        signature = infer_signature(example.numpy(), out.numpy())
        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(model, name="generator", signature=signature,
                                         input_example=example.numpy(),
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                         registered_model_name=registered_model)
        except Exception as e:  # noqa: BLE001 - export/store problems must not lose a finished training
            log.warning("MLflow: logging the generator failed (%s: %s); the model file is complete",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.set_tags({"ctsynth.log_model_error": f"{type(e).__name__}: {e}"})

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run terminated; a store error here is logged, never raised over the real one."""
        if self.active:
            try:
                self._client().set_terminated(self.run_id, status)
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: could not mark run %s %s (%s)", self.run_id, status, e)


def _connect(uri: str, experiment: str):
    """Open the store and get/create the experiment; raise TrainingError with the reason."""
    _quiet_mlflow()
    import mlflow
    from mlflow.exceptions import MlflowException

    artifacts, db = None, None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrainingError(f"MLflow store {uri}: folder {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrainingError(f"MLflow store {uri}: not writable")
        artifacts = (db.parent / "mlruns").as_uri()     # next to the db, not under a temp cwd
    try:
        with _store_lock(db):            # parallel queue workers: one creates the schema and the experiment
            mlflow.set_tracking_uri(uri)
            client = mlflow.tracking.MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifacts)
            if exp is None or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    except (MlflowException, OSError, ValueError) as e:
        raise TrainingError(f"MLflow store {uri} cannot be opened: {str(e).splitlines()[0]}") from None
    except Exception as e:  # sqlalchemy / requests errors surface as many types
        raise TrainingError(f"MLflow store {uri} cannot be opened: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return client, exp_id


@contextlib.contextmanager
def _store_lock(db: Path | None) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` while a SQLite store is opened: two processes opening a new
    store at once (``ctsynth compare run --jobs 2`` on a fresh clone) both ran MLflow's schema
    migrations and one failed ("duplicate column name"). No lock for other stores or without fcntl."""
    try:
        import fcntl
    except ImportError:                  # not POSIX: no lock (the race needs parallel first runs)
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flat_params(params: Any) -> dict[str, str]:
    from ctsynth.core.config import flatten, to_dict
    return {k: _plain(v) for k, v in flatten(to_dict(params)).items()}


def open_run(params: Any, run_file: str | Path, resume_run_id: str | None = None,
             split_path: str | Path | None = None, data_hash: str | None = None) -> Tracker:
    """Start (or reopen ``resume_run_id``) a run, log params and tags, write ``run_file``.

    Call on rank 0 only, before training. Raises :class:`TrainingError` if the store cannot
    be opened. With ``tracking.enabled: false`` returns a disabled tracker and writes a
    run file with ``run_id: null``. ``split_path`` (default: the pipeline's split) is hashed into
    the ``data.split_sha256`` tag.
    """
    if not getattr(params.tracking, "enabled", True):
        write_json(run_file, {"run_id": None, "tracking_uri": None, "experiment": None})
        log.info("MLflow tracking disabled (tracking.enabled: false)")
        return Tracker()
    uri, experiment = tracking_uri(params), params.tracking.experiment
    client, exp_id = _connect(uri, experiment)
    flat = _flat_params(params)
    run_id = None
    if resume_run_id:
        try:
            old = client.get_run(resume_run_id)
            same = all(old.data.params.get(k, v) == v for k, v in flat.items())
            if old.info.experiment_id == exp_id and same:
                run_id = resume_run_id
                client.update_run(run_id, status="RUNNING")
                log.info("MLflow: continuing run %s", run_id)
        except Exception as e:  # noqa: BLE001 - a vanished run just means a new one
            log.warning("MLflow: cannot continue run %s (%s); starting a new one", resume_run_id, e)
    if run_id is None:
        run = client.create_run(exp_id, run_name=run_name())
        run_id = run.info.run_id
        if resume_run_id:
            client.set_tag(run_id, "ctsynth.resumed_from_run", resume_run_id)
    tracker = Tracker(run_id, uri, experiment)
    tracker.log_params(flat)
    tags = {**provenance_tags(), **data_version(), "ctsynth.data_hash": data_hash}
    split = Path(split_path or pipeline_path("split"))
    if split.is_file():
        tags["data.split_sha256"] = hashlib.sha256(split.read_bytes()).hexdigest()[:16]
    tracker.set_tags(tags)
    write_json(run_file, {"run_id": run_id, "tracking_uri": uri, "experiment": experiment})
    log.info("MLflow: run %s in experiment %r at %s", run_id, experiment, uri)
    return tracker


def read_run_file(run_file: str | Path) -> dict:
    path = Path(run_file)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path}: MLflow run file not found (run the train stage first)") from None
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: not a valid MLflow run file ({e})") from None
    if not isinstance(info, dict) or "run_id" not in info:
        raise TrainingError(f"{path}: not an MLflow run file (no run_id)")
    return info


@contextlib.contextmanager
def resume_run(run_file: str | Path) -> Iterator[Tracker]:
    """Reopen the training run named in ``run_file`` for later stages (a disabled tracker if
    tracking was off when it trained)."""
    info = read_run_file(run_file)
    if not info.get("run_id"):
        yield Tracker()
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI") or info["tracking_uri"]
    _connect(uri, info["experiment"])
    yield Tracker(info["run_id"], uri, info["experiment"])


@contextlib.contextmanager
def evaluation_run(run_file: str | Path, params: Any) -> Iterator[Tracker]:
    """The run that the evaluation of ``run_file``'s training logs into: the training run itself
    the first time; once that training has been evaluated, a new run (named after the DVC
    experiment, tagged ``ctsynth.train_run_id``) -- e.g. an experiment that changed only
    evaluation params and reused the cached training -- so no evaluation overwrites another."""
    with resume_run(run_file) as train_run:
        if not train_run.active:
            yield train_run
            return
        client = train_run._client()
        trained = client.get_run(train_run.run_id)
        if trained.data.tags.get("ctsynth.evaluated") != "true":
            yield train_run
            train_run.set_tags({"ctsynth.evaluated": "true"})
            return
        new = client.create_run(trained.info.experiment_id, run_name=run_name("eval"))
        run = Tracker(new.info.run_id, train_run.uri, train_run.experiment)
        run.log_params(_flat_params(params))
        run.set_tags({**provenance_tags(), "ctsynth.train_run_id": train_run.run_id, "ctsynth.evaluated": "true"})
        log.info("MLflow: training run %s was evaluated before; this evaluation is run %s",
                 train_run.run_id, run.run_id)
        try:
            yield run
        except BaseException:
            run.close("FAILED")
            raise
        run.close("FINISHED")


def log_evaluation(run_file: str | Path, params: Any, metrics: Mapping[str, Any], files: list,
                   artifacts: Mapping[str, str] | None = None) -> None:
    """Log every numeric metric, the report (``.html``) and its figures into the evaluation run
    of ``run_file``'s training (:func:`evaluation_run`); ``artifacts``: more files, path -> the
    artifact folder they go to (e.g. the shared dataset's card: ``share``)."""
    with evaluation_run(run_file, params) as run:
        run.log_metrics({k: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for f in files:
            run.log_artifact(f, "report" if Path(f).suffix == ".html" else "report/figures")
        for f, folder in (artifacts or {}).items():
            if Path(f).is_file():
                run.log_artifact(f, folder)
        if run.active:
            log.info("report and %d metrics logged to MLflow run %s", len(metrics), run.run_id)


def log_study(params: Any, name: str, study_params: Mapping[str, Any], metrics: Mapping[str, float],
              files: list) -> str | None:
    """Log an on-demand study's summary as one run (named ``<name>-<commit>-<time>``) in experiment
    ``<tracking.experiment>-studies``: its params, metrics and files. Returns the run id; None when
    tracking is off or the store cannot be opened (a warning: the study's files are complete)."""
    if not getattr(params.tracking, "enabled", True):
        return None
    try:
        uri = tracking_uri(params)
        client, exp_id = _connect(uri, f"{params.tracking.experiment}-studies")
    except TrainingError as e:
        log.warning("MLflow: study %s not logged (%s)", name, e)
        return None
    run = Tracker(client.create_run(exp_id, run_name=run_name(name)).info.run_id, uri,
                  f"{params.tracking.experiment}-studies")
    run.log_params({f"study.{k}": _plain(v) for k, v in study_params.items()})
    run.set_tags(provenance_tags())
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for f in files:
        if Path(f).is_file():
            run.log_artifact(f, name)
    run.close()
    log.info("MLflow: study %s logged as run %s", name, run.run_id)
    return run.run_id

