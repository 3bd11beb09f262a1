"""The device side of ``data.degradation: realesrgan``: Real-ESRGAN's second-order degradation of a batch.

:class:`Degrader` turns the loader's batch — GT regions ``(N,3,S,S)`` and each sample's three
kernels ``(N,3,21,21)`` (:mod:`raysr.degradation.regions`) — into ``(lr, hr)`` training pairs, as
``RealESRGANModel.feed_data`` does (Wang et al., ICCVW 2021, Fig. 2), under ``torch.no_grad``:

1. ``usm`` = unsharp-masked GT (:func:`usm_sharp`); the chain starts from it.
2. first stage: blur with kernel 1 → random resize (up/down/keep with ``resize_prob``, scale from
   ``resize_range``; area, bilinear or bicubic) → Gaussian (σ/255 from ``noise_range``) or Poisson
   (``poisson_scale_range``) noise, gray with ``gray_noise_prob``, clamp → JPEG, quality from ``jpeg_range``.
3. second stage: blur with kernel 2 (the pulse for the samples the loader drew without a second
   blur) → resize to ``S/scale × s`` → noise (the ``…2`` keys); then either [resize to ``S/scale`` +
   final sinc] → JPEG, or JPEG → [resize + sinc], 50/50.
4. ``lr = round(clamp(out) · 255) / 255``; a random ``gt_size`` crop of GT and the matching
   ``gt_size/scale`` crop of LR.

Drawn per sample (the anchors draw some of these once per batch): kernels (loader), whether the
second blur happens (loader), the resize modes, noise type, σ / Poisson scale, gray or colour,
JPEG qualities, the order of the final steps and the crop position. Drawn per batch, because the
batch must keep one spatial size: the two resize scales (up/down/keep and s). The training-pair pool
(:mod:`raysr.degradation.pool`) then mixes pairs across batches.

Host-side draws come from a numpy Generator, noise fields from a torch Generator on the device,
both seeded by ``seed``: the same seed and inputs give the same pairs. The JPEG step is a parameter,
``jpeg(images (N,3,H,W) float [0,1], quality (N,) tensor) -> (N,3,H,W)``; the default is
:func:`raysr.ops.jpeg.jpeg`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from raysr.ops.jpeg import jpeg as jpeg_codec

RESIZE_MODES = ("area", "bilinear", "bicubic")
UPDOWN = ("up", "down", "keep")
# Real-ESRGAN's unsharp mask (BasicSR USMSharp): Gaussian blur of radius 50 -> a 51-px kernel with
# OpenCV's default sigma for that size, 0.3·((51−1)/2 − 1) + 0.8 = 8; weight 0.5, threshold 10/255
USM_SIZE, USM_SIGMA, USM_WEIGHT, USM_THRESHOLD = 51, 8.0, 0.5, 10.0 / 255.0

Jpeg = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- the operations


def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image convolved (correlated, as OpenCV's filter2D) with its own kernel, reflect padding.

    images: ``(N,C,H,W)``; kernels: ``(N,k,k)`` (one per image) or ``(k,k)`` (one for all), k odd,
    H and W > k // 2. Returns ``(N,C,H,W)``.
    """
    n, c, h, w = images.shape
    k = kernels.shape[-1]
    padded = F.pad(images, (k // 2,) * 4, mode="reflect")
    if kernels.ndim == 2:
        weight = kernels.to(images).expand(c, 1, k, k)
        return F.conv2d(padded, weight, groups=c)
    weight = kernels.to(images).unsqueeze(1).repeat_interleave(c, dim=0)  # (N·C, 1, k, k), image-major
    return F.conv2d(padded.reshape(1, n * c, h + k - 1, w + k - 1), weight, groups=n * c).view(n, c, h, w)


def _usm_kernel_1d(device, dtype) -> torch.Tensor:
    x = torch.arange(USM_SIZE, dtype=torch.float64) - USM_SIZE // 2
    g = torch.exp(-x ** 2 / (2 * USM_SIGMA ** 2))
    return (g / g.sum()).to(device, dtype)


def _usm_blur(images: torch.Tensor) -> torch.Tensor:
    # the 51x51 Gaussian is separable, and so is reflect padding: two 1-D passes give the same image
    c = images.shape[1]
    g = _usm_kernel_1d(images.device, images.dtype)
    pad = USM_SIZE // 2
    out = F.conv2d(F.pad(images, (0, 0, pad, pad), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def usm_sharp(images: torch.Tensor) -> torch.Tensor:
    """Real-ESRGAN's unsharp mask of ``(N,3,H,W)`` float in [0,1] (H, W > 25): with B the Gaussian blur
    (51 px, σ = 8), ``sharp = clamp(I + 0.5 (I − B), 0, 1)``, mask = blur(|I − B| > 10/255);
    returns ``mask · sharp + (1 − mask) · I``."""
    residual = images - _usm_blur(images)
    mask = _usm_blur((residual.abs() > USM_THRESHOLD).to(images.dtype))
    sharp = (images + USM_WEIGHT * residual).clamp(0, 1)
    return mask * sharp + (1 - mask) * images


def resize(images: torch.Tensor, modes: list[str], *, size: tuple[int, int] | None = None,
           scale: float | None = None) -> torch.Tensor:
    """``images[i]`` resized with ``modes[i]`` (area, bilinear or bicubic; torch's
    ``F.interpolate``, ``align_corners=False``) to ``size`` or by ``scale_factor=scale``; one call per mode."""
    groups = {mode: [i for i, m in enumerate(modes) if m == mode] for mode in dict.fromkeys(modes)}
    if len(groups) == 1:
        return F.interpolate(images, size=size, scale_factor=scale, mode=modes[0])
    parts = {mode: F.interpolate(images[idx], size=size, scale_factor=scale, mode=mode)
             for mode, idx in groups.items()}
    first = next(iter(parts.values()))
    out = first.new_empty((images.shape[0], *first.shape[1:]))
    for mode, idx in groups.items():
        out[idx] = parts[mode]
    return out


def _gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (torchvision's rgb_to_grayscale), ``(N,1,H,W)``."""
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def gaussian_noise(images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian noise ``(N,3,H,W)``: σ ``sigma[i]`` (in [0,1] units), the same field on all
    three channels where ``gray[i]`` (bool), independent per channel elsewhere."""
    n, c, h, w = images.shape
    colour = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    mono = torch.randn((n, 1, h, w), generator=generator, device=images.device, dtype=images.dtype)
    return torch.where(gray.view(n, 1, 1, 1), mono.expand(n, c, h, w), colour) * sigma.view(n, 1, 1, 1)


def _levels(images: torch.Tensor) -> torch.Tensor:
    """Per image, 2^ceil(log2(number of distinct 8-bit values)), as BasicSR's Poisson noise counts them."""
    n = images.shape[0]
    codes = images.reshape(n, -1).long()
    seen = torch.zeros((n, 256), device=images.device).scatter_(1, codes, 1.0)
    return torch.exp2(torch.ceil(torch.log2(seen.sum(1))))


def poisson_noise(images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Shot noise ``(N,3,H,W)`` as BasicSR's ``generate_poisson_noise_pt``: with x the image on 8-bit levels
    and L its count of distinct levels rounded up to a power of 2, ``noise = scale · (Poisson(x·L)/L − x)``;
    where ``gray[i]`` the same for the image's luma (ITU-R 601, on 8-bit levels), on all three channels."""
    n, c, h, w = images.shape
    x = (images * 255).round().clamp(0, 255)
    levels = _levels(x).view(n, 1, 1, 1)
    x = x / 255
    colour = torch.poisson(x * levels, generator=generator) / levels - x
    # the luma field is drawn for every image (a third of the work) rather than asking the device
    # whether any image wants it, which would wait for it
    y = (_gray(images) * 255).round().clamp(0, 255)
    y_levels = _levels(y).view(n, 1, 1, 1)
    y = y / 255
    mono = torch.poisson(y * y_levels, generator=generator) / y_levels - y
    return torch.where(gray.view(n, 1, 1, 1), mono.expand(n, c, h, w), colour) * scale.view(n, 1, 1, 1)


def paired_crop(lr: torch.Tensor, hr: torch.Tensor, tops: list[int], lefts: list[int], lr_size: int,
                scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the ``lr_size`` LR crop at ``(tops[i], lefts[i])`` and the HR crop that covers it:
    ``lr_size · scale`` px at ``(tops[i] · scale, lefts[i] · scale)``."""
    hr_size = lr_size * scale
    lr_out = torch.stack([x[:, t:t + lr_size, l:l + lr_size] for x, t, l in zip(lr, tops, lefts)])
    hr_out = torch.stack([x[:, t * scale:t * scale + hr_size, l * scale:l * scale + hr_size]
                          for x, t, l in zip(hr, tops, lefts)])
    return lr_out, hr_out


# --------------------------------------------------------------------------- the chain


class Degrader:
    """Real-ESRGAN's degradation of whole batches on one device (see the module docstring).

    opts: a ``raysr.config.DegradationConfig``; scale: the SR factor; gt_size: the HR crop the step
    trains on; seed: seeds the host draws and the device noise; jpeg: the JPEG function (default
    :func:`raysr.ops.jpeg.jpeg`).
    """

    def __init__(self, opts, scale: int, gt_size: int, device: torch.device, seed: int = 0,
                 jpeg: Jpeg | None = None):
        self.opts, self.scale, self.gt_size, self.device = opts, scale, gt_size, torch.device(device)
        self.jpeg = jpeg if jpeg is not None else jpeg_codec
        self.rng = np.random.default_rng([seed, 21])
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(np.random.default_rng([seed, 22]).integers(2 ** 62)))

    def _uniform(self, bounds, n: int) -> np.ndarray:
        return self.rng.uniform(bounds[0], bounds[1], size=n)

    def _resize_scale(self, probs, bounds) -> tuple[str, float]:
        updown = UPDOWN[int(self.rng.choice(3, p=np.asarray(probs) / np.sum(probs)))]
        if updown == "up":
            return updown, float(self.rng.uniform(1.0, bounds[1]))
        if updown == "down":
            return updown, float(self.rng.uniform(bounds[0], 1.0))
        return updown, 1.0

    def _modes(self, n: int) -> list[str]:
        return [RESIZE_MODES[i] for i in self.rng.integers(len(RESIZE_MODES), size=n)]

    def _noise(self, images: torch.Tensor, gaussian_prob: float, sigma_range, poisson_range, gray_prob: float,
               record: list[dict], stage: str) -> torch.Tensor:
        n = images.shape[0]
        gaussian = self.rng.uniform(size=n) < gaussian_prob
        gray = self.rng.uniform(size=n) < gray_prob
        sigma = self._uniform(sigma_range, n)
        poisson_scale = self._uniform(poisson_range, n)
        out = images.clone()
        gray_t = torch.from_numpy(gray).to(self.device)
        for wanted, add in ((True, self._gaussian), (False, self._poisson)):
            idx = np.flatnonzero(gaussian == wanted)
            if len(idx):
                strength = torch.from_numpy((sigma / 255.0 if wanted else poisson_scale)[idx]).to(images)
                index = torch.from_numpy(idx).to(self.device)
                out[index] = (images[index] + add(images[index], strength, gray_t[index])).clamp(0, 1)
        for i, r in enumerate(record):
            r[stage] = ({"type": "gaussian", "sigma": float(sigma[i])} if gaussian[i]
                        else {"type": "poisson", "scale": float(poisson_scale[i])})
            r[stage]["gray"] = bool(gray[i])
        return out

    def _gaussian(self, images, sigma, gray):
        return gaussian_noise(images, sigma, gray, self.generator)

    def _poisson(self, images, scale, gray):
        return poisson_noise(images, scale, gray, self.generator)

    def _jpeg(self, images: torch.Tensor, quality_range, record: list[dict], key: str) -> torch.Tensor:
        quality = self._uniform(quality_range, images.shape[0])
        for r, q in zip(record, quality):
            r[key] = float(q)
        return self.jpeg(images.clamp(0, 1), torch.from_numpy(quality).to(self.device, torch.float32))

    @torch.no_grad()
    def __call__(self, kernels: torch.Tensor, hr: torch.Tensor,
                 params: list[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lr (N,3,g/scale,g/scale), hr (N,3,g,g))`` float in [0,1] on the device, lr on 8-bit
        levels, ``g = gt_size``, from the GT regions ``hr`` ``(N,3,S,S)`` and their kernels
        ``(N,3,21,21)``. ``params``: per-sample dicts the drawn parameters are added to (None: not kept)."""
        o, n, size = self.opts, hr.shape[0], hr.shape[-1]
        if hr.shape[-2] != size or size % self.scale or size // self.scale < self.gt_size // self.scale:
            raise ValueError(f"GT regions must be square, a multiple of scale {self.scale} and at least "
                             f"gt_size {self.gt_size}; got {tuple(hr.shape)}")
        record = params if params is not None else [{} for _ in range(n)]
        hr = hr.to(self.device, torch.float32, non_blocking=True)
        kernels = kernels.to(self.device, torch.float32, non_blocking=True)
        out = filter2d(usm_sharp(hr), kernels[:, 0])

        # ---- first stage
        updown, s1 = self._resize_scale(o.resize_prob, o.resize_range)
        modes = self._modes(n)
        out = resize(out, modes, scale=s1)
        out = self._noise(out, o.gaussian_noise_prob, o.noise_range, o.poisson_scale_range, o.gray_noise_prob,
                          record, "noise1")
        out = self._jpeg(out, o.jpeg_range, record, "jpeg1")
        for r, m in zip(record, modes):
            r["resize1"] = {"updown": updown, "scale": s1, "mode": m}

        # ---- second stage
        out = filter2d(out, kernels[:, 1])
        updown, s2 = self._resize_scale(o.resize_prob2, o.resize_range2)
        modes = self._modes(n)
        lr_side = size // self.scale
        out = resize(out, modes, size=(int(lr_side * s2), int(lr_side * s2)))
        out = self._noise(out, o.gaussian_noise_prob2, o.noise_range2, o.poisson_scale_range2, o.gray_noise_prob2,
                          record, "noise2")
        for r, m in zip(record, modes):
            r["resize2"] = {"updown": updown, "scale": s2, "mode": m}

        # ---- final: [resize back + sinc] and JPEG, in a random order per sample
        sinc_first = self.rng.uniform(size=n) < 0.5
        modes = self._modes(n)
        lr = out.new_empty((n, 3, lr_side, lr_side))
        for first in (True, False):
            idx = np.flatnonzero(sinc_first == first)
            if not len(idx):
                continue
            part = out[torch.from_numpy(idx).to(self.device)]
            sub = [record[i] for i in idx]
            part_modes = [modes[i] for i in idx]
            sinc = kernels[torch.from_numpy(idx).to(self.device), 2]
            if first:
                part = filter2d(resize(part, part_modes, size=(lr_side, lr_side)), sinc)
                part = self._jpeg(part, o.jpeg_range2, sub, "jpeg2")
            else:
                part = self._jpeg(part, o.jpeg_range2, sub, "jpeg2")
                part = filter2d(resize(part, part_modes, size=(lr_side, lr_side)), sinc)
            lr[torch.from_numpy(idx).to(self.device)] = part
        for r, m, first in zip(record, modes, sinc_first):
            r["final"] = {"order": "resize+sinc, jpeg" if first else "jpeg, resize+sinc", "mode": m}
        lr = (lr.clamp(0, 1) * 255).round() / 255

        # ---- the paired random crop
        lr_size = self.gt_size // self.scale
        tops = [int(t) for t in self.rng.integers(lr_side - lr_size + 1, size=n)]
        lefts = [int(t) for t in self.rng.integers(lr_side - lr_size + 1, size=n)]
        for r, t, l in zip(record, tops, lefts):
            r["crop"] = {"top": t * self.scale, "left": l * self.scale}
        return paired_crop(lr, hr, tops, lefts, lr_size, self.scale)


class TrainingPairs:
    """What a training rank does to each loader batch under ``data.degradation: realesrgan``:
    :class:`Degrader`, then the pair pool (:class:`raysr.degradation.pool.PairPool`, ``pool_size``),
    then the USM-sharpened GT of the pairs that come out (Real-ESRGAN recomputes it after the pool).

    Calling it with ``(kernels, hr)`` returns ``(lr, hr, hr_usm)`` on the device.
    """

    def __init__(self, opts, scale: int, gt_size: int, device: torch.device, seed: int = 0,
                 jpeg: Jpeg | None = None):
        from raysr.degradation.pool import PairPool
        self.degrader = Degrader(opts, scale, gt_size, device, seed, jpeg)
        self.pool = PairPool(opts.pool_size, np.random.default_rng([seed, 23]))

    @torch.no_grad()
    def __call__(self, kernels: torch.Tensor, hr: torch.Tensor, *extra: torch.Tensor,
                 params: list[dict] | None = None) -> tuple[torch.Tensor, ...]:
        """``(lr, hr, hr_usm, *extra)``; ``extra``: per-sample tensors that travel through the pool with
        their pair (e.g. sample ids); ``params`` as :meth:`Degrader.__call__`."""
        # The first resize gives every batch a new size: cuDNN's benchmark mode (run.cudnn_benchmark) would
        # time its algorithms again for each one, so the chain runs without it.
        benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
        try:
            lr, hr = self.degrader(kernels, hr, params)
            lr, hr, *extra = self.pool.exchange(lr, hr, *(t.to(lr.device) for t in extra))
            return (lr, hr, usm_sharp(hr), *extra)
        finally:
            torch.backends.cudnn.benchmark = benchmark

    def state_dict(self) -> dict:
        """The draws' positions (host and device generators) and the pool: what a resumed run restores
        (:meth:`load_state_dict`) to degrade and mix the next batches as the uninterrupted run would."""
        return {"rng": self.degrader.rng.bit_generator.state, "generator": self.degrader.generator.get_state(),
                "pool": self.pool.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        self.degrader.rng.bit_generator.state = saved["rng"]
        self.degrader.generator.set_state(saved["generator"])
        self.pool.load_state_dict(saved["pool"], self.degrader.device)


def training_pairs(cfg, device: torch.device, rank: int, step: int, saved: dict | None = None) -> TrainingPairs | None:
    """The device side for a ``raysr.config.Config`` on one rank (None unless ``data.degradation`` is
    realesrgan): continuing from ``saved`` (its :meth:`TrainingPairs.state_dict` in a checkpoint), else
    seeded by ``run.seed``, the rank and the step a (fresh or resized) run starts from."""
    if cfg.realesrgan is None:
        return None
    pairs = TrainingPairs(cfg.realesrgan, cfg.scale, cfg.data.gt_size, device, seed=cfg.run.seed + 1000 * rank + step)
    if saved is not None:
        pairs.load_state_dict(saved)
    return pairs
