"""Losses of SRGAN and ESRGAN: pixel, VGG perceptual, and adversarial.

All functions return mean-reduced scalar tensors and apply no loss weight; the
training step multiplies by ``pixel_weight``, ``perceptual_weight`` and
``adv_weight`` so that each weight lives in one place.

References:
    SRGAN  — Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a
             Generative Adversarial Network", CVPR 2017.
    ESRGAN — Wang et al., "ESRGAN: Enhanced Super-Resolution Generative
             Adversarial Networks", ECCV Workshops 2018.
    LSGAN  — Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017.
    Hinge  — Lim & Ye, "Geometric GAN", 2017; Miyato et al., "Spectral Normalization
             for GANs", ICLR 2018.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raysr.models.vgg import VGG19_LAYERS, VGGFeatureExtractor

PIXEL_TYPES = ("l1", "mse", "charbonnier")
PERCEPTUAL_CRITERIA = ("l1", "l2")
ADV_TYPES = ("vanilla", "ragan", "lsgan", "hinge")


def _check_same_shape(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                         "crop or resize them to the same size")


def pixel_loss(pred: Tensor, target: Tensor, type: str = "l1", eps: float = 1e-12) -> Tensor:
    """Mean pixel loss between two same-shaped tensors, e.g. (N,3,H,W) float in [0,1].

    ``l1``: mean |pred − target| (ESRGAN's η-weighted term and its PSNR phase);
    ``mse``: mean (pred − target)² (SRResNet's MSE training);
    ``charbonnier``: mean sqrt((pred − target)² + eps), a differentiable L1 as in
    BasicSR's CharbonnierLoss (eps in squared-intensity units).
    """
    _check_same_shape(pred, target)
    if type == "l1":
        return F.l1_loss(pred, target)
    if type == "mse":
        return F.mse_loss(pred, target)
    if type == "charbonnier":
        return torch.sqrt((pred - target) ** 2 + eps).mean()
    raise ValueError(f"unknown pixel loss type {type!r}; allowed: {', '.join(PIXEL_TYPES)}")


class PerceptualLoss(nn.Module):
    """VGG19 feature loss  sum_l w_l · criterion(s·φ_l(sr), s·φ_l(hr)).

    Args:
        layers: {VGG19 layer: weight w_l}. A ``convX_Y`` key means the conv output
            when ``before_relu`` (ESRGAN: conv5_4 before ReLU) and the activation
            after its ReLU otherwise (SRGAN: φ5,4). ``reluX_Y`` keys name the
            after-ReLU activation explicitly and require ``before_relu=False``.
        before_relu: how ``convX_Y`` keys are read (see above).
        criterion: ``l1`` (ESRGAN) or ``l2`` (mean squared error; SRGAN), mean-reduced.
        feature_scale: s, applied to the features of both images; SRGAN rescales
            VGG features by 1/12.75, ESRGAN uses 1.
        weights, allow_random_weights: VGG19 weights, see :class:`VGGFeatureExtractor`.

    forward(sr, hr): (N,3,H,W) float in [0,1], H and W >= 2^(b−1) for the deepest
    block b used (16 for conv5_4) -> scalar. HR features are computed without grad.
    """

    def __init__(self, layers: Mapping[str, float] | None = None, before_relu: bool = True, criterion: str = "l1",
                 feature_scale: float = 1.0, weights: Mapping[str, Tensor] | str | os.PathLike | None = None,
                 allow_random_weights: bool = False):
        super().__init__()
        layers = {"conv5_4": 1.0} if layers is None else dict(layers)
        if not layers:
            raise ValueError("layers is empty; give at least one VGG19 layer, e.g. {'conv5_4': 1.0}")
        if not isinstance(before_relu, bool):
            raise ValueError(f"before_relu must be True (ESRGAN) or False (SRGAN), got {before_relu!r}")
        if criterion not in PERCEPTUAL_CRITERIA:
            raise ValueError(f"unknown perceptual criterion {criterion!r}; allowed: {', '.join(PERCEPTUAL_CRITERIA)}")
        if not feature_scale > 0:
            raise ValueError(f"feature_scale must be > 0 (SRGAN uses 1/12.75), got {feature_scale!r}")
        bad = {k: w for k, w in layers.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0}
        if bad:
            raise ValueError(f"perceptual layer weights must be numbers >= 0, got {bad}")
        self.layer_weights = {self._resolve_layer(key, before_relu): float(w) for key, w in layers.items()}
        if len(self.layer_weights) != len(layers):
            raise ValueError(f"layers {list(layers)} name the same VGG19 activation twice "
                             f"with before_relu={before_relu}; keep one")
        self.before_relu = before_relu
        self.criterion = criterion
        self.feature_scale = float(feature_scale)
        self.vgg = VGGFeatureExtractor(list(self.layer_weights), weights=weights,
                                       allow_random_weights=allow_random_weights)

    @staticmethod
    def _resolve_layer(key: str, before_relu: bool) -> str:
        conv_names = [n for n in VGG19_LAYERS if n.startswith("conv")]
        if key in conv_names:
            return key if before_relu else "relu" + key[len("conv"):]
        if key.startswith("relu") and key in VGG19_LAYERS:
            if before_relu:
                conv = "conv" + key[len("relu"):]
                raise ValueError(f"perceptual layer {key!r} is after the ReLU but before_relu=True; set "
                                 f"before_relu=False for after-ReLU features (SRGAN), or use {conv!r} with "
                                 "before_relu=True for the pre-activation (ESRGAN)")
            return key
        raise ValueError(f"unknown perceptual layer {key!r}; use a VGG19 conv name "
                         f"({', '.join(conv_names)}) or its relu counterpart")

    def forward(self, sr: Tensor, hr: Tensor) -> Tensor:
        _check_same_shape(sr, hr)
        sr_feats = self.vgg(sr)
        with torch.no_grad():
            hr_feats = self.vgg(hr)
        dist = F.l1_loss if self.criterion == "l1" else F.mse_loss
        s = self.feature_scale
        return sum(w * dist(s * sr_feats[name], s * hr_feats[name]) for name, w in self.layer_weights.items())


# Adversarial losses on raw discriminator logits C(x). With σ the sigmoid,
# −log σ(x) = softplus(−x) and −log(1 − σ(x)) = softplus(x): these are the
# numerically stable binary-cross-entropy-with-logits forms. Logit maps (e.g. a
# U-Net discriminator's (N,1,H,W)) are averaged over all elements.

def _check_adv_type(type: str) -> None:
    if type not in ADV_TYPES:
        raise ValueError(f"unknown adversarial loss type {type!r}; allowed: {', '.join(ADV_TYPES)}")


def _bce_real(logits: Tensor) -> Tensor:
    """−E[log σ(x)]: BCE against the label "real"."""
    return F.softplus(-logits).mean()


def _bce_fake(logits: Tensor) -> Tensor:
    """−E[log(1 − σ(x))]: BCE against the label "fake"."""
    return F.softplus(logits).mean()


def d_adv_loss(type: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss (scalar, weight not applied) from D's logits on HR (real) and SR (fake) images.

    ``fake_logits`` should come from the generator output detached, so the D step
    does not reach G. Any logit shape, e.g. (N,1) or (N,1,H,W); all elements averaged.

    - ``vanilla`` (SRGAN / Goodfellow): −E[log σ(C(x_r))] − E[log(1 − σ(C(x_f)))].
    - ``ragan`` (ESRGAN eq. 2): with D_Ra(a, b) = σ(C(a) − E[C(b)]),
      (−E[log D_Ra(x_r, x_f)] − E[log(1 − D_Ra(x_f, x_r))]) / 2. The /2 is the
      official ESRGAN/BasicSR code's averaging, which its λ = 5e-3 was tuned with.
      D's gradients flow through both expectations, as in the paper and the original
      ESRGAN (mmsr) code. Current BasicSR / Real-ESRGAN detach them instead: E[C(x_f)]
      in the real term and E[C(x_r)] in the fake term, a workaround for in-place
      BatchNorm errors under DDP (see their esrgan_model.py): the same loss value,
      but D there learns only through the per-sample logits, not through the means.
    - ``lsgan`` (Mao et al., a=0, b=c=1, without the paper's ½ factors, as BasicSR's
      MSE-to-target form): E[(C(x_r) − 1)²] + E[C(x_f)²].
    - ``hinge``: E[relu(1 − C(x_r))] + E[relu(1 + C(x_f))].
    """
    _check_adv_type(type)
    if type == "vanilla":
        return _bce_real(real_logits) + _bce_fake(fake_logits)
    if type == "ragan":
        return (_bce_real(real_logits - fake_logits.mean()) + _bce_fake(fake_logits - real_logits.mean())) / 2
    if type == "lsgan":
        return ((real_logits - 1) ** 2).mean() + (fake_logits ** 2).mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_adv_loss(type: str, fake_logits: Tensor, real_logits: Tensor | None = None) -> Tensor:
    """Generator adversarial loss (scalar, weight not applied) from D's logits on SR images.

    ``fake_logits`` must carry grad back to G. ``real_logits`` (D on HR images) is
    needed by ``ragan`` only and is detached here: the G step must not train D.

    - ``vanilla`` (SRGAN's non-saturating −log D): −E[log σ(C(x_f))].
    - ``ragan`` (ESRGAN eq. 3, averaged /2 as the official code; see d_adv_loss):
      (−E[log(1 − D_Ra(x_r, x_f))] − E[log D_Ra(x_f, x_r)]) / 2 — the D loss with
      the roles of real and fake swapped.
    - ``lsgan``: E[(C(x_f) − 1)²].
    - ``hinge``: −E[C(x_f)].
    """
    _check_adv_type(type)
    if type == "vanilla":
        return _bce_real(fake_logits)
    if type == "ragan":
        if real_logits is None:
            raise ValueError("the ragan generator loss needs real_logits (the discriminator's logits on HR images)")
        real_logits = real_logits.detach()
        return (_bce_fake(real_logits - fake_logits.mean()) + _bce_real(fake_logits - real_logits.mean())) / 2
    if type == "lsgan":
        return ((fake_logits - 1) ** 2).mean()
    return -fake_logits.mean()
