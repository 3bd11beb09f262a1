"""What a training run tells people while it runs: interval means, the progress line, TensorBoard.

Plain Python/PyTorch (no Ray): ``raysr.train`` feeds a :class:`Meter` every step, prints
:func:`progress_line` once per log interval and writes the same metrics to :class:`TensorBoard`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from raysr.storage import is_s3, join, write_bytes


COUNTED = ("nonfinite_steps",)  # step scalars summed over the interval (0/1 per step), not averaged


class Meter:
    """Running means of step scalars over the current log interval (each over the steps that
    reported it), plus throughput.

    Scalars may be floats or 0-dim tensors on any device: tensors are summed where they
    are and read back to the host once, in :meth:`summary`, so a step never waits on the GPU.
    """

    def __init__(self):
        self.reset_interval()

    def reset_interval(self):
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that reported each key (G's losses skip D warm-up steps)
        self.n = 0
        self.crops = 0
        self.wait = 0.0
        self.busy = 0.0

    def add(self, scalars: dict, batch: int, wait: float, total: float):
        for k, v in scalars.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1
        self.crops += batch
        self.wait += wait
        self.busy += total

    def summary(self) -> dict:
        """Interval means (losses, D outputs, lr), counts (``nonfinite_steps``), ``crops_per_s``,
        ``data_wait_frac``, ``step_time_s``."""
        tensors = {k: v for k, v in self.sums.items() if isinstance(v, torch.Tensor)}
        sums = {k: float(v) for k, v in self.sums.items() if k not in tensors}
        if tensors:  # one device -> host copy for the whole interval
            values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
            sums.update(zip(tensors, values))
        out = {k: int(sums[k]) if k in COUNTED else sums[k] / self.counts[k] for k in self.sums}
        out["crops_per_s"] = self.crops / self.busy if self.busy else 0.0
        out["data_wait_frac"] = self.wait / self.busy if self.busy else 0.0
        out["step_time_s"] = self.busy / max(self.n, 1)
        return out


def _psnr(m: dict) -> str:
    return f"psnr {m['psnr']:.2f} (bicubic {m['psnr_bicubic']:.2f})"


def validation_line(m: dict) -> str:
    """``raysr: validation of step V: psnr (bicubic) | ssim [| lpips] | T s``, for a validation that
    finished with a newer one before the same report (which shows only the newer)."""
    parts = [_psnr(m), f"ssim {m['ssim']:.4f}"]
    parts += [f"{key} {m[key]:.4g}" for key in ("lpips", "perceptual") if key in m]
    return f"raysr: validation of step {m['val_step']}: " + " | ".join(parts) + f" | {m['val_time_s']:.1f} s"


def progress_line(total_steps: int, m: dict) -> str:
    """``raysr: step S/T | losses | psnr (bicubic) [at step V] | lr | crops/s | data wait | ETA [| skipped N]``:
    a validation that finished at this report shows the step of the weights it scored when that is earlier."""
    step = m["step"]
    remaining = (total_steps - step) * m.get("step_time_s", 0.0)
    parts = [f"step {step}/{total_steps}"]
    for key in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d"):
        if key in m:
            parts.append(f"{key} {m[key]:.4g}")
    if "psnr" in m:
        at = f" at step {m['val_step']}" if m.get("val_step", step) != step else ""
        parts.append(_psnr(m) + at)
    parts += [f"lr {m['lr']:.2e}", f"{m['crops_per_s']:.1f} crops/s", f"data {100 * m['data_wait_frac']:.0f}%",
              f"ETA {duration(remaining)}"]
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    if m.get("nonfinite_steps"):
        parts.append(f"non-finite {m['nonfinite_steps']} step(s), not applied")
    return "raysr: " + " | ".join(parts)


def duration(seconds: float) -> str:
    """``1h05m`` / ``4m09s``."""
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class TensorBoard:
    """Scalars and comparison images as TensorBoard events under ``<run>/tensorboard``.

    Uses tensorboardX (installed with ray) or torch's writer when tensorboard
    is installed; does nothing without either. For s3:// runs the events are
    written locally and uploaded at every :meth:`flush` (each checkpoint).
    """

    def __init__(self, run: str):
        self.remote = join(run, "tensorboard") if is_s3(run) else None
        self.local = tempfile.mkdtemp(prefix="raysr_tb_") if self.remote else os.path.join(run, "tensorboard")
        self.writer = None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
        self.writer = SummaryWriter(self.local)

    def log(self, step: int, metrics: dict, comparison: bytes | None) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, step)
        if comparison is not None:
            import io

            import numpy as np
            from PIL import Image
            image = np.asarray(Image.open(io.BytesIO(comparison)))
            self.writer.add_image("val/bicubic_sr_hr", image, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.remote:
            for path in Path(self.local).rglob("*"):
                if path.is_file():
                    write_bytes(join(self.remote, str(path.relative_to(self.local))), path.read_bytes())

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
        if self.remote:  # the local copy of an s3:// run's events is uploaded; drop it
            shutil.rmtree(self.local, ignore_errors=True)
