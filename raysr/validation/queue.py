"""Rank 0's validations during training (:class:`ValidationQueue`), scored by a
:class:`raysr.validation.validator.Validator` in a Ray actor of its own or in rank 0's process.

The only Ray-aware module of :mod:`raysr.validation`: ``raysr.train``'s rank 0 holds one queue per run.
"""

from __future__ import annotations

import time

import ray

from raysr.config import Config
from raysr.util import say
from raysr.validation.validator import Validator
from raysr.weights import cpu_state_dict

VALIDATOR_RESTARTS = 3  # Ray restarts of a validation actor that died (and retries of its validation)


class ValidationQueue:
    """Rank 0's validations: handed to a :class:`Validator` in a Ray actor of
    their own (``run.validation=async``) or done in place (``inline``); their results come back
    through :meth:`collect`.

    async: :meth:`submit` copies the generator's weights to host memory and returns; the actor
    (``run.validation_resources``) scores one snapshot at a time while training goes on. A
    snapshot due while the actor is still busy waits; a newer one replaces it (counted in
    ``skipped``: the actor is slower than ``run.val_every`` steps of training). While the actor
    cannot be placed (no free resources yet), a due snapshot waits up to
    ``run.validation_wait_s``, then rank 0 scores it itself. Ray restarts an actor that dies (its
    node lost, its process killed) and retries its validation, ``VALIDATOR_RESTARTS`` times; after
    that, or when the actor cannot be built, rank 0 validates for the rest of the run. The actor is
    owned by rank 0's process, so it ends with it.

    Validation is a side task: a validation that fails (the validator raised, in the actor or in
    place, or could not be built) or that has not finished ``run.validation_wait_s`` after it was
    due when the run ends is skipped and counted in ``failed``; the first failure is said with its
    cause. Training never stops because of it.
    """

    def __init__(self, cfg: Config, device, perceptual=None):
        self.cfg, self.device, self.perceptual = cfg, device, perceptual
        self.inline = cfg.run.validation == "inline"
        self.local = None  # the in-process Validator (inline, or while the actor is not there)
        self.actor = self.ready = None
        self.running = None  # (step, host weights, when due, ObjectRef of the actor's (metrics, comparison))
        self.queued = None  # (step, host weights, when due: time.monotonic())
        self.finished: list[tuple[dict, bytes | None]] = []
        self.skipped = 0
        self.failed = 0  # validations that failed or timed out: skipped, training went on
        self.done = 0  # validations finished (each reaches TensorBoard; the newest at a report, the report too)
        self.warned: set[str] = set()
        if not self.inline:
            self.actor, self.ready = self._start_actor()

    def _start_actor(self):
        resources = self.cfg.run.validation_resources
        options = {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0),
                   "max_restarts": VALIDATOR_RESTARTS, "max_task_retries": VALIDATOR_RESTARTS}
        if "memory" in resources:
            options["memory"] = resources["memory"]
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
        if custom:
            options["resources"] = custom
        actor = ray.remote(Validator).options(**options).remote(
            self.cfg, None, None, max(1, int(resources.get("CPU", 1))))
        return actor, actor.ready.remote()

    def submit(self, step: int, g) -> None:
        """Validate ``g`` (the generator as of training step ``step``): now when inline, else a
        host copy of its weights goes to the actor."""
        if self.inline:
            self._score_in_place(step, lambda v: v.score(step, g))
            return
        if self.queued is not None:
            self.skipped += 1
            busy = (f"still scoring step {self.running[0]}" if self.running else
                    "still starting (placed, then loading the validation images)")
            self._warn("busy", f"raysr: validation of step {self.queued[0]} skipped, step {step} is due and the "
                       f"validator is {busy}. If this goes on, validation takes longer than run.val_every="
                       f"{self.cfg.run.val_every} steps of training: give it more resources "
                       "(run.validation_resources, e.g. {GPU: 1}) or raise run.val_every (said once)")
        self.queued = (step, cpu_state_dict(g), time.monotonic())
        self._advance(wait=False)

    def collect(self, wait: bool = False) -> list[tuple[dict, bytes | None]]:
        """The ``(metrics, comparison PNG)`` of validations finished since the last call, oldest
        first; ``wait``: of every one submitted (the end of a run)."""
        self._advance(wait)
        while wait and (self.running or self.queued):
            self._advance(wait)
        out, self.finished = self.finished, []
        self.done += len(out)
        return out

    def _advance(self, wait: bool) -> None:
        """Take the actor's result if it is done, then start (or, past the wait, score in place) the
        queued one. ``wait`` (the end of the run): block, but no longer than ``run.validation_wait_s``
        from when each validation was due."""
        if self.running is not None:
            step, weights, due, ref = self.running
            if not ray.wait([ref], timeout=self._left(due) if wait else 0)[0]:
                if wait:  # the run ends: it is not waited for any longer
                    self.running = None
                    self._fail(step, f"not finished run.validation_wait_s={self.cfg.run.validation_wait_s:g} s "
                                     "after it was due, at the end of the run")
                return
            self.running = None
            try:
                self.finished.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:
                self._actor_gone(f"the validation actor died ({type(err).__name__}) after {VALIDATOR_RESTARTS} "
                                 "restart(s)")
                self._score_in_place(step, lambda v: v.score_weights(step, weights))
            except Exception as err:  # the validator raised (RayTaskError), or its result was lost
                self._fail(step, _cause(err))
        if self.queued is None:
            return
        step, weights, due = self.queued
        if not self.inline:
            if ray.wait([self.ready], timeout=self._left(due) if wait else 0)[0]:
                try:
                    ray.get(self.ready)  # the actor's own error if it could not be built
                except Exception as err:
                    self._actor_gone(f"the validation actor could not start ({_cause(err)})")
                else:
                    self.running, self.queued = (step, weights, due, self.actor.score_weights.remote(step, weights)), None
                    return
            elif self._left(due) > 0:
                return
            else:
                self._warn("placed", f"raysr: the validation actor ({self.cfg.run.validation_resources}) has not "
                           f"been placed after run.validation_wait_s={self.cfg.run.validation_wait_s:g} s; rank 0 "
                           "validates until it is. Free those resources, lower run.validation_resources, or set "
                           "run.validation=inline (said once)")
        self.queued = None
        self._score_in_place(step, lambda v: v.score_weights(step, weights))

    def _left(self, due: float) -> float:
        """Seconds of ``run.validation_wait_s`` left for a validation due at ``due``."""
        return max(0.0, self.cfg.run.validation_wait_s - (time.monotonic() - due))

    def _actor_gone(self, why: str) -> None:
        say(f"raysr: {why}; rank 0 validates for the rest of the run")
        self.inline = True

    def _score_in_place(self, step: int, score) -> None:
        """``score(validator)`` by rank 0's own Validator (built on first use); a failure is counted, not raised."""
        try:
            if self.local is None:
                self.local = Validator(self.cfg, self.device, self.perceptual)
            self.finished.append(score(self.local))
        except Exception as err:  # any error of a side task: training goes on
            self._fail(step, _cause(err))

    def _fail(self, step: int, cause: str) -> None:
        self.failed += 1
        self._warn("failed", f"raysr: validation of step {step} failed: {cause}. Training goes on without it; "
                   "val_failed counts the validations skipped this way (said once)")

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            say(message)

    def close(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None


def _cause(err: BaseException) -> str:
    """The error behind ``err`` in one line: the validator's own exception when Ray wrapped it."""
    inner = getattr(err, "cause", None) or err
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1] if text else ''}"
