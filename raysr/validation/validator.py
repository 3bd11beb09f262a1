"""Training's validation as one object: the validation images, their bicubic baseline and the
networks that score a generator on them (:func:`raysr.scoring.score_generator`), in one process.

Training runs a :class:`Validator` in a Ray actor of its own (``run.validation=async``, the default;
:mod:`raysr.validation.queue`), which scores snapshots of the generator's weights while the training ranks go
on, or inside rank 0 (``run.validation=inline``, or while that actor cannot be placed), where
every rank waits for it as in BasicSR. Either way the metrics are the same functions on the
same images, so an async run validates exactly what an inline one would.

Plain PyTorch (no Ray): what the actor holds is tested here without it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from raysr.config import Config
from raysr.validation.pairs import load_validation
from raysr.lpips import load_lpips
from raysr.models import generator_from_config
from raysr.scoring import bicubic_baseline, score_generator, validation_images, validation_lr_images
from raysr.weights import strip_wrapper_prefixes


class Validator:
    """Scores a run's generator on ``data.val`` as training's validation does (LR from ``data.val_lr``
    when it is set, else the bicubic of each image).

    device: where scoring runs (None: the first CUDA device when this process sees one, else the
    CPU). perceptual: the VGG perceptual loss to measure with (rank 0 passes its own); None builds
    one when the run's loss has it (GAN phase, ``loss.perceptual.weight`` > 0). threads: torch's
    CPU threads for this process (None: as they are). Loading the
    validation images or the VGG / LPIPS weights raises here, at construction.
    """

    def __init__(self, cfg: Config, device: Optional[torch.device] = None, perceptual: Optional[nn.Module] = None,
                 threads: Optional[int] = None):
        if threads is not None:  # an actor of n CPUs: torch's threads to match (it would take every core)
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        val_set = load_validation(cfg.data.val, cfg.scale, lr_source=cfg.data.val_lr)
        self.images = validation_images(val_set)
        self.lr_images = validation_lr_images(val_set)  # None: LR by bicubic of each image
        self.baseline = bicubic_baseline(self.images, cfg.scale, self.lr_images)
        self.lpips_fn = load_lpips(device=self.device)[0]
        if perceptual is None and cfg.train.phase == "gan" and cfg.loss.perceptual.weight > 0:
            from raysr.engine import perceptual_loss
            perceptual = perceptual_loss(cfg, self.device)
        self.perceptual = perceptual
        self.g: Optional[nn.Module] = None  # built on the first snapshot (score() needs none)

    def score(self, step: int, g: nn.Module) -> tuple[dict, bytes | None]:
        """``(metrics, comparison PNG)`` of ``g`` (on this validator's device) at training step ``step``.

        metrics: ``psnr``, ``ssim`` (Y) [, ``lpips``, ``perceptual``] as :func:`raysr.scoring.score_generator`,
        ``psnr_bicubic`` / ``ssim_bicubic``, ``val_step`` (the step of the weights scored) and
        ``val_time_s`` (seconds this validation took).
        """
        start = time.perf_counter()
        metrics, comparison = score_generator(g, self.images, self.cfg.scale, self.perceptual, self.lpips_fn,
                                              self.lr_images)
        metrics.update(self.baseline, val_step=step, val_time_s=time.perf_counter() - start)
        return metrics, comparison

    def score_weights(self, step: int, weights: Mapping[str, torch.Tensor]) -> tuple[dict, bytes | None]:
        """:meth:`score` of the run's generator holding ``weights`` (a state dict, any device; rank 0
        sends :func:`raysr.weights.cpu_state_dict` copies, which training then cannot change)."""
        if self.g is None:
            self.g = generator_from_config(self.cfg.model.generator).to(self.device).eval()
        self.g.load_state_dict(strip_wrapper_prefixes(dict(weights)))
        return self.score(step, self.g)

    def ready(self) -> dict:
        """The bicubic baseline (``psnr_bicubic``, ``ssim_bicubic``): returns once the validator is built."""
        return dict(self.baseline)
