"""SRResNet (Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a GAN", 2017).

Two variants share the residual trunk + sub-pixel upsampling plan:

* ``variant="msrresnet"`` is BasicSR's MSRResNet ("modified SRResNet"): no BN,
  conv-ReLU-conv residual blocks, LeakyReLU(0.1), and the bilinearly upsampled
  input added to the output. Parameter names equal BasicSR's, so its released
  ``MSRResNet`` checkpoints load as they are.
* ``variant="paper"`` is the network of the SRGAN paper: 9x9 first/last convs,
  PReLU, conv-BN-PReLU-conv-BN residual blocks, a post-residual conv + BN with a
  long skip, and conv -> pixel shuffle -> PReLU upsampling.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raysr.models.common import check_choice, check_image_batch, check_int, default_init_weights

VARIANTS = ("msrresnet", "paper")
SCALES = (2, 3, 4)


class ResidualBlockNoBN(nn.Module):
    """conv1 -> ReLU -> conv2, plus identity (EDSR / MSRResNet block, res_scale 1)."""

    def __init__(self, num_feat: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class ResidualBlockBN(nn.Module):
    """conv1 -> bn1 -> PReLU -> conv2 -> bn2, plus identity (SRGAN paper block)."""

    def __init__(self, num_feat: int):
        super().__init__()
        # BN's shift makes a conv bias redundant
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_feat)
        self.act = nn.PReLU(num_feat)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class SRResNet(nn.Module):
    """SRResNet, x2 / x3 / x4.

    Args:
        num_in_ch: channels of the LR input.
        num_out_ch: channels of the SR output (must equal ``num_in_ch`` for
            ``msrresnet``, which adds the upsampled input).
        num_feat: trunk channels (64).
        num_block: residual blocks in the trunk (16).
        scale: 2, 3 or 4. x4 = two pixel shuffles of 2; x2 / x3 = one shuffle.
        variant: ``"msrresnet"`` (BasicSR MSRResNet) or ``"paper"`` (SRGAN paper).

    Parameter names. Both: ``conv_first``, ``body.N.conv1``, ``body.N.conv2``,
    ``upconv1`` (num_feat -> num_feat*scale^2 for x2/x3, num_feat*4 for x4),
    ``upconv2`` (x4 only), ``conv_last``. ``msrresnet`` adds ``conv_hr``.
    ``paper`` adds ``act_first`` (PReLU), ``body.N.bn1``, ``body.N.act`` (PReLU),
    ``body.N.bn2``, ``conv_body`` + ``bn_body`` (post-residual conv + BN),
    ``upact1`` / ``upact2`` (PReLU after each shuffle). PReLUs are channel-wise.

    Init: Kaiming-normal x0.1 for every conv (BasicSR ``default_init_weights``).
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 16,
                 scale: int = 4, variant: str = "msrresnet"):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_out_ch", num_out_ch)
        check_int("num_feat", num_feat)
        check_int("num_block", num_block)
        check_choice("scale", scale, SCALES)
        check_choice("variant", variant, VARIANTS)
        if variant == "msrresnet" and num_out_ch != num_in_ch:
            raise ValueError(f"variant 'msrresnet' adds the upsampled input to its output, so num_out_ch "
                             f"({num_out_ch}) must equal num_in_ch ({num_in_ch}); use variant='paper' otherwise")
        self.scale = scale
        self.variant = variant
        self.num_in_ch = num_in_ch
        self.config = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat,
                           num_block=num_block, scale=scale, variant=variant)
        paper = variant == "paper"

        first_k = 9 if paper else 3
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, first_k, 1, first_k // 2)
        if paper:
            self.act_first = nn.PReLU(num_feat)
        block = ResidualBlockBN if paper else ResidualBlockNoBN
        self.body = nn.Sequential(*(block(num_feat) for _ in range(num_block)))
        if paper:
            self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False)
            self.bn_body = nn.BatchNorm2d(num_feat)

        # x4 = two x2 stages; x2 / x3 = one stage of that factor
        self.shuffle_factor = 2 if scale == 4 else scale
        num_up = 2 if scale == 4 else 1
        for i in range(1, num_up + 1):
            setattr(self, f"upconv{i}", nn.Conv2d(num_feat, num_feat * self.shuffle_factor ** 2, 3, 1, 1))
            if paper:
                setattr(self, f"upact{i}", nn.PReLU(num_feat))
        self.pixel_shuffle = nn.PixelShuffle(self.shuffle_factor)
        self.num_up = num_up

        if paper:
            self.conv_last = nn.Conv2d(num_feat, num_out_ch, 9, 1, 4)
        else:
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)

        default_init_weights(self, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, h, w) float in [0, 1] -> (N, num_out_ch, h*scale, w*scale), not clamped."""
        check_image_batch(x, self.num_in_ch, "SRResNet")
        paper = self.variant == "paper"
        if paper:
            feat = self.act_first(self.conv_first(x))
            feat = feat + self.bn_body(self.conv_body(self.body(feat)))
        else:
            feat = self.body(self.lrelu(self.conv_first(x)))

        for i in range(1, self.num_up + 1):
            feat = self.pixel_shuffle(getattr(self, f"upconv{i}")(feat))
            feat = getattr(self, f"upact{i}")(feat) if paper else self.lrelu(feat)

        if paper:
            return self.conv_last(feat)
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
