"""SRVGGNetCompact, Real-ESRGAN's small generator (Wang et al., "Real-ESRGAN", ICCVW 2021, and
the ``realesr-general-x4v3`` / ``realesr-animevideov3`` releases).

A plain VGG-style stack that works entirely at LR resolution and upsamples once at the end:
conv 3x3 (num_in_ch -> num_feat) -> act, ``num_conv`` x (conv 3x3 -> act), conv 3x3 to
``num_out_ch * scale**2`` channels, pixel shuffle, plus the nearest-upsampled input (so the
network learns the residual). ``realesr-general-x4v3``: num_feat 64, num_conv 32;
``realesr-animevideov3``: num_feat 64, num_conv 16; both PReLU.

Parameter names equal BasicSR's / Real-ESRGAN's: one ``body`` list whose entries are the convs
and the activations in order (``body.0`` conv, ``body.1`` act, ..., ``body.{2*num_conv+2}`` the
last conv), so a channel-wise PReLU's weight is ``body.{odd}.weight``. Their released Compact
weights load strict, and raysr's files load in their code and in spandrel.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raysr.models.common import check_choice, check_image_batch, check_int

SCALES = (1, 2, 3, 4)
ACT_TYPES = ("prelu", "relu", "leakyrelu")
LEAKY_SLOPE = 0.1  # Real-ESRGAN's leakyrelu choice


def _activation(act_type: str, num_feat: int) -> nn.Module:
    if act_type == "prelu":
        return nn.PReLU(num_parameters=num_feat)  # one slope per channel, initialised 0.25
    if act_type == "leakyrelu":
        return nn.LeakyReLU(negative_slope=LEAKY_SLOPE, inplace=True)
    return nn.ReLU(inplace=True)


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's Compact generator, x1 / x2 / x3 / x4.

    Args:
        num_in_ch: channels of the LR input.
        num_out_ch: channels of the SR output; must equal ``num_in_ch`` (the upsampled input is added).
        num_feat: channels of every hidden conv (64).
        num_conv: hidden 3x3 convs after the first (32: realesr-general-x4v3; 16: animevideov3).
        scale: upscaling factor, done by one pixel shuffle at the end.
        act_type: ``prelu`` (channel-wise, Real-ESRGAN's releases), ``relu`` or ``leakyrelu`` (slope 0.1).

    Parameters: ``body.{2i}.weight/bias`` the convs (i = 0 .. num_conv + 1) and, with PReLU,
    ``body.{2i+1}.weight`` (num_feat slopes). Init: PyTorch's defaults, as Real-ESRGAN.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 32,
                 scale: int = 4, act_type: str = "prelu"):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_out_ch", num_out_ch)
        check_int("num_feat", num_feat)
        check_int("num_conv", num_conv)
        check_choice("scale", scale, SCALES)
        check_choice("act_type", act_type, ACT_TYPES)
        if num_out_ch != num_in_ch:
            raise ValueError(f"SRVGGNetCompact adds the upsampled input to its output, so num_out_ch ({num_out_ch}) "
                             f"must equal num_in_ch ({num_in_ch})")
        self.scale = scale
        self.num_in_ch = num_in_ch
        self.config = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_conv=num_conv,
                           scale=scale, act_type=act_type)

        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), _activation(act_type, num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), _activation(act_type, num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * scale * scale, 3, 1, 1))
        # a ModuleList, not a Sequential: the keys are body.N either way, and BasicSR's is a list
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, h, w) float in [0, 1] -> (N, num_out_ch, h*scale, w*scale), not clamped."""
        check_image_batch(x, self.num_in_ch, "SRVGGNetCompact")
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")
