"""Ctrl-C that saves. The first SIGINT or SIGTERM to the ``python -m raysr.train`` driver (Ctrl-C;
``ray job stop`` sends SIGTERM) makes the workers write a checkpoint at the next step boundary and
end; the driver then names that step and the command that resumes, and exits with 130. A second
signal stops at once (the steps since the last checkpoint are lost).

* :func:`fit_until_stopped` (driver) — ``trainer.fit()`` in a thread, so that the main thread owns
  the signals: Ray Train installs its own SIGINT handler only from the main thread, and that one
  aborts the run without a checkpoint. The first signal sets the flag of a named actor (:class:`StopFlag`,
  one per driver process, armed for the length of each fit).
* :class:`StopCheck` (every worker) — at each step boundary rank 0 looks whether the flag is set
  (a pending reply of the actor, checked locally: no round trip), and one all-reduce of a CPU scalar
  over gloo tells the other ranks, so that every rank stops at the same step and calls
  ``ray.train.report`` as often as the others. Without the actor (a Tune trial, whose Ctrl-C is
  Tune's) it does nothing.
* :func:`exit_status` — the command's exit status, and the line that says where it stopped.

Importing this module does not import ray (``python -m raysr.train --dry-run`` never loads Ray).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import threading

from raysr.util import say

FLAG_ACTOR = "raysr_stop_flag"  # one per driver process (its Ray namespace), armed by every fit
STOPPED_KEY = "stopped_by_signal"  # in the last report of a run a signal stopped: 1
EXIT_STOPPED = 130  # what a shell reports for a command ended by Ctrl-C
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """A Ray actor (asyncio): ``arm`` clears the flag for the fit about to start and ``disarm`` ends
    that; ``request`` sets it; ``armed`` says whether a fit listens; ``wait`` returns once it is set."""

    def __init__(self):
        self.event, self.listening = asyncio.Event(), False

    async def arm(self) -> None:
        self.event, self.listening = asyncio.Event(), True

    async def disarm(self) -> None:
        self.listening = False

    async def armed(self) -> bool:
        return self.listening

    async def request(self) -> None:
        self.event.set()

    async def wait(self) -> bool:
        await self.event.wait()
        return True


_flag: tuple[str, object] | None = None  # (the Ray it lives in, this driver's StopFlag)


def stop_flag():
    """This driver's StopFlag, started at its first fit. The handle is kept for the process's life:
    Ray ends an actor once its last handle goes, and starting one again at every fit put an actor
    start (a process that imports raysr) before each run's first worker."""
    global _flag
    import ray

    here = ray.get_runtime_context().gcs_address + "/" + ray.get_runtime_context().get_job_id()
    if _flag is None or _flag[0] != here:  # never a handle from an earlier ray.init of this process
        _flag = here, ray.remote(num_cpus=0)(StopFlag).options(name=FLAG_ACTOR, get_if_exists=True).remote()
    return _flag[1]


# --------------------------------------------------------------------------- driver


def fit_until_stopped(trainer):
    """``trainer.fit()`` (Ray initialised), with the first SIGINT/SIGTERM asking the workers to
    checkpoint and stop at the next step and a second one ending this process at once (exit 130).
    Outside the main thread (signals cannot be caught there) it is ``trainer.fit()`` alone.
    Returns Ray's Result; raises what ``fit`` raises."""
    import ray

    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    flag = stop_flag()
    ray.get(flag.arm.remote())  # a flag set during an earlier fit of this process stops nothing now
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    signals = 0

    def on_signal(signum, frame) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            flag.request.remote()
            say(f"raysr: {signal.Signals(signum).name}: the workers write a checkpoint at the next step, then "
                "stop (send it again to stop at once, losing the steps since the last checkpoint)")
            return
        say("raysr: stopped at once (second signal): the steps since the last checkpoint are lost; "
            "the same command resumes from that checkpoint")
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)  # the workers go with this driver (Ray ends a job's actors with it)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        thread = threading.Thread(target=fit, name="raysr-fit", daemon=True)
        thread.start()
        thread.join()  # a signal runs its handler in this thread, then the join goes on
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        flag.disarm.remote()  # a Tune trial this process runs later finds the actor, but no fit listening
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def exit_status(result, argv: list[str] | None) -> int:
    """The exit status of ``python -m raysr.train argv`` whose run (the last phase it ran) ended
    with ``result`` (None: it failed): 1, 0, or :data:`EXIT_STOPPED` when a signal stopped it,
    after one line naming the step, its checkpoint and the command that resumes."""
    if result is None:
        return 1
    m = result.metrics or {}
    if not m.get(STOPPED_KEY):
        return 0
    command = shlex.join(["python", "-m", "raysr.train", *(sys.argv[1:] if argv is None else argv)])
    where = f", checkpoint {result.checkpoint.path}" if result.checkpoint is not None else ""
    say(f"raysr: stopped at step {m['step']} (Ctrl-C){where}; resume with: {command}")
    return EXIT_STOPPED


def stopped(result) -> bool:
    """Whether a signal stopped the run that ended with ``result`` (Ray's Result, or None: failed)."""
    return result is not None and bool((result.metrics or {}).get(STOPPED_KEY))


# --------------------------------------------------------------------------- workers


class StopCheck:
    """In every worker of a run (``rank`` of ``world``): :meth:`requested` at each step boundary
    says, the same on every rank, whether the driver asked the run to stop. Build it on every rank
    after torch.distributed is set up (it may create a gloo group, a collective call)."""

    def __init__(self, rank: int, world: int):
        import ray
        import torch
        import torch.distributed as dist

        self.pending, self.group, self.world = None, None, world
        if rank == 0:
            try:
                flag = ray.get_actor(FLAG_ACTOR)
            except ValueError:  # no driver of raysr.train (a Tune trial): nothing asks this run to stop
                flag = None
            if flag is not None and ray.get(flag.armed.remote()):  # else a Tune trial of a process that also fit()
                self.pending = flag.wait.remote()
        if world > 1:
            # CPU scalars over gloo: a host read of a GPU flag at every step would stall the GPU
            self.group = None if "gloo" in str(dist.get_backend()) else dist.new_group(backend="gloo")
            enabled = torch.tensor([int(self.pending is not None)])
            dist.broadcast(enabled, src=0, group=self.group)
            self.world = world if enabled.item() else 1  # every rank skips the checks alike

    def requested(self) -> bool:
        import ray
        import torch
        import torch.distributed as dist

        flag = self.pending is not None and bool(ray.wait([self.pending], timeout=0)[0])
        if self.world > 1:
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = bool(t.item())
        return flag
