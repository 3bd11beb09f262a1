"""RRDBNet, the ESRGAN generator (Wang et al., "ESRGAN: Enhanced Super-Resolution GANs", 2018).

Structure and parameter names equal BasicSR's ``RRDBNet``, so BasicSR and
Real-ESRGAN checkpoints load as they are (``raysr.generator_file`` also renames the
two older ESRGAN-repo layouts). x2 and x1 follow Real-ESRGAN: the input is
pixel-unshuffled (x2 -> 4x channels, x1 -> 16x) and then goes through the x4 net.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raysr.models.common import check_choice, check_image_batch, check_int, default_init_weights

SCALES = (1, 2, 4)
# pixel-unshuffle factor applied to the input so the x4 trunk yields the target scale
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; conv5's output scaled by 0.2 plus identity."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        default_init_weights([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        # residual scaling 0.2 (ESRGAN sec. 3.2) keeps the very deep trunk stable
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, outer residual scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator.

    Args:
        num_in_ch: channels of the LR input.
        num_out_ch: channels of the SR output.
        num_feat: trunk channels (64).
        num_block: RRDBs in the trunk (23).
        num_grow_ch: growth channels of each dense conv (32).
        scale: 4, 2 or 1. For 2 / 1 the input is pixel-unshuffled by 2 / 4, so
            ``conv_first`` takes ``num_in_ch * 4`` / ``num_in_ch * 16`` channels
            and the input's H and W must be divisible by 2 / 4.

    Parameters: ``conv_first``, ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``,
    ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``. Init as BasicSR: the
    dense convs Kaiming-normal x0.1, the rest PyTorch's default.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 23,
                 num_grow_ch: int = 32, scale: int = 4):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_out_ch", num_out_ch)
        check_int("num_feat", num_feat)
        check_int("num_block", num_block)
        check_int("num_grow_ch", num_grow_ch)
        check_choice("scale", scale, SCALES)
        self.scale = scale
        self.num_in_ch = num_in_ch
        self.unshuffle = _UNSHUFFLE[scale]
        self.config = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat,
                           num_block=num_block, num_grow_ch=num_grow_ch, scale=scale)

        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle ** 2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, h, w) float in [0, 1] -> (N, num_out_ch, h*scale, w*scale), not clamped."""
        check_image_batch(x, self.num_in_ch, "RRDBNet")
        if self.unshuffle > 1:
            h, w = x.shape[-2:]
            if h % self.unshuffle or w % self.unshuffle:
                raise ValueError(f"RRDBNet x{self.scale} pixel-unshuffles its input by {self.unshuffle}, so H and W "
                                 f"must be divisible by {self.unshuffle}; got {h}x{w} (pad or crop the input)")
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        # two x2 stages: nearest-neighbour upsampling then conv, which avoids
        # the checkerboard artefacts of transposed convs
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))
