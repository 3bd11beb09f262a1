"""Storage faults during real training runs: S3 that throttles, drops connections, cuts bodies short
and stalls, and a worker killed while its checkpoint is uploading.

Every S3 request of the test session — raysr.storage's boto3 client, in the Ray Train workers' shard
reads and, behind Ray's storage filesystem (raysr.storage.S3Handler), in the checkpoint uploads and
the controller's run state — reaches the moto server through the loopback proxy of tests/faults.py; each test arms faults on it (``s3_faults``)
and checks what a user cares about: the run finished at its exact step, no shard sample was
skipped, every checkpoint Ray registered is complete and loads, and a resume starts from the last
complete checkpoint. Networks and step counts are test_train's tiny GAN (about 30 s a run).
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from raysr import storage
from faults import Fault, pid_of_client
from raysr import run_checkpoint
from raysr.generator_file import load_generator
from raysr.config import load_config
from raysr.train import fit
from test_train import CHECKPOINT_FILES, checkpoint_keys, read_reports, report_recorder, tiny_gan_overrides

BUCKET = "raysr-chaos-storage"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # where Ray Train records the checkpoints it registered


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, demo_data) -> SimpleNamespace:
    """The demo shards copied to S3 (validation photos stay local: rank 0 reads them once)."""
    storage.s3_client().create_bucket(Bucket=BUCKET)
    for path in sorted(Path(demo_data.train).iterdir()):
        with open(path, "rb") as f:
            storage.write_stream(f"s3://{BUCKET}/shards/{path.name}", f)
    return SimpleNamespace(train=f"s3://{BUCKET}/shards", val=demo_data.val)


def run(overrides: list[str], record: Path):
    """fit() the tiny GAN; returns Ray's Result and the recorded reports (as test_train's run_gan)."""
    result = fit(load_config(preset="esrgan_x4", overrides=overrides), callbacks=[report_recorder(record)])
    assert result is not None, "training failed; its error is printed above"
    return result, read_reports(record)


def registered_checkpoints(name: str) -> list[int]:
    """The steps of the checkpoints Ray Train registered for run ``name`` (its run state in the bucket)."""
    snapshot = json.loads(storage.read_bytes(f"s3://{BUCKET}/runs/{name}/{SNAPSHOT}"))
    dirs = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    return sorted(int(d[len("checkpoint_"):]) for d in dirs)


def assert_complete_and_loadable(name: str, step: int) -> None:
    """A checkpoint folder holds all four files, state.pt loads at its step, generator.pth builds a generator."""
    base = f"s3://{BUCKET}/runs/{name}/checkpoint_{step:08d}"
    assert checkpoint_keys(BUCKET, name)[step] == CHECKPOINT_FILES, base
    assert run_checkpoint.is_complete(base), base
    state = torch.load(io.BytesIO(storage.read_bytes(f"{base}/state.pt")), map_location="cpu", weights_only=True)
    assert state["step"] == step
    assert {int(s["step"]) for s in state["opt_g"]["state"].values()} == {step}  # Adam: none lost, none doubled
    g = load_generator(f"{base}/generator.pth")
    assert g(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    assert json.loads(storage.read_bytes(f"{base}/metrics.json"))["step"] == step


def steps_of(reports: list[dict]) -> list[int]:
    return [r["metrics"][0]["step"] for r in reports]


@pytest.fixture(scope="module")
def upload_run(ray_local, s3_data, tmp_path_factory) -> SimpleNamespace:
    return SimpleNamespace(name="uploads", overrides=tiny_gan_overrides(s3_data, f"s3://{BUCKET}/runs", "uploads"),
                           tmp=tmp_path_factory.mktemp("uploads"))


def test_shard_reads_and_checkpoint_uploads_survive_503s_resets_cut_bodies_and_stalls(upload_run, s3_faults):
    """One run through a faulty S3, both ways.

    Reads: the workers' shard GETs, three answered 503 SlowDown, two connections reset, two replies
    stalled for 1 s, two bodies cut after 1 MiB. botocore retries the requests, raysr.storage resumes
    the cut bodies with a Range request; no sample is skipped.

    Writes: Ray's asynchronous upload of checkpoints 1-3 and of Ray's run state: three 503s in a row on
    one file (one more than pyarrow's S3 default of 3 attempts would allow), two uploads cut after 4 kB,
    503s on another file and on writing the run state, two connections reset. raysr's storage
    filesystem retries each request up to 8 times, so no upload fails, no worker restarts (each step
    is reported once), and every registered checkpoint is complete and loads. (These files are small,
    so each goes up in one PUT; tests/test_storage.py retries the start of a multipart upload.)

    The run ends at its exact step."""
    ckpt = f"{upload_run.name}/checkpoint_{{:08d}}/"
    faults = s3_faults.arm(
        Fault("slowdown", times=3, method="GET", path=".tar"),
        Fault("reset", times=2, method="GET", path=".tar"),
        Fault("delay", times=2, method="GET", path=".tar", seconds=1.0),
        Fault("cut_reply", times=2, method="GET", path=".tar", after_bytes=1 << 20),
        Fault("slowdown", times=3, method="PUT", path=ckpt.format(1) + "state.pt"),
        Fault("cut_upload", times=2, method="PUT", path=ckpt.format(2) + "state.pt", after_bytes=4096),
        Fault("slowdown", times=2, method="PUT", path=ckpt.format(2) + "generator.pth"),
        Fault("reset", times=2, method="PUT", path=ckpt.format(3) + "generator.pth"),
        Fault("slowdown", times=2, method="PUT", path=f"{upload_run.name}/{SNAPSHOT}"))
    t0 = time.monotonic()
    result, reports = run(upload_run.overrides + ["train.total_steps=3"], upload_run.tmp / "first.jsonl")
    wall = time.monotonic() - t0

    assert [f.fired for f in faults] == [3, 2, 2, 2, 3, 2, 2, 2, 2], "every fault really happened"
    assert result.metrics["step"] == 3
    assert steps_of(reports) == [1, 2, 3], "a step was reported twice: an upload failed and the workers restarted"
    # reads: no sample skipped, each cut body resumed where it stopped
    assert all(m["skipped"] == 0 and m["samples"] > 0 for r in reports for m in r["metrics"])
    gets = s3_faults.count("GET", ".tar")
    assert s3_faults.count("GET", ".tar", ranged=True) == 2
    # writes: the file hit by three 503s went up on the fourth try
    assert s3_faults.count("PUT", ckpt.format(1) + "state.pt") == 4
    assert registered_checkpoints(upload_run.name) == sorted(checkpoint_keys(BUCKET, upload_run.name)) == [1, 2, 3]
    for step in (1, 2, 3):
        assert_complete_and_loadable(upload_run.name, step)
    print(f"\nshard reads: {gets} GETs of .tar for 2 ranks ({gets - 2} retries or resumes); checkpoint uploads: "
          f"{sum(f.fired for f in faults[4:])} faulty requests retried; run {wall:.1f} s")


def test_resume_through_a_faulty_endpoint_starts_at_the_last_checkpoint(upload_run, s3_faults):
    """The same command again, with 4 more steps: Ray reads its run state and checkpoint 3 back through
    503s, a reset and a body cut short; the run resumes at step 3 and ends at step 5."""
    faults = s3_faults.arm(
        Fault("slowdown", times=2, method="GET", path=f"{upload_run.name}/{SNAPSHOT}"),
        Fault("slowdown", times=2, method="GET", path=f"{upload_run.name}/checkpoint_00000003/state.pt"),
        Fault("reset", times=1, method="GET", path=f"{upload_run.name}/checkpoint_00000003/state.pt"),
        Fault("cut_reply", times=1, method="GET", path=f"{upload_run.name}/checkpoint_00000003/state.pt",
              after_bytes=4096))
    t0 = time.monotonic()
    result, reports = run(upload_run.overrides + ["train.total_steps=5"], upload_run.tmp / "second.jsonl")
    wall = time.monotonic() - t0

    assert [f.fired for f in faults] == [2, 2, 1, 1], "every fault really happened"
    assert steps_of(reports) == [4, 5], "the run did not resume from checkpoint 3"
    assert result.metrics["step"] == 5
    assert registered_checkpoints(upload_run.name) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert_complete_and_loadable(upload_run.name, step)
    print(f"\nresume: {sum(f.fired for f in faults)} faulty reads retried, run {wall:.1f} s")


def test_a_failed_upload_and_a_worker_killed_while_uploading_each_restart_from_the_previous_checkpoint(
        ray_local, s3_data, s3_faults, tmp_path, monkeypatch):
    """Two failures of one run's checkpoint uploads, each ending in a restart from the checkpoint before.

    Checkpoint 2's state.pt is answered 503 as often as the storage filesystem tries (here 2, set in the
    driver, pickled into the workers with the filesystem). pyarrow's copy_files would only log that and
    let Ray register checkpoint 2 without its state.pt; raysr's upload raises, and Ray restarts the
    workers from checkpoint 1.

    Then the upload of checkpoint 3's state.pt stalls in the proxy; meanwhile its other files land, and
    the uploading worker process is SIGKILLed (found by the socket it is uploading on). Checkpoint 3 is
    then half-written in the bucket but was never registered: Ray restarts the workers from checkpoint
    2, steps 3-4 are trained again. (The first worker group may get as far as uploading checkpoint 3
    before Ray stops it for checkpoint 2: its uploads of that state.pt are answered 503 too, so none
    lands. The faults tell the groups apart by the uploading process.)

    The run ends at step 4, each step reported once, with every registered checkpoint complete."""
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    name = "upload_failures"
    state_2, state_3 = (f"{name}/checkpoint_{step:08d}/state.pt" for step in (2, 3))
    first_group = set()  # the process whose uploads of checkpoint 2 failed: the first worker group's rank 0

    def first_group_uploads(pid):
        first_group.add(pid)
        return True

    fail = s3_faults.arm(Fault("slowdown", times=2, method="PUT", path=state_2, when=first_group_uploads))[0]
    stall, refuse = s3_faults.arm(
        Fault("delay", times=1, method="PUT", path=state_3, seconds=20, when=lambda pid: pid not in first_group),
        Fault("slowdown", times=2, method="PUT", path=state_3, when=lambda pid: pid in first_group))
    seen = {}

    def kill_the_uploader():
        deadline = time.monotonic() + 240
        while stall.fired == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        peer = next(r.peer for r in s3_faults.requests if r.fault == "delay")
        # the checkpoint's other files are in the bucket (raysr uploads them one at a time, before
        # state.pt, so at once; polled, in case uploads ever run side by side)
        others = CHECKPOINT_FILES - {"state.pt"}
        while not others <= (files := checkpoint_keys(BUCKET, name).get(3, set())) and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["files"] = files
        seen["complete"] = run_checkpoint.is_complete(f"s3://{BUCKET}/runs/{name}/checkpoint_00000003")
        for _ in range(20):  # the stalled request's socket: the uploading worker process holds it
            owner = pid_of_client(peer, s3_faults.port)
            if owner is not None:
                seen["pid"], seen["killed_at"] = owner, time.monotonic()
                os.kill(owner, signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_uploader, daemon=True)
    killer.start()
    overrides = tiny_gan_overrides(s3_data, f"s3://{BUCKET}/runs", name) + ["train.total_steps=4",
                                                                            "run.max_failures=3"]
    t0 = time.monotonic()
    result, reports = run(overrides, tmp_path / "reports.jsonl")
    wall = time.monotonic() - t0
    killer.join(timeout=5)

    # the failed upload: 2 tries that failed, then the restarted workers' upload
    assert fail.fired == 2 and len(first_group) == 1 and None not in first_group, first_group
    assert s3_faults.count("PUT", state_2) == 3
    # the killed uploader
    assert "pid" in seen, "the upload never stalled, or its process was not found, so no worker was killed"
    assert not os.path.exists(f"/proc/{seen['pid']}"), "the uploading worker survived SIGKILL"
    # At the kill, checkpoint 3 was in the bucket without its state.pt: half-written, and not complete.
    assert "state.pt" not in seen["files"] and seen["files"] and not seen["complete"], seen
    # Ray registered neither, so each restart resumed from the checkpoint before: every step comes once,
    # in order (a restart from scratch would report 1 and 2 again; a failed checkpoint's step is
    # reported once, after its restart)
    assert steps_of(reports) == [1, 2, 3, 4]
    assert result.metrics["step"] == 4
    assert registered_checkpoints(name) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert_complete_and_loadable(name, step)
    print(f"\nfailed upload, then killed upload: pid {seen['pid']} killed {seen['killed_at'] - t0:.1f} s into the run; "
          f"files of checkpoint 3 then: {sorted(seen['files'])}; the first group's uploads of it refused: {refuse.fired}; "
          f"run {wall:.1f} s")
