"""Node loss on a real multi-node Ray cluster on this machine (tests/chaos_run.py, in a subprocess):
a fixed-size run waits for its node to come back, an elastic run goes on with fewer workers and
grows back. Both must end at their exact last step, with a global batch that never changed, a
clean final checkpoint and at most one checkpoint interval of steps computed twice. Then an
upscale job (``raysr.upscale --ray``) loses the node of its model actor mid-job: it must end with
exit code 0 and every input's output written once, byte for byte as a single-process run writes it."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import shutil
import signal
from pathlib import Path

import pytest
import torch

from chaos_run import UPSCALE_INPUTS, upscale_argv
from raysr.upscale import main as upscale

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]  # Ray clusters of their own

CHAOS_RUN = Path(__file__).with_name("chaos_run.py")
TOTAL_STEPS, CHECKPOINT_EVERY, GLOBAL_BATCH = 12, 2, 4  # as chaos_run.py sets them: batch 2 x 2 workers
MODES = ("fixed", "elastic", "upscale")
# the training scenarios take about 3 minutes on 2 cores, the upscale one about 1 more; under the
# suite's 600-s limit per test
SCENARIOS_TIMEOUT_S = 510


@pytest.fixture(scope="module")
def chaos(demo_data, tmp_path_factory) -> dict:
    """The scenarios of tests/chaos_run.py, one after the other on one cluster: {mode: (its folder, the
    output's tail)}. Each test then checks its own scenario's outcome (:func:`outcome`)."""
    out = tmp_path_factory.mktemp("chaos")
    ray_tmp = tempfile.mkdtemp(prefix="rsx_", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([str(CHAOS_RUN.parents[1]), env.get("PYTHONPATH", "")]))
    argv = [sys.executable, str(CHAOS_RUN), ",".join(MODES), demo_data.train, demo_data.val, str(out)]
    proc = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=SCENARIOS_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:  # each scenario then says where it stopped (outcome.json), never a hang
        kill_ray_under(proc, ray_tmp)
        try:
            log = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            log = ""
        log += f"\ntests/chaos_run.py did not end within {SCENARIOS_TIMEOUT_S} s: killed"
    finally:
        kill_ray_under(proc, ray_tmp)  # whatever of its cluster outlived it
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {mode: (out / mode, log[-4000:]) for mode in MODES}


def kill_ray_under(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the scenario's process group and every process of its cluster (their command lines name
    its private RAY_TMPDIR), so that nothing of a failed scenario runs on beside the rest of the suite."""
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = ray_tmp.encode() in f.read()
            if mine:
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def outcome(chaos: dict, mode: str) -> tuple[dict, Path]:
    """One scenario's events and folder, once it is known to have succeeded."""
    out, log = chaos[mode]
    result = json.loads((out / "outcome.json").read_text()) if (out / "outcome.json").exists() else {}
    assert result.get("ok"), f"the {mode} scenario failed: {result.get('error', result)}\n{log}"
    return json.loads((out / "events.json").read_text()), out


def scenario(chaos: dict, mode: str) -> tuple[list[dict], dict, Path]:
    """A training scenario's reports (rank 0's metrics with the checkpoint and time of each), events and
    folder, once it is known to have succeeded."""
    events, out = outcome(chaos, mode)
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    return [{**r["metrics"][0], "checkpoint": r["checkpoint"], "time": r["time"]} for r in reports], events, out


def recomputed(reports: list[dict]) -> int:
    """Steps reported more than once (done again after a restart from the latest checkpoint)."""
    steps = [r["step"] for r in reports]
    return len(steps) - len(set(steps))


def assert_clean_final_checkpoint(run: Path) -> None:
    state = torch.load(run / f"checkpoint_{TOTAL_STEPS:08d}" / "state.pt", weights_only=True)
    assert state["step"] == TOTAL_STEPS
    assert {int(s["step"]) for s in state["opt_g"]["state"].values()} == {TOTAL_STEPS}  # no step lost or doubled
    for part in ("g", "g_ema") if "g_ema" in state else ("g",):
        for key, value in state[part].items():
            assert not value.is_floating_point() or bool(torch.isfinite(value).all()), f"{part}.{key}"


def assert_steps_and_batch(reports: list[dict]) -> None:
    steps = [r["step"] for r in reports]
    assert steps[-1] == TOTAL_STEPS and set(steps) == set(range(1, TOTAL_STEPS + 1))
    assert recomputed(reports) <= CHECKPOINT_EVERY  # at most one checkpoint interval done twice
    assert {r["global_batch"] for r in reports} == {GLOBAL_BATCH}
    assert all(math.isfinite(r["loss_g"]) for r in reports)


def test_a_fixed_size_run_waits_for_a_lost_node_and_ends_at_its_last_step(chaos):
    reports, events, out = scenario(chaos, "fixed")
    assert_steps_and_batch(reports)
    assert {r["world_size"] for r in reports} == {2}
    after = [r for r in reports if r["time"] > events["removed"]]
    assert after[0]["step"] == events["removed_after_step"] + 1  # resumed from the checkpoint it was held at
    assert_clean_final_checkpoint(out / "runs" / "fixed")
    print(f"\nfixed: wall {events['end'] - events['start']:.0f} s, recovery {after[0]['time'] - events['removed']:.1f} s "
          f"(node removal -> next step), {recomputed(reports)} step(s) recomputed")


def test_an_elastic_run_goes_on_with_one_worker_and_grows_back_to_two(chaos):
    """On Real-ESRGAN's degradations with a pool of 3 pairs (tests/chaos_run.py): world size 2 -> 1 -> 2."""
    reports, events, out = scenario(chaos, "elastic")
    state = torch.load(out / "runs" / "elastic" / f"checkpoint_{TOTAL_STEPS:08d}" / "state.pt", weights_only=True)
    assert state["config"]["data"]["degradation"] == "realesrgan" and state["config"]["degradation"]["pool_size"] == 3
    assert_steps_and_batch(reports)
    sizes = [r["world_size"] for r in reports]
    first_one, last_one = sizes.index(1), len(sizes) - 1 - sizes[::-1].index(1)
    assert set(sizes[:first_one]) == {2} and set(sizes[first_one:last_one + 1]) == {1}
    assert sizes[-1] == 2 and set(sizes[last_one + 1:]) == {2}  # grown back once capacity returned
    assert reports[first_one]["step"] == events["removed_after_step"] + 1
    assert reports[last_one]["time"] < reports[last_one + 1]["time"]
    assert_clean_final_checkpoint(out / "runs" / "elastic")
    shrink = reports[first_one]["time"] - events["removed"]
    grow = reports[last_one + 1]["time"] - events["added"]
    print(f"\nelastic: wall {events['end'] - events['start']:.0f} s, shrink {shrink:.1f} s (node removal -> next step on 1 "
          f"worker), grow {grow:.1f} s (node added -> next step on 2), {recomputed(reports)} step(s) recomputed")


def test_an_upscale_job_that_loses_its_model_actor_node_writes_every_output_once(chaos, tmp_path):
    """tests/chaos_run.py's upscale scenario: the node of the one model actor is removed once the first output
    is written, a new node added; Ray Data restarts the actor and the job ends with exit code 0."""
    events, out = outcome(chaos, "upscale")
    assert 0 < events["outputs_at_removal"] < UPSCALE_INPUTS  # the node went mid-job
    with contextlib.redirect_stderr(io.StringIO()) as err:  # the reference: one process, one thread (conftest)
        assert upscale(upscale_argv(out, tmp_path / "single")) == 0, err.getvalue()
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len(names) == UPSCALE_INPUTS
    # exactly these files: no temporary file left by a killed write, no _failed.jsonl
    assert sorted(p.name for p in (out / "sr").iterdir()) == names
    for name in names:
        assert (out / "sr" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert events["actor_restarts"] >= 1  # Ray Data restarted the lost actor, on a node with a free CPU
    after = [p.stat().st_mtime for p in (out / "sr").iterdir() if p.stat().st_mtime > events["removed"]]
    assert after  # the job went on after the node was gone
    print(f"\nupscale: wall {events['end'] - events['start']:.0f} s, {events['outputs_at_removal']} of "
          f"{UPSCALE_INPUTS} outputs written at the node's removal, next output {min(after) - events['removed']:.1f} s "
          f"after it, job end {events['end'] - events['removed']:.1f} s after it, actor restarted "
          f"{events['actor_restarts']} time(s)")
