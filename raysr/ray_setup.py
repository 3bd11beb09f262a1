"""Ray around a raysr run: starting or joining Ray, the TorchTrainer a run is, the checkpoint
upload to S3, and a console that shows what a raysr user can act on.

* :func:`init_ray` — join the cluster in RAY_ADDRESS, else start a local Ray on 127.0.0.1
  (:data:`STARTED_LOCAL_RAY` says which).
* :func:`make_trainer` — the TorchTrainer for a config: :func:`scaling_config` (N workers, or
  elastic), :func:`uses_gpu`, :func:`validation_for_local_ray` (an actor that cannot fit goes inline),
  :func:`torch_trainer` (Ray's TorchTrainer less :func:`trainer_without_ray_data`: no Ray Data actor for
  a run that gives Ray Train no datasets; the benchmarks' Ray runs use it too).
* :func:`upload_checkpoint` — Ray's ``checkpoint_upload_fn`` for s3:// runs, failing loudly.
* :func:`quiet_output`, :func:`drop_ray_log_lines` — the known noise of torch, boto and Ray left out.

Every use of Ray's private API is in this module, each with a comment naming the public API
that is missing; when a Ray release moves it, raysr says so in one line and goes on without it.
Importing this module does not import ray, so ``python -m raysr.train --dry-run`` never loads Ray.
"""

from __future__ import annotations

import os
import shutil
import sys

from raysr.config import Config, config_from_dict
from raysr.storage import storage_args
from raysr.util import say

# Whether init_ray started a Ray instance of its own (this machine only: its resources never grow).
STARTED_LOCAL_RAY = False

UPLOAD_CHUNK_BYTES = 8 << 20

# Messages a raysr user cannot act on, silenced unless run.verbose: torch's DDP deprecation note
# (raysr passes the documented switch), the DataLoader's advice to use fewer processes than
# data.num_workers on a small box (which raysr's own data_wait_frac measures better).
NOISE_WARNINGS = (r"`broadcast_buffers` is deprecated", r"This DataLoader will create \d+ worker processes")
# INFO chatter: boto's "Found credentials in environment variables", Ray's token-auth notice.
NOISE_LOGGERS = ("botocore.credentials", "ray._private.authentication.authentication_token_setup")
# Lines Ray's processes log that say nothing to a raysr user: Ray Train's controller warns about
# its own PreemptionWatcher actor at every start.
NOISE_RAY_LINES = ("Actor with class name: 'PreemptionWatcher'",)


# --------------------------------------------------------------------------- Ray start-up


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set by ``ray job submit``), else start a local Ray on loopback."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import logging

    import ray
    if ray.is_initialized():
        return
    global STARTED_LOCAL_RAY
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        STARTED_LOCAL_RAY = os.environ["RAY_ADDRESS"] == "local"  # a new instance of this process's own
        return
    # A local instance binds to 127.0.0.1 only when Ray believes it is a single-machine install;
    # on Linux it otherwise listens on every interface. Ray reads this once, when first imported,
    # so set the variable (inherited by Ray's processes) and the already-read constant.
    # Private API: ray.init has no public switch that keeps a local instance's listeners on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:
        ray_constants = None
    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # where Ray renamed it, setting it would change nothing
        ray_constants.ENABLE_RAY_CLUSTER = False
    else:
        private_api_moved("ray._private.ray_constants.ENABLE_RAY_CLUSTER",
                          "this Ray's processes may listen on every network interface, not only 127.0.0.1")
    # address="local": always a new instance, never one a stale /tmp/ray/ray_current_cluster names.
    # The dashboard (127.0.0.1:8265) also serves the state API that Ray Train's controller polls.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=True)
    STARTED_LOCAL_RAY = True


def private_api_moved(name: str, consequence: str) -> None:
    """One line on stderr, once per process: the private Ray API ``name`` is not where this raysr
    expects it (another Ray release), and what the run does without it."""
    if name not in _SAID_MOVED:
        _SAID_MOVED.add(name)
        sys.stderr.write(f"raysr: warning: this Ray has no {name} (private API), so {consequence}\n")


_SAID_MOVED: set[str] = set()


# --------------------------------------------------------------------------- the TorchTrainer


def make_trainer(cfg: Config, train_loop_per_worker, callbacks=()):
    """The TorchTrainer that runs ``train_loop_per_worker`` (:func:`raysr.train.train_loop_per_worker`)
    for ``cfg`` (data already resolved; Ray already initialised), under ``run.name`` in ``run.storage``.

    ``raysr.tune`` builds one per trial (its config names the trial's run) with Tune's report callback.
    """
    import ray.train

    use_gpu = uses_gpu(cfg)
    if cfg.run.use_gpu == "auto" and not use_gpu and os.environ.get("RAY_ADDRESS"):
        print("raysr: warning: run.use_gpu=auto found no GPU in the cluster right now, so training runs on "
              "CPUs; on an autoscaling cluster whose GPU nodes start at zero, set run.use_gpu=true so Ray "
              "asks for GPU nodes", file=sys.stderr)
    cfg = validation_for_local_ray(cfg)
    return torch_trainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict()},
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
            **storage_args(cfg.run.storage)),
    )


def torch_trainer(*args, **kwargs):
    """Ray's ``TorchTrainer(*args, **kwargs)`` without Ray Data's set-up when given no datasets
    (:func:`trainer_without_ray_data`): the trainer of raysr's runs and of its benchmarks' Ray runs."""
    from ray.train.torch import TorchTrainer

    return trainer_without_ray_data(TorchTrainer)(*args, **kwargs)


def trainer_without_ray_data(trainer_cls):
    """``trainer_cls`` (Ray's TorchTrainer) less the Ray Data set-up it does for runs given no datasets.

    raysr streams its own shards (:mod:`raysr.data`) and hands Ray Train no Ray Data datasets, yet Ray
    Train 2.60 starts a DatasetManager actor at every worker-group start (each restart and resize too)
    and sends every worker Ray Data's context: one more process and about 3 CPU-s a start, for nothing
    (docs/testing.md says how that was measured). Private API: Ray has no switch for it; the trainer's
    ``_create_default_callbacks`` adds it as its ``DatasetsCallback``. Given datasets, the trainer keeps it.
    """
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
    except ImportError:
        DatasetsCallback = None
    if DatasetsCallback is None or not hasattr(trainer_cls, "_create_default_callbacks"):
        private_api_moved("ray.train.v2._internal.callbacks.DatasetsCallback",
                          "Ray Train starts its dataset actor for every worker group, which raysr does not use")
        return trainer_cls

    class Trainer(trainer_cls):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer


def uses_gpu(cfg: Config) -> bool:
    """Whether the run's workers take GPUs: ``run.use_gpu``, or with ``auto`` whether the cluster has
    any right now (Ray already initialised)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0 if cfg.run.use_gpu == "auto" else cfg.run.use_gpu


def validation_for_local_ray(cfg: Config, other_cpus: float = 0.0) -> Config:
    """``cfg``, or ``cfg`` with ``run.validation=inline`` when this process started its own Ray
    (:func:`init_ray`: one machine, which never grows) and the validation actor cannot fit there
    beside the training workers and ``other_cpus`` (a Tune trial's driver): it would never be placed.
    """
    import ray

    if cfg.run.validation != "async" or not STARTED_LOCAL_RAY:
        return cfg
    have = ray.cluster_resources()
    need = dict(cfg.run.validation_resources)
    kind = "GPU" if uses_gpu(cfg) else "CPU"
    need[kind] = need.get(kind, 0.0) + cfg.run.max_workers
    need["CPU"] = need.get("CPU", 0.0) + other_cpus
    if all(have.get(k, 0.0) >= v for k, v in need.items()):
        return cfg
    spare = max(0.0, have.get("CPU", 0.0) - (need["CPU"] - cfg.run.validation_resources.get("CPU", 0.0)))
    say(f"raysr: the validation actor (run.validation_resources={cfg.run.validation_resources}) does not fit "
        f"beside {cfg.run.max_workers} worker(s) on this machine ({have.get('CPU', 0):g} CPUs, "
        f"{have.get('GPU', 0):g} GPUs), so rank 0 validates (run.validation=inline) and every worker waits for it; "
        f"set run.validation_resources={{CPU: {spare:g}}} (what is left here; 0 shares the workers' cores) "
        "to keep validation off the training path")
    data = cfg.to_dict()
    data["run"]["validation"] = "inline"
    return config_from_dict(data)


def scaling_config(cfg: Config, use_gpu: bool):
    """Ray's ScalingConfig: ``run.num_workers`` N, or elastic between [min, max] workers, Ray looking
    for capacity to grow every ``run.resize_monitor_interval_s``. A resize restarts the worker group
    from the latest checkpoint (losing the steps since); a lost node counts as one of
    ``run.max_failures``, after which the group goes on with the workers that are left."""
    import ray.train

    if not cfg.run.elastic:
        return ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu)
    return ray.train.ScalingConfig(num_workers=(cfg.run.min_workers, cfg.run.max_workers), use_gpu=use_gpu,
                                   elastic_resize_monitor_interval_s=cfg.run.resize_monitor_interval_s)


def describe_workers(run) -> str:
    """``2 worker(s)``, or ``1-4 workers (elastic)``, for the start line."""
    return f"{run.min_workers}-{run.max_workers} workers (elastic)" if run.elastic else f"{run.num_workers} worker(s)"


# --------------------------------------------------------------------------- checkpoint upload


def upload_checkpoint(storage, checkpoint, dir_name: str):
    """Ray's ``checkpoint_upload_fn``: copy the local checkpoint folder into the run's storage
    (``storage``: Ray's StorageContext), one file at a time; return it as a ray.train.Checkpoint.

    Ray's default upload, ``pyarrow.fs.copy_files``, leaves closing each output stream to its
    destructor, which only logs an upload that failed after its retries and returns as if all went
    well (checked with pyarrow 26, on pyarrow's S3FileSystem and on raysr.storage.S3Handler), so
    Ray would register a checkpoint without that file. Closing the stream here raises the error
    instead: the report fails, and Ray restarts the workers from the last checkpoint it
    registered (run.max_failures), each of which therefore has all its files.
    """
    import ray.train

    fs, dest = storage.storage_filesystem, f"{storage.experiment_fs_path}/{dir_name}"
    fs.create_dir(dest)
    for name in sorted(os.listdir(checkpoint.path)):
        with open(os.path.join(checkpoint.path, name), "rb") as src, fs.open_output_stream(f"{dest}/{name}") as out:
            shutil.copyfileobj(src, out, UPLOAD_CHUNK_BYTES)
    return ray.train.Checkpoint(dest, filesystem=fs)


# --------------------------------------------------------------------------- console


def quiet_output(verbose: bool, rank: int = 0) -> None:
    """Keep the console to what matters: known noise silenced, each Python warning once per run
    (rank 0 shows it; the other ranks would repeat it word for word). ``verbose`` shows everything."""
    import logging
    import warnings

    if verbose:
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if rank > 0:
        warnings.simplefilter("ignore")
    for name in NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Train logs every ``report`` call at INFO under a logger named after its file, outside
    # ``LoggingConfig``'s reach; one progress line per log interval is all a person needs.
    # Private API: Ray names no public logger for these lines, so the file's path is looked up.
    try:
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        if rank == 0:  # every rank would say the same
            private_api_moved("ray.train.v2._internal.execution.context",
                              "Ray Train's INFO line for every report stays on the console")


def drop_ray_log_lines(fragments: tuple[str, ...]) -> None:
    """Leave out of the driver's console the lines of Ray's processes that contain one of ``fragments``.

    Ray hands every batch of worker log lines to the handlers of one dispatcher; raysr wraps the
    one that prints them. Private API: Ray's only public switch is ``log_to_driver``, all lines or none.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        with dispatcher._lock:
            handlers = dispatcher.handlers
    except (ImportError, AttributeError):
        private_api_moved("ray._private.ray_logging.global_worker_stdstream_dispatcher",
                          "lines such as Ray Train's PreemptionWatcher warning stay on the console")
        return
    for i, (name, handler) in enumerate(list(handlers)):
        if name != "ray_print_logs" or getattr(handler, "raysr_filtered", False):
            continue

        def filtered(data, print_lines=handler):
            lines = [line for line in data.get("lines", []) if not any(f in line for f in fragments)]
            if lines:
                print_lines({**data, "lines": lines})

        filtered.raysr_filtered = True
        handlers[i] = (name, filtered)
