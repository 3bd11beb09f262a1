"""What rank 0 of a training run does besides training, in one place (:class:`RankZero`): the
console lines, the validations, the experiment trackers (TensorBoard, MLflow, W&B), the checkpoint
folder and the divergence record.
The other ranks hold an :class:`OtherRank`, which does none of it, so ``raysr.train``'s worker
loop reads the same on every rank.
"""

from __future__ import annotations

import tempfile
import time

import ray.train

from raysr import run_checkpoint
from raysr.config import Config
from raysr.runlog import progress_line, validation_line
from raysr.trackers import Trackers
from raysr.util import say
from raysr.validation.queue import ValidationQueue


class RankZero:
    """Rank 0's duties for the run ``cfg`` in the folder ``run`` (local or s3://): validations by a
    :class:`raysr.validation.queue.ValidationQueue` on ``device`` (``perceptual``: the run's VGG loss,
    reused), the trackers of ``run.trackers`` (TensorBoard events under ``run``, MLflow, W&B), the lines
    of the console, the checkpoint folder."""

    def __init__(self, cfg: Config, run: str, device, perceptual=None):
        self.cfg, self.run = cfg, run
        self.validation = ValidationQueue(cfg, device, perceptual)
        self.trackers = Trackers(cfg, run)  # each on a thread of its own: a slow server never holds up a step
        self.finished = True  # False once the run diverged: its tracker runs end as failed
        self.latest_val, self.latest_comparison = {}, None  # the newest validation that has finished

    def say(self, line: str) -> None:
        """One console line for the run (every rank would print it)."""
        say(line)

    def validate_and_log(self, step: int, g, metrics: dict, wait: bool) -> None:
        """Hand ``g`` (None: no validation due) to the queue, add to ``metrics`` what validation
        cost and the newest result finished since the last report, log them to the trackers and the console.

        async: the snapshot is handed over and training goes on; results arrive at a later report
        (``wait``, the last one, waits for every validation). val_block_s: rank 0's (so every
        rank's) time in validation at this report."""
        t_val = time.perf_counter()
        if g is not None:
            self.validation.submit(step, g)
        finished = self.validation.collect(wait=wait)
        metrics.update(val_block_s=time.perf_counter() - t_val, val_skipped=self.validation.skipped,
                       val_failed=self.validation.failed, val_done=self.validation.done)
        self.trackers.log_train(step, metrics)
        for val_metrics, comparison in finished:  # at the step of the weights they scored
            self.trackers.log_validation(val_metrics, comparison)
        for val_metrics, _ in finished[:-1]:  # the report carries the newest; the others get a line
            say(validation_line(val_metrics))
        if finished:
            self.latest_val, self.latest_comparison = finished[-1]
            metrics.update(self.latest_val)  # reported once: Tune sees each validation once
        say(progress_line(self.cfg.train.total_steps, metrics))

    def checkpoint(self, state, metrics: dict):
        """The checkpoint of ``state`` written to a local folder, as a ray.train.Checkpoint for the report."""
        local = tempfile.mkdtemp(prefix="raysr_checkpoint_")
        run_checkpoint.write(local, state, {**metrics, **self.latest_val}, self.latest_comparison)
        self.trackers.flush()
        return ray.train.Checkpoint.from_directory(local)

    def diverged(self, metrics: dict) -> None:
        """The diverged interval's line, and the record :func:`raysr.train.fit` turns into its error."""
        say(progress_line(self.cfg.train.total_steps, metrics))
        run_checkpoint.write_divergence(self.run, metrics)
        self.finished = False
        self.validation.close()

    def close(self) -> None:
        self.validation.close()
        self.trackers.close(self.finished)


class OtherRank:
    """A rank other than 0: :class:`RankZero`'s methods, each doing nothing (``checkpoint``: None,
    the report of a rank that uploads no files)."""

    def say(self, line: str) -> None: ...

    def validate_and_log(self, step: int, g, metrics: dict, wait: bool) -> None: ...

    def checkpoint(self, state, metrics: dict) -> None: ...

    def diverged(self, metrics: dict) -> None: ...

    def close(self) -> None: ...
