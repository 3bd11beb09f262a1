"""Where a training run's numbers go besides the console: the experiment trackers of ``run.trackers``.

    tensorboard   events under ``<run>/tensorboard`` (:class:`raysr.runlog.TensorBoard`)
    mlflow        an MLflow run: the config as parameters, every metric at its step, the comparison images
    wandb         a Weights & Biases run: the same, with ``step`` and ``val_step`` as its x-axes

Rank 0 (:mod:`raysr.rank_zero`) holds one :class:`Trackers` and hands it every report
(:meth:`Trackers.log_train`, at the report's step) and every finished validation
(:meth:`Trackers.log_validation`, at ``val_step``, the step of the weights it scored).

A rerun of the same ``run.name``, a resume and a worker-group restart continue the same MLflow and
W&B runs: their ids live in ``<run>/trackers.json`` (this module is the one that reads and writes
it), written when a tracker run is first opened. Steps between the last checkpoint and a failure
are trained again after a restart, so they are logged again too (both values show in the history).

Trackers are side tasks: each one runs on a thread of its own, so a slow or unreachable server
never holds up a training step, and a tracker call that fails is reported once with its cause
(later failures are counted and summed up at the end) while training goes on. Plain Python:
no Ray here; mlflow and wandb are imported only when a run asks for them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import secrets
import string
import threading
import time
from importlib.util import find_spec

from raysr.config import Config, ConfigError, config_from_dict
from raysr.runlog import TensorBoard
from raysr.storage import exists, is_s3, join, read_bytes, write_bytes
from raysr.util import say

IDS_FILE = "trackers.json"  # {"mlflow": {"tracking_uri", "run_id"}, "wandb": {"project", "entity", "run_id"}}
DEFAULT_EXPERIMENT = "raysr"  # MLflow experiment and W&B project when neither the config nor the env names one
MLFLOW_DB = "mlflow.db"  # the default MLflow store: sqlite:///<run.storage>/mlflow.db
CLOSE_WAIT_S = 120.0  # the end of a run waits this long, in all, for tracker writes still queued
# the Python packages each tracker needs, and the extra that installs them
PACKAGES = {"mlflow": ("mlflow",), "wandb": ("wandb",)}
SQL_PACKAGES = ("sqlalchemy", "alembic")  # MLflow's database stores (sqlite://, postgresql://, ...)


# --------------------------------------------------------------------------- settings, before Ray starts


def resolve_settings(cfg: Config) -> Config:
    """``cfg`` with the tracker settings it leaves unset filled in as the run will use them (a key
    set in the config wins, then the environment variable, then the default), so every worker,
    wherever it runs, logs to the same place; :mod:`raysr.train` calls it before Ray starts.

    MLflow: ``run.mlflow_tracking_uri`` <- MLFLOW_TRACKING_URI <- ``sqlite:///<run.storage>/mlflow.db``
    (local storage only); ``run.mlflow_experiment`` <- MLFLOW_EXPERIMENT_NAME <- ``raysr``.
    W&B: ``run.wandb_project`` <- WANDB_PROJECT <- ``raysr``; ``run.wandb_entity`` <- WANDB_ENTITY
    (else the API key's default entity); ``run.wandb_mode`` <- WANDB_MODE <- ``online``.

    Raises ConfigError when a tracker's package is missing or its settings cannot work.
    """
    run = cfg.run
    data = cfg.to_dict()
    if "mlflow" in run.trackers:
        uri = run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(run.storage)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: to this folder, not a worker's
            uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        _need("mlflow", PACKAGES["mlflow"] + (SQL_PACKAGES if is_database(uri) else ()))
        data["run"].update(mlflow_tracking_uri=uri, mlflow_experiment=run.mlflow_experiment or os.environ.get(
            "MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    if "wandb" in run.trackers:
        _need("wandb", PACKAGES["wandb"])
        mode = run.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older names
        if mode not in ("online", "offline"):
            raise ConfigError(f"run.wandb_mode: WANDB_MODE={mode!r}; raysr logs to W&B online or offline (to sync "
                              "later); set WANDB_MODE=online|offline, or remove wandb from run.trackers")
        data["run"].update(wandb_mode=mode, wandb_project=run.wandb_project or os.environ.get("WANDB_PROJECT")
                           or DEFAULT_EXPERIMENT, wandb_entity=run.wandb_entity or os.environ.get("WANDB_ENTITY"))
    return config_from_dict(data)


def default_mlflow_uri(storage: str) -> str:
    """``sqlite:///<storage>/mlflow.db`` beside the runs. Raises ConfigError for s3:// storage."""
    if is_s3(storage):
        raise ConfigError(f"run.trackers: mlflow with run.storage={storage} needs a tracking server: set "
                          "MLFLOW_TRACKING_URI or run.mlflow_tracking_uri (e.g. http://mlflow.internal:5000); "
                          "the default local store (sqlite) cannot live in S3")
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(storage)), MLFLOW_DB)


def is_database(uri: str) -> bool:
    """Whether an MLflow tracking URI names a database store (MLflow opens those through SQLAlchemy)."""
    return uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")


def _need(tracker: str, modules: tuple[str, ...]) -> None:
    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise ConfigError(f"run.trackers: {tracker} needs the Python package(s) {', '.join(missing)}, which are not "
                          f"installed: pip install 'raysr[{tracker}]' (or remove {tracker} from run.trackers)")


# --------------------------------------------------------------------------- the ids of a run's tracker runs

_IDS_LOCK = threading.Lock()  # each tracker's thread updates its own entry of the one file


def read_ids(run: str) -> dict:
    """``<run>/trackers.json`` (local or s3://) as a dict; {} when there is none yet."""
    uri = join(run, IDS_FILE)
    return json.loads(read_bytes(uri)) if exists(uri) else {}


def _save_id(run: str, tracker: str, entry: dict) -> None:
    with _IDS_LOCK:
        ids = read_ids(run)
        ids[tracker] = entry
        if not is_s3(run):
            os.makedirs(run, exist_ok=True)
        write_bytes(join(run, IDS_FILE), json.dumps(ids, indent=2, sort_keys=True).encode())


def _numbers(metrics: dict, drop: str) -> dict:
    """The int/float values of a report (not bools, not the ``drop`` axis key)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != drop}


def _flatten(data: dict, prefix: str = "") -> dict:
    """A config's ``to_dict()`` as {"run.name": "...", "loss.pixel.weight": "1.0", ...} (strings)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict, type(None), bool)) else str(value)
    return out


# --------------------------------------------------------------------------- the trackers


class TensorBoardTracker:
    """``<run>/tensorboard`` events (:class:`raysr.runlog.TensorBoard`)."""

    name = "tensorboard"

    def __init__(self, cfg: Config, run: str):
        self.board = TensorBoard(run)

    def log(self, step: int, metrics: dict, comparison: bytes | None, axis: str) -> None:
        self.board.log(step, _numbers(metrics, axis), comparison)

    def flush(self) -> None:
        self.board.flush()

    def close(self, finished: bool) -> None:
        self.board.close()


class MLflowTracker:
    """One MLflow run per raysr run, continued by reruns of the same ``run.name``: the config as
    parameters (a value changed on resume goes into a ``changed.<key>`` tag: MLflow keeps parameters
    immutable), each metric at its step, the comparison image as ``comparison`` at ``val_step``."""

    name = "mlflow"

    def __init__(self, cfg: Config, run: str):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if not cfg.run.verbose:  # "Creating initial MLflow database tables..." at every new store
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        uri = cfg.run.mlflow_tracking_uri
        if uri.startswith("sqlite:///"):  # sqlite creates the file, not its folder
            os.makedirs(os.path.dirname(uri[len("sqlite:///"):]), exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        params = _flatten(cfg.to_dict())
        saved = read_ids(run).get(self.name, {})
        self.run_id = None
        if saved.get("tracking_uri") == uri:
            try:
                stage = self.client.get_run(saved["run_id"]).info.lifecycle_stage
            except MlflowException as err:
                stage = f"not found: {err}"
            if stage == "active":
                self.run_id = saved["run_id"]
            else:
                say(f"raysr: mlflow: the MLflow run {saved['run_id']} this run logged to is {stage} at {uri}; "
                    "starting a new MLflow run")
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            before = self.client.get_run(self.run_id).data.params
            self._params({k: v for k, v in params.items() if k not in before})
            for key in sorted(k for k in params if k in before and before[k] != params[k]):
                self.client.set_tag(self.run_id, f"changed.{key}", params[key])
            say(f"raysr: mlflow: continuing run {self.run_id} at {uri}")
        else:
            experiment = self._experiment(cfg.run.mlflow_experiment or DEFAULT_EXPERIMENT, uri, MlflowException)
            self.run_id = self.client.create_run(experiment, run_name=cfg.run.name,
                                                 tags={"raysr.run_folder": run}).info.run_id
            _save_id(run, self.name, {"tracking_uri": uri, "run_id": self.run_id})
            self._params(params)
            say(f"raysr: mlflow: run {self.run_id} in experiment {cfg.run.mlflow_experiment} at {uri}")

    def _experiment(self, name: str, uri: str, error) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # the default sqlite store keeps artifacts beside it (MLflow's default is ./mlruns in the worker's folder)
        artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts") \
            if uri.startswith("sqlite:///") else None
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except error:  # another run (a Tune trial) created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow keeps values up to 6000 characters (a long data.train list can exceed it)
        items = [Param(k, v if len(v) <= 6000 else v[:5980] + " ... (cut)") for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict, comparison: bytes | None, axis: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in sorted(_numbers(metrics, axis).items())]
        for i in range(0, len(values), 1000):
            self.client.log_batch(self.run_id, metrics=values[i:i + 1000])
        if comparison is not None:
            from PIL import Image
            self.client.log_image(self.run_id, Image.open(io.BytesIO(comparison)), key="comparison", step=step)

    def flush(self) -> None: ...

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "FAILED")


class WandbTracker:
    """One W&B run per raysr run (id chosen here and kept in ``trackers.json``, so a rerun resumes
    it), files under ``<run>/wandb`` for local runs. Training metrics are plotted against ``step``,
    validation metrics and the ``comparison`` image against ``val_step``: W&B's own ``_step``
    must grow, while a validation reaches the log after later training steps."""

    name = "wandb"

    def __init__(self, cfg: Config, run: str):
        import wandb

        saved = read_ids(run).get(self.name, {})
        where = {"project": cfg.run.wandb_project, "entity": cfg.run.wandb_entity}
        same = saved.get("project") == where["project"] and saved.get("entity") == where["entity"]
        run_id = saved["run_id"] if same else "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                       for _ in range(8))  # W&B's own id form
        if not same:  # before init: a run that dies while W&B starts still finds its id
            _save_id(run, self.name, {**where, "run_id": run_id})
        folder = None if is_s3(run) else run  # W&B adds wandb/ (s3:// runs: WANDB_DIR, else the worker's folder)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(id=run_id, resume="allow", name=cfg.run.name, config=cfg.to_dict(),
                              allow_val_change=True, mode=cfg.run.wandb_mode, dir=folder, **where,
                              settings=wandb.Settings(console="off", silent=True))
        self.defined: set[str] = set()  # keys whose x-axis W&B was told
        say(f"raysr: wandb: {'continuing' if same else 'run'} {run_id} in project {where['project']} "
            f"({cfg.run.wandb_mode})")

    def log(self, step: int, metrics: dict, comparison: bytes | None, axis: str) -> None:
        values = {**_numbers(metrics, axis), axis: step}
        if comparison is not None:
            from PIL import Image
            values["comparison"] = self.wandb.Image(Image.open(io.BytesIO(comparison)), caption="bicubic | SR | HR")
        for key in values.keys() - self.defined:  # each key's x-axis, once
            self.run.define_metric(key, step_metric=None if key == axis else axis)
            self.defined.add(key)
        self.run.log(values)

    def flush(self) -> None: ...

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


BACKENDS = {t.name: t for t in (TensorBoardTracker, MLflowTracker, WandbTracker)}


class _Worker:
    """One tracker on a thread of its own: opened there, then every call in order. A failure is
    reported once with its cause; a tracker that cannot open logs nothing more."""

    def __init__(self, name: str, cfg: Config, run: str):
        self.name, self.failed, self.tracker = name, 0, None
        self.calls: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, args=(cfg, run), name=f"raysr-{name}", daemon=True)
        self.thread.start()

    def call(self, method: str, *args) -> None:
        self.calls.put((method, args))

    def _serve(self, cfg: Config, run: str) -> None:
        try:
            self.tracker = BACKENDS[self.name](resolve_settings(cfg), run)  # as raysr.train resolved them
        except Exception as err:  # a missing server, a bad URI: training goes on without this tracker
            say(f"raysr: warning: {self.name} could not start ({type(err).__name__}: {err}); this run logs "
                f"nothing to {self.name}, training goes on")
            self.failed = -1
        while True:
            method, args = self.calls.get()
            if method is None:
                return
            if self.tracker is None:
                continue
            try:
                getattr(self.tracker, method)(*args)
            except Exception as err:
                self.failed += 1
                if self.failed == 1:
                    say(f"raysr: warning: {self.name} {method} failed ({type(err).__name__}: {err}); training "
                        "goes on, later failures are counted")

    def stop(self, deadline: float) -> None:
        self.calls.put((None, ()))
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            say(f"raysr: warning: {self.name} still had {self.calls.qsize()} write(s) queued after "
                f"{CLOSE_WAIT_S:.0f} s; left unwritten")
        elif self.failed > 1:
            say(f"raysr: warning: {self.failed} {self.name} call(s) failed in this run")


class Trackers:
    """The trackers of ``run.trackers`` for the run folder ``run`` (local or s3://), each on a thread
    of its own: calls return at once, in order per tracker; none of them raises."""

    def __init__(self, cfg: Config, run: str):
        self.workers = [_Worker(name, cfg, run) for name in cfg.run.trackers]

    def log_train(self, step: int, metrics: dict) -> None:
        """A report's metrics (numbers only; ``step`` is the x-axis) at ``step``."""
        for w in self.workers:
            w.call("log", step, dict(metrics), None, "step")

    def log_validation(self, metrics: dict, comparison: bytes | None) -> None:
        """A finished validation at ``metrics["val_step"]``, with its bicubic | SR | HR PNG."""
        for w in self.workers:
            w.call("log", metrics["val_step"], dict(metrics), comparison, "val_step")

    def flush(self) -> None:
        for w in self.workers:
            w.call("flush")

    def close(self, finished: bool = True) -> None:
        """End each tracker run (``finished``: reached its last step; else it diverged) and wait for the
        writes still queued, at most :data:`CLOSE_WAIT_S` in all."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        for w in self.workers:
            w.call("close", finished)
        for w in self.workers:
            w.stop(deadline)
