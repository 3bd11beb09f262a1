"""A training run, and an upscale job, on a multi-node Ray cluster on this machine that lose a node
and get one back.

    python tests/chaos_run.py fixed|elastic|upscale|fixed,elastic,upscale TRAIN_SHARDS VAL_DIR OUT_DIR

Run by tests/test_elastic.py in a subprocess of its own, so that its cluster (a head without
CPUs, two 1-CPU nodes, all on 127.0.0.1, temp files in a private folder) never meets the test
session's local Ray. The scenarios named run one after the other on the same cluster (each ends
with two 1-CPU nodes again); once one fails, the later ones are not run (their outcome says so)
and the process exits at once, leaving its cluster to the caller to kill. Each writes
``OUT_DIR/MODE/reports.jsonl`` (every report: all ranks' metrics, the checkpoint, the time),
``OUT_DIR/MODE/events.json`` (when the node was removed and added, when the run started and
ended), ``OUT_DIR/MODE/outcome.json`` ({"ok": whether the run succeeded[, "error": the scenario's
traceback]}) and its run under ``OUT_DIR/MODE/runs``.

- fixed: ``run.num_workers=2``. Once the first checkpoint is registered, the node of one training
  worker is removed and a new node added; the group waits for 2 workers and resumes.
- elastic: ``run.num_workers=[1,2]``. The same removal; the run goes on with 1 worker; once that
  worker's first checkpoint is registered a node is added, and the group grows back to 2.
- upscale: ``python -m raysr.upscale --ray ADDRESS --workers 1,1`` (:func:`raysr.upscale.main`, in this
  process as a driver on the cluster) over ``OUT_DIR/upscale/in`` (UPSCALE_INPUTS PNGs it writes, with the
  generator ``g.pth``) into ``OUT_DIR/upscale/sr``. Once the first output file exists (the model actor
  held back till then, so that it is mid-way through its inputs), the node of the model actor is removed
  and a new node added; the job goes on and ends. Its outcome also has
  ``"exit_code"``; its events ``"outputs_at_removal"`` (how many outputs were written before the node
  went) and ``"actor_restarts"`` (how often Ray restarted that actor).

In the training scenarios, the Ray Train callback (in Ray's controller) holds the run at the report
the scenario waits for, until this process has removed or added the node: each step then happens at
a known point of the run, however fast the tiny model steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

TOTAL_STEPS = 12
CHECKPOINT_EVERY = 2
RUN_TIMEOUT_S = 150  # how long a scenario waits for its run to end once the scenario has changed the nodes


def overrides(mode: str, train: str, val: str, out: Path) -> list[str]:
    workers = "[1, 2]" if mode == "elastic" else "2"
    # the elastic run makes its LR by Real-ESRGAN's degradations, with a pair pool of 3 (no multiple of
    # any batch): the chain and the per-rank pool must work at every world size the run passes through
    realesrgan = (["data.degradation=realesrgan", "degradation.crop_pad_size=64", "degradation.pool_size=3",
                   "degradation.resize_range=[0.2, 1.5]"] if mode == "elastic" else [])
    return [*realesrgan, "model.generator.num_feat=8", "model.generator.num_block=1", "data.gt_size=32", "data.batch_size=2",
            "data.num_workers=0", f"data.train={train}", f"data.val={val}", f"run.num_workers={workers}",
            f"train.total_steps={TOTAL_STEPS}", f"run.checkpoint_every={CHECKPOINT_EVERY}", "run.val_every=1000",
            "run.log_every=1", "run.max_failures=3", "run.resize_monitor_interval_s=1",
            # a 0-CPU validation actor: each node's one CPU stays a training worker's (a 1-CPU
            # validator would take the joining node's CPU before the elastic group grows onto it)
            "run.validation_resources={CPU: 0}", f"run.storage={out / 'runs'}", f"run.name={mode}"]


def recorder(out: Path):
    """Appends each report to reports.jsonl. At a checkpointed report of the world size that
    ``hold.json`` names ({"world_size": W}) it writes ``held`` and holds Ray's controller, so the
    run goes no further, until the scenario deletes ``held``. With {"world_size": W, "pause_s": P}
    it pauses P seconds at every report of that world size instead (and holds nothing)."""
    import ray.train

    class RecordAndHold(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(out / "reports.jsonl", "a") as f:
                f.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None,
                                    "time": time.time()}) + "\n")
            hold = out / "hold.json"
            rule = json.loads(hold.read_text()) if hold.exists() else None
            if rule is None or rule["world_size"] != metrics[0]["world_size"]:
                return
            if "pause_s" in rule:  # slow the run down at every report of that world size
                time.sleep(rule["pause_s"])
                return
            if checkpoint is None:
                return
            held = out / "held"
            partial = out / "held.partial"  # renamed into place: the scenario never reads a half-written file
            partial.write_text(str(metrics[0]["step"]))
            partial.rename(held)
            deadline = time.monotonic() + 120
            while held.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    return RecordAndHold()


def held_step(out: Path, timeout: float = 180) -> int:
    """Wait until the run is held at a report; its step."""
    deadline = time.monotonic() + timeout
    while not (out / "held").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the run never reached the report the scenario waits for")
        time.sleep(0.05)
    return int((out / "held").read_text())


def scenario(mode: str, cluster, out: Path, events: dict) -> None:
    """Remove the node of a training worker at the first checkpoint, then add a node."""
    from ray.util.state import list_actors

    events["removed_after_step"] = held_step(out)
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                             ("state", "=", "ALIVE")])
    victim = next(n for n in cluster.worker_nodes if n.node_id == workers[-1].node_id)
    if mode == "elastic":  # the next hold: the first checkpoint of the group of 1
        (out / "hold.json").write_text(json.dumps({"world_size": 1}))
    else:
        (out / "hold.json").unlink()
    cluster.remove_node(victim, allow_graceful=False)  # as a reclaimed spot node: all its processes killed
    events["removed"] = time.time()
    if mode == "elastic":
        # Still held: once the GCS has declared the node dead, Ray's AutoscalingCoordinator reads the
        # nodes again, so that the controller, released, restarts with the one worker the cluster can
        # hold. Its own next read of the nodes may be up to 20 s away: the controller would first try
        # a group of 2 and wait out RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for a CPU that is gone.
        wait_for_dead_node(victim.node_id)
        refresh_reservations()
    (out / "held").unlink()
    if mode == "elastic":
        events["added_after_step"] = held_step(out)
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    events["added"] = time.time()
    if mode == "elastic":
        # Held until Ray's resource view has the new node's free CPU and Ray's AutoscalingCoordinator,
        # whose count of possible workers the controller reads when it next decides on a resize,
        # has the node too. Then every report of the group of 1 is slowed down (the controller can
        # only resize between reports), so that on a busy machine the group cannot finish the run
        # before the controller has grown it: the step count, not the time, is what the test checks.
        wait_for_free_cpus(1)
        refresh_reservations()
        (out / "hold.json").write_text(json.dumps({"world_size": 1, "pause_s": 2.0}))
        (out / "held").unlink()


def refresh_reservations() -> None:
    """Make the cluster's AutoscalingCoordinator (Ray's actor that tells an elastic Train controller how
    many workers the cluster can hold) read the nodes now, without the removed one or with the added one.
    On its own it reads them every 20 s: a group of 1 slowed to 2 s a report would sometimes end its run
    before that, and the test would then see no growth for a reason that has nothing to do with raysr.
    Private API of Ray 2.60 (ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator)."""
    import ray

    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("tests/chaos_run.py", recompute=True), timeout=60)


def wait_for_dead_node(node_id: str, timeout: float = 60) -> None:
    """Wait until the GCS (whose node list the AutoscalingCoordinator reads) has declared ``node_id`` dead."""
    import ray

    deadline = time.monotonic() + timeout
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray still lists the removed node {node_id} as alive after {timeout} s")
        time.sleep(0.05)


def wait_for_free_cpus(cpus: float, timeout: float = 60) -> None:
    """Wait until Ray's resource view (the GCS's, which Ray Train's controller reads) has ``cpus`` free CPUs."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray never showed {cpus} free CPU(s) after the node was added")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(modes: str, train_dir: str, val: str, out_dir: str) -> int:
    # Shorter than Ray's defaults, to keep the test short: Ray Train's controller polls the workers
    # every 0.5 s (2 s), gives a worker group 20 s to start (60 s), and the GCS declares a node dead
    # after 3 missed 1 s health checks (5 missed 3 s ones). docs/fault-tolerance.md's figures are measured with these.
    # Ray Train's PreemptionWatcher, which tests/conftest.py turns off for the other tests, runs as it
    # does on a user's cluster: these runs lose nodes.
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TRAIN_V2_ENABLED="1",
                      RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
                      RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="1")
    from ray.cluster_utils import Cluster

    from raysr.ray_setup import init_ray

    # Ray's temp files (and the ray_current_cluster file Cluster writes) under RAY_TMPDIR, the
    # caller's private folder: never in the machine's shared /tmp/ray
    temp_dir = os.path.join(os.environ["RAY_TMPDIR"], "ray")
    os.makedirs(temp_dir, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "gcs_server_port": free_port(), "dashboard_port": free_port(),  # never a port another Ray holds
        "temp_dir": temp_dir, "_system_config": {"health_check_initial_delay_ms": 1000,
                                                 "health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                                                 "health_check_failure_threshold": 3}})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    os.environ["RAY_ADDRESS"] = cluster.address
    # Ray starts nodes from the main thread only (signal handlers), so training runs in a thread;
    # ray.init here first, for the same reason
    init_ray()
    try:
        for i, mode in enumerate(modes.split(",")):
            failed = (run_upscale_scenario(cluster, Path(out_dir) / mode) if mode == "upscale" else
                      run_scenario(mode, cluster, train_dir, val, Path(out_dir) / mode))
            if failed:
                # its run may still hold the cluster: the next scenario cannot run beside it
                for later in modes.split(",")[i + 1:]:
                    (Path(out_dir) / later).mkdir(parents=True, exist_ok=True)
                    (Path(out_dir) / later / "outcome.json").write_text(json.dumps(
                        {"error": f"not run: the {mode} scenario before it failed"}))
                sys.stdout.flush()
                os._exit(1)  # the caller kills the cluster (its processes name the private RAY_TMPDIR)
        return 0
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()


def run_scenario(mode: str, cluster, train_dir: str, val: str, out: Path) -> int:
    """One scenario on ``cluster`` (two 1-CPU worker nodes at its start and at its end): 0 if the run succeeded."""
    from raysr.config import load_config
    from raysr.train import fit

    out.mkdir(parents=True)
    (out / "hold.json").write_text(json.dumps({"world_size": 2}))  # the first checkpoint of the group of 2
    events: dict = {"start": time.time()}
    outcome: dict = {}

    def train():
        result = fit(load_config(preset="quickstart", overrides=overrides(mode, train_dir, val, out)),
                     callbacks=[recorder(out)])
        outcome["ok"] = result is not None and result.error is None
        events["end"] = time.time()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        scenario(mode, cluster, out, events)
    except Exception:  # said in this scenario's outcome; main() runs no next scenario
        outcome["error"] = traceback.format_exc()
    else:
        thread.join(timeout=RUN_TIMEOUT_S)
        if thread.is_alive():
            outcome["error"] = (f"the run did not end within {RUN_TIMEOUT_S} s of its last node change; its last "
                                f"report: {last_report(out)}")
    (out / "events.json").write_text(json.dumps(events))
    (out / "outcome.json").write_text(json.dumps(outcome))
    return 0 if outcome.get("ok") else 1


def last_report(out: Path) -> str:
    reports = out / "reports.jsonl"
    lines = reports.read_text().splitlines() if reports.exists() else []
    return lines[-1] if lines else "none"


UPSCALE_INPUTS, UPSCALE_SIZE = 24, 256  # 0.1-0.3 s of the one-CPU actor each (upscale_scenario throttles it)
UPSCALE_TIMEOUT_S = 120  # how long the upscale scenario waits for the first output, and then for the job's end
THROTTLE_RUN_S, THROTTLE_PERIOD_S = 0.1, 1.0  # the model actor's pace until then (upscale_scenario)


def upscale_argv(folder: Path, output: Path) -> list[str]:
    """The upscale scenario's command (without --ray) on its inputs in ``folder``, writing to ``output``."""
    return ["--model", str(folder / "g.pth"), "--input", str(folder / "in"), "--output", str(output)]


def make_upscale_inputs(folder: Path) -> None:
    """UPSCALE_INPUTS photo-like PNGs in ``folder/in`` and a small x2 generator ``folder/g.pth``."""
    from PIL import Image

    from conftest import synthetic_image  # tests/, this file's folder
    from raysr.generator_file import save_generator
    from test_upscale import tiny_generator

    (folder / "in").mkdir(parents=True)
    for i in range(UPSCALE_INPUTS):
        Image.fromarray(synthetic_image(UPSCALE_SIZE, UPSCALE_SIZE, seed=i)).save(folder / "in" / f"{i:02d}.png")
    save_generator(tiny_generator("srresnet", 2, num_feat=16, num_block=2), folder / "g.pth", fmt="raysr")


def written_outputs(output: Path) -> list[Path]:
    """The output images under their final names (a file being written has a hidden temporary name)."""
    return [p for p in output.rglob("*.png") if not p.name.startswith(".")] if output.exists() else []


def upscale_scenario(cluster, out: Path, events: dict, job: threading.Thread) -> None:
    """Remove the node of the model actor once the first output is written, the actor not through its
    inputs, then add a node.

    The model actor is throttled from its start until then (stopped, but for ``THROTTLE_RUN_S`` in every
    ``THROTTLE_PERIOD_S``): the first output needs a write task, and so a worker process, on the other
    node, in which time an unthrottled actor may upscale every input (one did, on a fast machine), and
    its node's loss would cost the job nothing. The actor is still stopped when its node goes (and
    is killed with it)."""
    from ray.util.state import list_actors

    def check(what: str) -> None:
        if not job.is_alive():
            raise RuntimeError(f"the upscale job ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {UPSCALE_TIMEOUT_S} s")

    deadline = time.monotonic() + UPSCALE_TIMEOUT_S
    # Ray Data names the actors of the model stage's pool 'MapWorker(MapBatches(UpscaleStage))'
    while not (actor := next((a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])
                              if "UpscaleStage" in a.class_name), None)):
        check("its model actor started")
        time.sleep(0.1)
    os.kill(actor.pid, signal.SIGSTOP)
    while not written_outputs(out / "sr"):
        check("its first output was written")
        os.kill(actor.pid, signal.SIGCONT)
        time.sleep(THROTTLE_RUN_S)
        os.kill(actor.pid, signal.SIGSTOP)
        for _ in range(int(THROTTLE_PERIOD_S / 0.05)):  # or until an output lands
            if written_outputs(out / "sr"):
                break
            time.sleep(0.05)
    victim = next(n for n in cluster.worker_nodes if n.node_id == actor.node_id)
    events["actor_id"] = actor.actor_id
    events["outputs_at_removal"] = len(written_outputs(out / "sr"))
    cluster.remove_node(victim, allow_graceful=False)  # as a reclaimed spot node: all its processes killed
    try:
        os.kill(actor.pid, signal.SIGKILL)  # stopped, it cannot see its raylet go and end itself
    except ProcessLookupError:
        pass
    events["removed"] = time.time()
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    events["added"] = time.time()


def actor_restarts(cluster, actor_id: str) -> int:
    """How often Ray restarted the actor ``actor_id`` (the GCS keeps ended actors' records)."""
    from ray.util.state import list_actors

    return list_actors(address=cluster.address, detail=True, filters=[("actor_id", "=", actor_id)])[0].num_restarts


def run_upscale_scenario(cluster, out: Path) -> int:
    """The upscale scenario on ``cluster`` (two 1-CPU worker nodes at its start and at its end): 0 if the job
    ended with exit code 0."""
    from raysr.upscale import main as upscale

    out.mkdir(parents=True)
    make_upscale_inputs(out)
    events: dict = {"start": time.time()}
    outcome: dict = {}

    def job():
        try:
            argv = upscale_argv(out, out / "sr") + ["--ray", cluster.address, "--workers", "1,1"]
            outcome["exit_code"] = upscale(argv)
        except BaseException:
            outcome["error"] = traceback.format_exc()
        events["end"] = time.time()

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    try:
        upscale_scenario(cluster, out, events, thread)
        thread.join(timeout=UPSCALE_TIMEOUT_S)
        if thread.is_alive():
            raise TimeoutError(f"the upscale job did not end within {UPSCALE_TIMEOUT_S} s of its node change; "
                               f"{len(written_outputs(out / 'sr'))} of {UPSCALE_INPUTS} outputs written")
        events["actor_restarts"] = actor_restarts(cluster, events["actor_id"])
    except Exception:  # said in this scenario's outcome (the job's own error first); main() runs no next scenario
        outcome.setdefault("error", traceback.format_exc())
    outcome["ok"] = outcome.get("exit_code") == 0 and "error" not in outcome
    (out / "events.json").write_text(json.dumps(events))
    (out / "outcome.json").write_text(json.dumps(outcome))
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
