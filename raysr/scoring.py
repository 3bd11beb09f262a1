"""How raysr scores a generator: the SR literature's protocol, in one place.

Training's validation (:func:`score_generator`, :func:`bicubic_baseline`), ``raysr.evaluate`` and,
through the metrics a run reports, ``raysr.tune``'s tables all score with these functions,
so a run's validation PSNR is what ``raysr.evaluate`` reports for its generator on the
same images:

1. GT is cropped to a multiple of the scale ("GTmod", done by the callers' loaders);
2. LR = MATLAB ``imresize(GT, 1/scale, 'bicubic')`` rounded to uint8 (:func:`bicubic_lr`), or the
   given LR image of a real pair (``raysr.evaluate --lr``, training's ``data.val_lr``);
3. SR = generator(LR) through :func:`raysr.inference.upscale_tensor` (padded to the sizes
   the network takes: RRDBNet x2/x1 need even / multiple-of-4 LR sides), rounded to uint8;
4. PSNR / SSIM (:mod:`raysr.metrics`) on BT.601 Y (and RGB), ``scale`` px ignored at every
   edge; LPIPS on the whole uint8 RGB image when it can run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from raysr.inference import upscale_tensor
from raysr.metrics import psnr, ssim
from raysr.ops.convert import to_tensor, to_uint8
from raysr.ops.resize import imresize

METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb")


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) uint8 GTmod -> (H/scale, W/scale, 3) uint8: MATLAB bicubic, rounded."""
    return to_uint8(imresize(to_tensor([hr]).double(), 1.0 / scale))


def bicubic_sr(lr: np.ndarray, scale: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (h*scale, w*scale, 3) uint8: the bicubic baseline."""
    return to_uint8(imresize(to_tensor([lr]).double(), scale))


def super_resolve(model: nn.Module, lr: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """``model`` on one (h, w, 3) uint8 LR image (fp32, whole image, on the model's device):
    ``(SR uint8 (H, W, 3), SR float (1, 3, H, W) in [0, 1] on the model's device)``."""
    device = next(model.parameters()).device
    sr = upscale_tensor(model, to_tensor([lr]).to(device))
    return to_uint8(sr), sr


def score(sr: np.ndarray, hr: np.ndarray, scale: int, lpips_fn=None, rgb: bool = True) -> dict[str, float | None]:
    """PSNR/SSIM on Y (and RGB unless ``rgb=False``), crop_border = scale, plus LPIPS
    (None without ``lpips_fn``) of two uint8 (H, W, 3) images."""
    out = {"psnr_y": psnr(sr, hr, crop_border=scale, y_channel=True),
           "ssim_y": ssim(sr, hr, crop_border=scale, y_channel=True)}
    if rgb:
        out.update(psnr_rgb=psnr(sr, hr, crop_border=scale, y_channel=False),
                   ssim_rgb=ssim(sr, hr, crop_border=scale, y_channel=False))
    out = {k: float(v) for k, v in out.items()}
    out["lpips"] = float(lpips_fn(to_tensor([sr]), to_tensor([hr]))[0]) if lpips_fn else None
    return out


def mean_scores(rows: Sequence[dict], keys: Sequence[str] = METRICS + ("lpips",)) -> dict[str, float | None]:
    """Mean of each metric over images (the number papers report); None where missing."""
    return {k: (float(np.mean([r[k] for r in rows])) if rows and rows[0].get(k) is not None else None)
            for k in keys}


# --------------------------------------------------------------------------- training's validation


def validation_images(val_set) -> list[np.ndarray]:
    """The GTmod HR images of a :class:`raysr.validation.pairs.ValidationSet` as uint8 (H, W, 3) (exact:
    the set keeps uint8 and divides by 255)."""
    return [to_uint8(val_set[i][2]) for i in range(len(val_set))]


def validation_lr_images(val_set) -> list[np.ndarray] | None:
    """The given LR images of a paired :class:`raysr.validation.pairs.ValidationSet` (``data.val_lr``) as
    uint8 (h, w, 3), exact as :func:`validation_images`; None when its LR is made by bicubic."""
    return [to_uint8(val_set[i][1]) for i in range(len(val_set))] if val_set.paired else None


def _lr_of(images: Sequence[np.ndarray], lr_images: Sequence[np.ndarray] | None, scale: int):
    """Each GTmod image's LR: the given one, else :func:`bicubic_lr` (made as needed)."""
    if lr_images is not None and len(lr_images) != len(images):
        raise ValueError(f"{len(lr_images)} LR images for {len(images)} HR images")
    for i, hr in enumerate(images):
        yield bicubic_lr(hr, scale) if lr_images is None else lr_images[i]


def bicubic_baseline(images: Sequence[np.ndarray], scale: int,
                     lr_images: Sequence[np.ndarray] | None = None) -> dict:
    """``psnr_bicubic`` / ``ssim_bicubic`` (Y) over GTmod uint8 images, bicubic-upscaling their LR
    (``lr_images`` when given, else :func:`bicubic_lr`): fixed for a run, so computed once."""
    rows = [score(bicubic_sr(lr, scale), hr, scale, rgb=False)
            for hr, lr in zip(images, _lr_of(images, lr_images, scale))]
    mean = mean_scores(rows, ("psnr_y", "ssim_y"))
    return {"psnr_bicubic": mean["psnr_y"], "ssim_bicubic": mean["ssim_y"]}


def score_generator(g: nn.Module, images: Sequence[np.ndarray], scale: int, perceptual=None,
                    lpips_fn=None, lr_images: Sequence[np.ndarray] | None = None) -> tuple[dict, bytes | None]:
    """Validation metrics of ``g`` over GTmod uint8 images (one at a time, on ``g``'s device),
    plus a comparison PNG.

    ``lr_images``: each image's LR as uint8 (H/scale, W/scale, 3) (a paired validation set); None
    makes it with :func:`bicubic_lr`. ``psnr`` / ``ssim``: Y channel as :func:`score`;
    ``perceptual``: the configured VGG perceptual loss between SR and HR (float, before
    quantisation), when one is given; ``lpips`` with ``lpips_fn``. The PNG shows the first
    image's centre (at most 256 px of HR) as bicubic | SR | HR.
    """
    was_training = g.training
    g.eval()
    rows, comparison = [], None
    with torch.no_grad():
        for i, (hr, lr) in enumerate(zip(images, _lr_of(images, lr_images, scale))):
            sr, sr_float = super_resolve(g, lr)
            s = score(sr, hr, scale, lpips_fn, rgb=False)
            row = {"psnr": s["psnr_y"], "ssim": s["ssim_y"]}
            if lpips_fn is not None:
                row["lpips"] = s["lpips"]
            if perceptual is not None:
                row["perceptual"] = perceptual(sr_float, to_tensor([hr]).to(sr_float.device)).item()
            rows.append(row)
            if i == 0:
                comparison = comparison_png(bicubic_sr(lr, scale), sr, hr)
    g.train(was_training)
    return mean_scores(rows, list(rows[0])), comparison


def comparison_png(bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray, size: int = 256) -> bytes:
    """PNG bytes of the centre ``size``² of three (H, W, 3) uint8 images side by side."""
    from PIL import Image

    height, width = hr.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    row = np.concatenate([im[top:top + size, left:left + size] for im in (bicubic, sr, hr)], axis=1)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return buf.getvalue()
