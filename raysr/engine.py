"""One training step of an SR generator (PSNR phase) or of a G/D pair (GAN phase), in plain PyTorch.

Read :func:`train_step` top to bottom: it is the whole algorithm. SRGAN and ESRGAN
differ only in the config (VGG layer before/after ReLU, vanilla vs relativistic
GAN, pixel weight η), which shows up as a few branches there. DDP wrapping is
plain torch (:func:`ddp`); which rank validates and where checkpoints go belong
to ``raysr.rank_zero``. This module never imports ray.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from raysr.config import Config, OptimizerConfig, ScheduleConfig
from raysr.losses import PerceptualLoss, d_adv_loss, g_adv_loss, pixel_loss
from raysr.models import discriminator_from_config, generator_from_config


# --------------------------------------------------------------------------- building blocks


class EMA:
    """Exponential moving average of a model's weights: θ_ema ← d·θ_ema + (1−d)·θ (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """One EMA step; ``keep`` (0-dim, 1.0 = this step was skipped) leaves the average as it is."""
        weight = 1.0 - self.decay if keep is None else (1.0 - keep) * (1.0 - self.decay)
        for p_ema, p in zip(self.module.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), weight)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b if keep is None else torch.where(keep > 0, b_ema, b))


def build_optimizer(params, o: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    """Adam; ``fused``: one kernel for all parameters, its step counters on the device (no host read)."""
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                            fused=True if fused else None)  # None: torch picks foreach (False: a for-loop)


def lr_factor(step: int, s: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    multistep: γ^(milestones passed). cosine_restart (SGDR as in BasicSR's
    CosineAnnealingRestartLR): within each period the lr falls from base to
    ``eta_min`` along half a cosine, then restarts; after the last period it stays at eta_min.
    """
    if s.type == "constant":
        return 1.0
    if s.type == "multistep":
        return s.gamma ** sum(step >= m for m in s.milestones)
    start = 0
    for period in s.periods:
        if step < start + period:
            t = (step - start) / period
            return (s.eta_min + (base_lr - s.eta_min) * 0.5 * (1 + math.cos(math.pi * t))) / base_lr
        start += period
    return s.eta_min / base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, s: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s, base_lr))


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast + channels_last: by default on CUDA; ``bf16`` forces it (CPU too, e.g. to test it)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str):
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def configure_cuda(tf32: bool, cudnn_benchmark: bool) -> None:
    """Process-wide CUDA math settings (``run.tf32``, ``run.cudnn_benchmark``); nothing else reads them."""
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9 refuses a mix of this API and allow_tf32
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def configure_determinism(deterministic: bool) -> None:
    """``run.deterministic``: only kernels that give the same result on every run (torch errors on an op
    that has none), cuDNN's deterministic convolutions without its benchmark, and cuBLAS with a fixed
    workspace (the variable is read when cuBLAS starts, so this runs before the first CUDA matmul)."""
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """``module`` under torch.compile for ``run.compile`` (as is for ``off``). The result shares
    ``module``'s parameters; state dicts are taken from ``module`` (no ``_orig_mod.`` prefixes)."""
    if mode == "off":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


# --------------------------------------------------------------------------- the training state


@dataclass
class TrainState:
    """Everything a step touches and a checkpoint restores (:mod:`raysr.run_checkpoint` owns that layout).

    ``g``/``d`` are what the G and D updates run through: compiled when ``run.compile`` is on,
    then DDP-wrapped on several workers. ``g_module``/``d_module`` are the bare networks
    underneath (checkpoints, EMA, validation). ``d_for_g`` and ``perceptual_for_g`` are D and the
    perceptual loss as G's update calls them: compiled like ``d``, never DDP-wrapped (D's
    weights get no gradient there, so no all-reduce is wanted). ``perceptual`` stays eager:
    validation calls it on whole images of every size.
    """

    cfg: Config
    g: nn.Module
    g_module: nn.Module
    opt_g: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[EMA] = None
    d: Optional[nn.Module] = None
    d_module: Optional[nn.Module] = None
    d_for_g: Optional[nn.Module] = None
    opt_d: Optional[torch.optim.Optimizer] = None
    sched_d: Optional[torch.optim.lr_scheduler.LambdaLR] = None
    perceptual: Optional[PerceptualLoss] = None
    perceptual_for_g: Optional[nn.Module] = None
    step: int = 0
    # divergence guard, on the device: current run of consecutive non-finite steps, and the step
    # at which it first reached train.max_nonfinite (-1: never); read once per log interval
    nonfinite_run: Optional[torch.Tensor] = None
    diverged_at: Optional[torch.Tensor] = None
    # each rank's RNGs and data position for the next checkpoint (run_checkpoint.gather_rank_states, rank 0)
    ranks: Optional[list] = None

    @property
    def g_eval(self) -> nn.Module:
        """The generator to validate and export: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.g_module


def build_state(cfg: Config, device: torch.device, wrap=lambda m, has_bn: m) -> TrainState:
    """Networks, optimizers, schedules and losses for ``cfg`` on ``device``.

    ``wrap(module, has_batchnorm)`` turns a (compiled) network into what the updates run
    through (raysr.train passes DDP; tests pass the identity). On CUDA this also applies
    ``run.tf32`` and ``run.cudnn_benchmark`` to the process, then ``run.deterministic`` on every device.
    """
    run = cfg.run
    if device.type == "cuda":
        configure_cuda(run.tf32, run.cudnn_benchmark)
    configure_determinism(run.deterministic)
    layout = torch.channels_last if uses_bf16(device, run.precision) else torch.contiguous_format
    g_module = generator_from_config(cfg.model.generator).to(device)
    if cfg.train.init_from:
        from raysr.generator_file import load_generator
        init = load_generator(cfg.train.init_from)
        try:
            g_module.load_state_dict(init.state_dict())
        except RuntimeError as err:
            raise ValueError(f"train.init_from={cfg.train.init_from} does not fit model.generator "
                             f"({cfg.model.generator}): {err}") from err
    g_module = g_module.to(memory_format=layout)
    opt_g = build_optimizer(g_module.parameters(), cfg.optim.g, cfg.optim.fused)
    state = TrainState(cfg=cfg, g=wrap(compiled(g_module, run.compile), _has_batchnorm(g_module)),
                       g_module=g_module, opt_g=opt_g, sched_g=build_scheduler(opt_g, cfg.optim.schedule),
                       ema=EMA(g_module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None)
    if cfg.train.phase == "gan":
        d_module = discriminator_from_config(cfg.model.discriminator, cfg.data.gt_size).to(device, memory_format=layout)
        state.d_module, state.d_for_g = d_module, compiled(d_module, run.compile)
        state.d = wrap(state.d_for_g, _has_batchnorm(d_module))
        state.opt_d = build_optimizer(d_module.parameters(), cfg.optim.d, cfg.optim.fused)
        state.sched_d = build_scheduler(state.opt_d, cfg.optim.schedule)
        if cfg.loss.perceptual.weight > 0:
            state.perceptual = perceptual_loss(cfg, device, layout)
            state.perceptual_for_g = compiled(state.perceptual, run.compile)
    return state


def perceptual_loss(cfg: Config, device: torch.device,
                    layout: torch.memory_format = torch.contiguous_format) -> PerceptualLoss:
    """The VGG perceptual loss ``loss.perceptual`` configures (weights loaded, frozen), on ``device``."""
    perc = cfg.loss.perceptual
    return PerceptualLoss(layers=perc.layers, before_relu=perc.before_relu, criterion=perc.criterion,
                          feature_scale=perc.feature_scale, weights=perc.weights_path,
                          allow_random_weights=perc.allow_random_weights).to(device, memory_format=layout)


def _has_batchnorm(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def ddp(module: nn.Module, has_batchnorm: bool, world: int, device: torch.device,
        static_graph: bool = True) -> nn.Module:
    """``module`` wrapped for data-parallel training (as is on a single worker): the ``wrap`` of
    :func:`build_state` on ``world`` workers (the process group already initialised).

    BatchNorm statistics stay per replica (as BasicSR): syncing buffers every forward would
    also mix the real and fake batches' statistics of D. ``gradient_as_bucket_view``: gradients
    live in the all-reduce buckets (no copy, less memory). ``static_graph``: every parameter of
    the wrapped network gets its gradient in every backward, in the same order. That holds for G
    and D here: G's adversarial term runs D through ``TrainState.d_for_g`` (not this wrapper, D
    frozen), so freezing D never changes D's DDP graph; D runs twice (real, fake) before its one
    backward, which autograd sums into one gradient per parameter; G's forward under no_grad during
    D warm-up (``train.d_init_steps``) is invisible to DDP. A gloo run of both patterns gave
    bit-identical weights with and without it. ``static_graph`` is off where ranks accumulate
    micro-batches (an elastic run below its max workers): DDP's static graph fails on ``no_sync``
    (torch 2.13: "expect_autograd_hooks_ INTERNAL ASSERT FAILED"). Buckets stay at torch's 25 MB
    (first 1 MB): not measured on GPUs yet.
    """
    if world == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=not has_batchnorm,
                                               gradient_as_bucket_view=True, static_graph=static_graph)


def weight_fingerprint(module: nn.Module) -> float:
    """Sum of squared weights in float64: equal on every DDP replica of the same model."""
    with torch.no_grad():
        return float(sum(p.double().pow(2).sum() for p in module.parameters()))


# --------------------------------------------------------------------------- the step


def train_step(s: TrainState, lr: torch.Tensor, hr: torch.Tensor, micro_batches: int = 1,
               global_batch: int | None = None,
               hr_usm: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
    """One optimisation step on a batch. lr: (N,3,h,w), hr: (N,3,h·scale,w·scale), float in [0,1].

    ``hr_usm`` (``data.degradation=realesrgan``): the unsharp-masked HR, like hr; each loss compares
    against it or against hr as ``degradation.pixel_target``, ``perceptual_target`` and
    ``adversarial_target`` say (Real-ESRGAN: L1 and perceptual on it, D's real images plain).

    ``micro_batches`` > 1 accumulates gradients: the batch is cut into that many micro-batches
    (``torch.tensor_split``: sizes differ by at most 1), each run forward and backward on its
    own (DDP all-reduces only after the last), with its loss weighted by its crops, so the
    gradient is that of the mean loss over the whole batch. ``global_batch``: the crops of this
    step on all DDP ranks together (default ``N × world size``); a rank's gradient is weighted
    by its share, so ranks may hold different numbers of crops (elastic runs, raysr.train).

    Returns the step's scalars: losses (the means over this rank's N crops) and mean D logits
    as 0-dim float32 tensors on the batch's device, never read here (the step makes no host
    sync, so the GPU queue stays full; :class:`raysr.runlog.Meter` reads them once per log
    interval), and the learning rate ``lr`` as a float. The order of events follows BasicSR's
    SRGAN/ESRGAN models: update G with D frozen, then D.
    """
    cfg, device = s.cfg, lr.device
    autocast = autocast_for(device, cfg.run.precision)
    hr_usm = hr if hr_usm is None else hr_usm
    if uses_bf16(device, cfg.run.precision):
        lr, hr, hr_usm = (x.contiguous(memory_format=torch.channels_last) for x in (lr, hr, hr_usm))
    targets = {name: getattr(cfg.degradation, f"{name}_target") for name in ("pixel", "perceptual", "adversarial")}
    out: dict[str, torch.Tensor | float] = {}
    gan = cfg.train.phase == "gan"
    update_g = not gan or s.step >= cfg.train.d_init_steps
    world = _world_size()
    global_batch = global_batch or lr.shape[0] * world

    # Buffers (BatchNorm statistics) change in the forward passes; a skipped step restores them.
    buffers = [b for m in (s.g_module, s.d_module) if m is not None for b in m.buffers()]
    saved_buffers = [b.clone() for b in buffers]
    s.opt_g.zero_grad(set_to_none=True)
    if gan:
        s.opt_d.zero_grad(set_to_none=True)

    def record(key: str, value: torch.Tensor, share: float) -> None:  # this rank's mean over its N crops
        out[key] = out[key] + share * _scalar(value) if key in out else share * _scalar(value)

    chunks = list(zip(lr.tensor_split(micro_batches), hr.tensor_split(micro_batches),
                      hr_usm.tensor_split(micro_batches)))
    for i, (lr_i, hr_gt, hr_usm_i) in enumerate(chunks):
        target = {name: hr_usm_i if which == "usm" else hr_gt for name, which in targets.items()}
        # The micro-batch's part of the global batch's mean loss; × world because DDP averages
        # the ranks' gradients. 1.0 for one micro-batch per rank and equal ranks (no rounding).
        weight, share = lr_i.shape[0] * world / global_batch, lr_i.shape[0] / lr.shape[0]
        last = i == len(chunks) - 1

        # ---- generator: loss and gradients (its update waits for the finiteness check below)
        if not update_g:  # D warm-up (Real-ESRGAN's net_d_init_iters): G only produces fakes
            with torch.no_grad(), autocast:
                sr = s.g(lr_i)
        else:
            with _no_sync(s.g, last):
                with autocast:
                    sr = s.g(lr_i)
                    l_pix = cfg.loss.pixel.weight * pixel_loss(sr.float(), target["pixel"], cfg.loss.pixel.type)
                    loss_g = l_pix
                    record("loss_pix", l_pix, share)
                    if gan:
                        if s.perceptual_for_g is not None:
                            l_percep = cfg.loss.perceptual.weight * s.perceptual_for_g(sr, target["perceptual"])
                            loss_g = loss_g + l_percep
                            record("loss_percep", l_percep, share)
                        s.d_module.requires_grad_(False)
                        fake_g = s.d_for_g(sr)
                        real_g = (s.d_for_g(target["adversarial"]).detach() if cfg.loss.adversarial.type == "ragan"
                                  else None)
                        l_adv = cfg.loss.adversarial.weight * g_adv_loss(cfg.loss.adversarial.type, fake_g, real_g)
                        s.d_module.requires_grad_(True)
                        loss_g = loss_g + l_adv
                        record("loss_adv", l_adv, share)
                (weight * loss_g).backward()
            record("loss_g", loss_g, share)

        # ---- discriminator: loss and gradients. D sees sr.detach() and HR, neither of which G's
        # update changes, so computing this before G's update gives BasicSR's G-then-D step exactly.
        if gan:
            with _no_sync(s.d, last):
                with autocast:
                    real_d = s.d(target["adversarial"])
                    fake_d = s.d(sr.detach())
                    loss_d = d_adv_loss(cfg.loss.adversarial.type, real_d, fake_d)
                (weight * loss_d).backward()
            record("loss_d", loss_d, share)
            record("d_real", real_d.float().mean(), share)
            record("d_fake", fake_d.float().mean(), share)

    # ---- updates, all skipped when any loss or gradient is NaN/inf (on any rank), checked on the
    # gradients as backward left them: clipping would turn an overflowed ±inf into ±θ/γ and hide it
    skip = _nonfinite([(out["loss_g"], s.g_module) if update_g else None,
                       (out["loss_d"], s.d_module) if gan else None], device)
    if update_g and cfg.train.grad_clip > 0:  # VDSR: clip to θ/γ so the bound follows the learning rate
        torch.nn.utils.clip_grad_value_(s.g_module.parameters(), cfg.train.grad_clip / s.sched_g.get_last_lr()[0])
    with torch.no_grad():
        for b, old in zip(buffers, saved_buffers):
            b.copy_(torch.where(skip > 0, old, b))
    if update_g:
        _guarded_step(s.opt_g, skip)
        if s.ema is not None:
            s.ema.update(s.g_module, keep=skip)
    with warnings.catch_warnings():
        # During D warm-up G's schedule advances before G's first optimizer step, by design.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        s.sched_g.step()
    if gan:
        _guarded_step(s.opt_d, skip)
        s.sched_d.step()
    out["nonfinite_steps"] = skip

    s.step += 1
    run = s.nonfinite_run if s.nonfinite_run is not None else torch.zeros((), device=device)
    s.nonfinite_run = (run + skip) * skip
    first = s.diverged_at if s.diverged_at is not None else torch.full((), -1, dtype=torch.int64, device=device)
    s.diverged_at = torch.where((s.nonfinite_run >= cfg.train.max_nonfinite) & (first < 0), s.step, first)
    out["lr"] = s.opt_g.param_groups[0]["lr"]
    return out


def _world_size() -> int:
    """DDP ranks (1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _no_sync(module: nn.Module, last: bool):
    """DDP's ``no_sync`` for every micro-batch but the ``last``: gradients add up locally and are
    all-reduced once per step. Nothing for a module that is not DDP-wrapped."""
    if last or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def _nonfinite(parts, device: torch.device) -> torch.Tensor:
    """0-dim float32 on ``device``: 1.0 if any ``(loss, module)`` has a NaN/inf loss or gradient, on
    any DDP rank (an all-reduce, so every replica skips the same steps), else 0.0. No host read."""
    found = torch.zeros((), device=device)
    for part in parts:
        if part is None:
            continue
        loss, module = part
        found = torch.maximum(found, (~torch.isfinite(loss.detach().float())).float())
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads:  # GradScaler's own check: sets found to 1 on any non-finite gradient (scale 1: unchanged)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=device))
    if _world_size() > 1:
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return found


def _guarded_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip``: fused Adam takes the flag on the device (as under
    GradScaler: no update, its step counters kept); torch's other Adam needs one host read."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip
        optimizer.step()
    elif not skip.item():
        optimizer.step()


def _scalar(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 copy of a step scalar, off the autograd graph and still on its device."""
    return t.detach().float()
