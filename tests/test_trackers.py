"""Experiment trackers (raysr.trackers, ``run.trackers``): settings resolved before Ray starts, a
missing package as a clear error, and what a run's reports leave in MLflow and W&B — read back
with MLflow's own client from a local sqlite store and from W&B's offline run files — including a
rerun that continues the same tracker runs and trackers that fail without stopping anything.

The fake runs here hand :class:`raysr.trackers.Trackers` the reports rank 0 hands it (no Ray);
one real ``raysr.train`` run (slow) checks the whole path, resume included."""

from __future__ import annotations

import io
import json
import socket
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from raysr.config import ConfigError, load_config
from raysr.trackers import IDS_FILE, Trackers, resolve_settings
from raysr.train import main

ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def tracked(storage, *overrides, trackers="[mlflow, wandb]"):
    return load_config(overrides=[f"run.storage={storage}", f"run.trackers={trackers}", *overrides])


# --------------------------------------------------------------------------- settings (fast, no tracker imported)


def test_unset_settings_come_from_the_environment_else_the_defaults(clean_env, tmp_path):
    cfg = resolve_settings(tracked(tmp_path)).run
    assert cfg.mlflow_tracking_uri == f"sqlite:///{tmp_path}/mlflow.db" and cfg.mlflow_experiment == "raysr"
    assert (cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode) == ("raysr", None, "online")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "sr")
    clean_env.setenv("WANDB_PROJECT", "proj")
    clean_env.setenv("WANDB_ENTITY", "team")
    clean_env.setenv("WANDB_MODE", "dryrun")  # wandb's older name for offline
    cfg = resolve_settings(tracked(tmp_path)).run
    assert (cfg.mlflow_tracking_uri, cfg.mlflow_experiment) == ("http://127.0.0.1:5000", "sr")
    assert (cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode) == ("proj", "team", "offline")
    # a key in the config wins over the environment
    clean_env.chdir(tmp_path)  # a relative sqlite path is made absolute here, where the command runs
    cfg = resolve_settings(tracked(tmp_path, "run.mlflow_tracking_uri=sqlite:///x.db", "run.wandb_project=p2",
                                   "run.wandb_mode=online")).run
    assert (cfg.mlflow_tracking_uri, cfg.wandb_project, cfg.wandb_mode) == (f"sqlite:///{tmp_path}/x.db", "p2", "online")
    assert resolve_settings(tracked(tmp_path, trackers="tensorboard")).run.mlflow_tracking_uri is None


def test_tracker_settings_that_cannot_work_are_config_errors(clean_env, tmp_path):
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI or run.mlflow_tracking_uri"):
        resolve_settings(tracked("s3://bucket/runs", trackers="mlflow"))
    resolve_settings(tracked("s3://bucket/runs", "run.mlflow_tracking_uri=http://127.0.0.1:5000", trackers="mlflow"))
    clean_env.setenv("WANDB_MODE", "disabled")
    with pytest.raises(ConfigError, match="run.wandb_mode: WANDB_MODE='disabled'"):
        resolve_settings(tracked(tmp_path, trackers="wandb"))
    with pytest.raises(ConfigError, match="run.trackers: mlflow is listed more than once"):
        tracked(tmp_path, trackers="[mlflow, tensorboard, mlflow]")
    with pytest.raises(ConfigError, match=r"run.trackers\[0\]: 'comet' is not allowed"):
        tracked(tmp_path, trackers="comet")
    assert tracked(tmp_path, trackers="wandb").run.trackers == ["wandb"]  # one name, no brackets


@pytest.mark.parametrize("hidden, trackers, extra", [
    ("mlflow", "mlflow", "mlflow"), ("wandb", "[tensorboard, wandb]", "wandb"),
    ("sqlalchemy", "mlflow", "mlflow"),  # the default sqlite store needs SQLAlchemy beside mlflow-skinny
])
def test_a_missing_tracker_package_exits_2_before_ray_naming_the_extra(clean_env, tmp_path, capsys,
                                                                        hidden, trackers, extra):
    clean_env.setitem(sys.modules, hidden, None)  # what importing a package that is not installed finds
    argv = ["--set", f"run.storage={tmp_path}", "--set", f"run.trackers={trackers}", "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"run.trackers: {extra} needs the Python package(s) {hidden}" in err
    assert f"pip install 'raysr[{extra}]'" in err


def test_a_server_store_needs_no_sqlalchemy_and_dry_run_shows_where_runs_log(clean_env, tmp_path, capsys):
    clean_env.setitem(sys.modules, "sqlalchemy", None)
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert main(["--set", f"run.storage={tmp_path}", "--set", "run.trackers=[mlflow]", "--dry-run"]) == 0
    printed = capsys.readouterr().out  # the resolved config: where this run will log
    assert "mlflow_tracking_uri: http://127.0.0.1:5000" in printed and "mlflow_experiment: raysr" in printed


def test_every_tune_trial_logs_where_the_search_resolved(clean_env, tmp_path):
    """A search resolves the tracker settings once, before Ray; its trials (runs under
    <search>/runs) keep them, so every trial logs to the same store and project."""
    from raysr.tune.cli import build_parser, prepare
    from raysr.tune.space import trial_config

    space = tmp_path / "space.yaml"
    space.write_text("optim.g.lr: {choice: [1.0e-4, 2.0e-4]}\n")
    clean_env.setenv("WANDB_PROJECT", "sweep")
    search = prepare(build_parser().parse_args(["--space", str(space), "--set", f"run.storage={tmp_path}",
                                                "--set", "run.trackers=[mlflow, wandb]"]))
    trial = trial_config(search.base, {"optim.g.lr": 2e-4}, name="t0", storage=str(tmp_path / "s" / "runs")).run
    assert trial.mlflow_tracking_uri == f"sqlite:///{tmp_path}/mlflow.db" and trial.wandb_project == "sweep"


# --------------------------------------------------------------------------- reading W&B's offline files


def wandb_records(path: Path) -> list:
    """The protobuf Records of one offline ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic,
    version), then LevelDB's log format — 32 KiB blocks of chunks (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last), a block tail shorter than a chunk header left as zeros."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, whole, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            whole.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            whole.append(pending + chunk)
    records = []
    for raw in whole:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def wandb_runs(folder: Path) -> list[dict]:
    """Each offline session under ``<folder>/wandb``, oldest first: its run id and history rows."""
    sessions = []
    for run_file in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        rows, run_id = [], None
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
        sessions.append({"id": run_id, "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                         "media": run_file.parent / "files"})
    return sessions


# --------------------------------------------------------------------------- fake runs through Trackers (slow: imports)


def comparison_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 24, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def report(step: int) -> dict:
    """What rank 0 hands the trackers at a report: numbers, and a string they must skip."""
    return {"step": step, "loss_g": 1.0 / step, "lr": 1e-4, "crops_per_s": 10.0 * step, "val_done": 0, "note": "x"}


def validation(val_step: int) -> dict:
    return {"val_step": val_step, "psnr": 20.0 + val_step, "psnr_bicubic": 19.0, "ssim": 0.5 + 0.01 * val_step}


def fake_run(cfg, run: str, reports: list[int], validations: dict[int, int]) -> None:
    """Reports at the steps ``reports``; ``validations``: {report step: val_step finished by then}."""
    trackers = Trackers(cfg, run)
    for step in reports:
        trackers.log_train(step, report(step))
        if step in validations:
            trackers.log_validation(validation(validations[step]), comparison_png(validations[step]))
    trackers.flush()
    trackers.close()


@pytest.mark.slow  # imports mlflow and wandb, creates a sqlite store: ~20 s here
def test_every_report_lands_at_its_step_and_a_rerun_continues_the_same_runs(clean_env, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    storage, run = tmp_path / "runs", str(tmp_path / "runs" / "fake")
    first = resolve_settings(tracked(storage, "run.name=fake", "train.total_steps=4", "run.wandb_mode=offline",
                                     trackers="[tensorboard, mlflow, wandb]"))
    fake_run(first, run, [2, 4], {4: 2})  # the validation of step 2 finishes after the report of step 4
    ids = json.loads((storage / "fake" / IDS_FILE).read_text())
    again = resolve_settings(tracked(storage, "run.name=fake", "train.total_steps=6", "run.wandb_mode=offline",
                                     trackers="[tensorboard, mlflow, wandb]"))
    fake_run(again, run, [6], {6: 6})  # resumed at step 4 with more steps
    assert json.loads((storage / "fake" / IDS_FILE).read_text()) == ids
    out = capsys.readouterr().out
    assert f"raysr: mlflow: continuing run {ids['mlflow']['run_id']}" in out and "warning" not in out

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    (only,) = client.search_runs([client.get_experiment_by_name("raysr").experiment_id])
    assert only.info.run_id == ids["mlflow"]["run_id"] and only.info.status == "FINISHED"
    assert only.info.run_name == "fake"

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(only.info.run_id, key), key=lambda m: m.step)]

    assert history("loss_g") == [(2, 0.5), (4, 0.25), (6, 1 / 6)]
    assert history("crops_per_s") == [(2, 20.0), (4, 40.0), (6, 60.0)]
    assert history("psnr") == [(2, 22.0), (6, 26.0)]
    assert history("ssim") == [(2, pytest.approx(0.52)), (6, pytest.approx(0.56))]
    assert set(only.data.metrics) == {"loss_g", "lr", "crops_per_s", "val_done", "psnr", "psnr_bicubic", "ssim"}
    # the config as parameters; MLflow keeps them as first logged, the new value is a tag
    assert only.data.params["train.total_steps"] == "4" and only.data.params["run.name"] == "fake"
    assert only.data.params["model.generator.name"] == "srresnet" and len(only.data.params) > 50
    assert only.data.tags["changed.train.total_steps"] == "6"
    images = sorted(a.path for a in client.list_artifacts(only.info.run_id, "images") if a.path.endswith(".png"))
    assert [p.split("+step+")[1].split("+")[0] for p in images] == ["2", "6"]
    png = Image.open(client.download_artifacts(only.info.run_id, images[1], str(tmp_path)))
    assert np.array_equal(np.asarray(png), np.full((8, 24, 3), 6, np.uint8))

    sessions = wandb_runs(storage / "fake")
    assert [s["id"] for s in sessions] == [ids["wandb"]["run_id"]] * 2  # the rerun logs to the same W&B run
    rows = [r for s in sessions for r in s["rows"]]
    train = [(r["step"], r["loss_g"]) for r in rows if "step" in r]
    assert train == [(2, 0.5), (4, 0.25), (6, 1 / 6)] and all("note" not in r for r in rows)
    val = [(r["val_step"], r["psnr"], r["comparison/_type"]) for r in rows if "val_step" in r]
    assert val == [(2, 22.0, "image-file"), (6, 26.0, "image-file")]
    image = next(r for r in sessions[1]["rows"] if "val_step" in r)["comparison/path"]
    assert np.array_equal(np.asarray(Image.open(sessions[1]["media"] / image)), np.full((8, 24, 3), 6, np.uint8))
    assert list((storage / "fake" / "tensorboard").glob("events.out.tfevents.*"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.slow  # imports mlflow
def test_a_failing_tracker_is_reported_once_and_never_raises(clean_env, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    # a server that is down: MLflow cannot start its run; no call raises, the end does not hang
    clean_env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = resolve_settings(tracked(tmp_path, f"run.mlflow_tracking_uri=http://127.0.0.1:{closed_port()}",
                                    trackers="[mlflow]"))
    fake_run(down, str(tmp_path / "down"), [1, 2, 3], {3: 1})
    out = capsys.readouterr().out
    assert out.count("raysr: warning: mlflow could not start (") == 1 and "training goes on" in out

    # writes that fail mid-run (a metric name MLflow refuses): the first is reported with its cause,
    # the rest counted; the other metrics of later reports and the other trackers go on
    ok = resolve_settings(tracked(tmp_path, trackers="[mlflow, tensorboard]"))
    trackers = Trackers(ok, str(tmp_path / "midway"))
    trackers.log_train(1, report(1))
    for step in (2, 3):
        trackers.log_train(step, {**report(step), "bad?name": 1.0})
    trackers.log_train(4, report(4))
    trackers.close()
    out = capsys.readouterr().out
    assert out.count("raysr: warning: mlflow log failed (MlflowException: ") == 1 and "bad?name" in out
    assert "raysr: warning: 2 mlflow call(s) failed in this run" in out
    run_id = json.loads((tmp_path / "midway" / IDS_FILE).read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=ok.run.mlflow_tracking_uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss_g")] == [1, 4]
    assert list((tmp_path / "midway" / "tensorboard").glob("events.out.tfevents.*"))

    # a run someone deleted in MLflow is not continued: the rerun says so and starts a new one
    client.delete_run(run_id)
    fake_run(ok, str(tmp_path / "midway"), [5], {})
    new_id = json.loads((tmp_path / "midway" / IDS_FILE).read_text())["mlflow"]["run_id"]
    assert f"the MLflow run {run_id} this run logged to is deleted at" in capsys.readouterr().out
    assert new_id != run_id and [m.step for m in client.get_metric_history(new_id, "loss_g")] == [5]


# --------------------------------------------------------------------------- one real run (Ray)


def tracked_overrides(demo_data, storage) -> list[str]:
    return ["model.generator.num_feat=8", "model.generator.num_block=1", "data.batch_size=2", "data.num_workers=0",
            f"data.train={demo_data.train}", f"data.val={demo_data.val}", "run.validation=inline", "run.log_every=2",
            "run.val_every=2", "run.checkpoint_every=2", f"run.storage={storage}", "run.name=tracked",
            "run.trackers=[tensorboard, mlflow, wandb]", "run.wandb_mode=offline"]


@pytest.fixture(scope="module")
def tracked_run(ray_local, demo_data, tmp_path_factory) -> SimpleNamespace:
    """``python -m raysr.train`` (the quickstart's PSNR phase, tiny, one worker) with both trackers for 4
    steps, then the same command with 6: a resume at step 4. ``ids``: the tracker runs after the first."""
    storage = tmp_path_factory.mktemp("tracked") / "runs"
    argv = [arg for value in tracked_overrides(demo_data, storage) for arg in ("--set", value)]
    with pytest.MonkeyPatch.context() as env:
        for name in ENV:
            env.delenv(name, raising=False)
        assert main(argv + ["--set", "train.total_steps=4"]) == 0
        ids = json.loads((storage / "tracked" / IDS_FILE).read_text())
        assert main(argv + ["--set", "train.total_steps=6"]) == 0  # resumes at step 4
    return SimpleNamespace(storage=storage, ids=ids)


def test_a_train_run_logs_to_mlflow_and_wandb_and_its_rerun_continues_them(tracked_run):
    """One MLflow run and one W&B run hold every report of both commands at its step, equal to the
    checkpoints' metrics.json, and the validations at theirs."""
    from mlflow.tracking import MlflowClient

    storage, ids = tracked_run.storage, tracked_run.ids
    assert json.loads((storage / "tracked" / IDS_FILE).read_text()) == ids

    saved = {s: json.loads((storage / "tracked" / f"checkpoint_{s:08d}" / "metrics.json").read_text())
             for s in (2, 4, 6)}
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    (only,) = client.search_runs([client.get_experiment_by_name("raysr").experiment_id])
    assert only.info.run_id == ids["mlflow"]["run_id"] and only.info.status == "FINISHED"

    def history(key):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(only.info.run_id, key), key=lambda m: m.step)]

    assert history("loss_g") == [(s, pytest.approx(saved[s]["loss_g"])) for s in (2, 4, 6)]
    assert history("psnr") == [(s, pytest.approx(saved[s]["psnr"])) for s in (2, 4, 6)]
    assert only.data.params["train.total_steps"] == "4" and only.data.tags["changed.train.total_steps"] == "6"
    images = [a.path for a in client.list_artifacts(only.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [2, 4, 6]

    sessions = wandb_runs(storage / "tracked")
    assert [s["id"] for s in sessions] == [ids["wandb"]["run_id"]] * 2
    rows = [r for s in sessions for r in s["rows"]]
    assert [(r["step"], r["loss_g"]) for r in rows if "step" in r] == \
        [(s, pytest.approx(saved[s]["loss_g"])) for s in (2, 4, 6)]
    assert [(r["val_step"], r["psnr"]) for r in rows if "val_step" in r] == \
        [(s, pytest.approx(saved[s]["psnr"])) for s in (2, 4, 6)]


def test_the_resumed_run_ends_with_the_weights_of_the_run_uninterrupted(tracked_run, demo_data):
    """Resume continues the run on Ray, one worker, PSNR phase (tests/test_train.py checks two workers,
    GAN phase): stopped at step 4 and resumed by the same command, it ends at step 6 with the weights and
    optimizer state, bit for bit, of the same worker loop run to step 6 without a stop (rank 0 of 1, in
    this process, as tests/test_resume.py runs it)."""
    from test_resume import run_to, start

    cfg = load_config(overrides=[*tracked_overrides(demo_data, tracked_run.storage), "train.total_steps=6"])
    state, batches = start(cfg, None)
    run_to(state, batches, 6)
    batches.close()
    saved = torch.load(tracked_run.storage / "tracked" / "checkpoint_00000006" / "state.pt", weights_only=True)
    assert saved["step"] == 6
    for key, value in state.g_module.state_dict().items():
        assert torch.equal(saved["g"][key], value), key
    adam = state.opt_g.state_dict()["state"]
    for slot, moments in saved["opt_g"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, adam[slot][name]), f"opt_g {slot} {name}"
