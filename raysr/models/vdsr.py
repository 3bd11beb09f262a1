"""VDSR (Kim et al., "Accurate Image Super-Resolution Using Very Deep Convolutional Networks", 2016).

``num_layer`` 3x3 convolutions (first + middle + last) with ReLU between them learn
the residual between the bicubic-upsampled LR image and the HR image; the global
skip adds the bicubic image back.
"""

from __future__ import annotations

import torch
from torch import nn

from raysr.models.common import check_image_batch, check_int
from raysr.ops.resize import imresize


# the factors it is trained for (it refines a bicubic upscale, so the weights fit any factor)
SCALES = (2, 3, 4)

class VDSR(nn.Module):
    """VDSR.

    Args:
        num_in_ch: channels of the LR input.
        num_out_ch: channels of the SR output; must equal ``num_in_ch`` because
            the bicubic input is added to the output.
        num_feat: channels of the hidden layers (64 in the paper).
        num_layer: total number of conv layers, >= 2 (20 in the paper).
        scale: integer upscaling factor of the internal MATLAB bicubic ``imresize``.

    Parameters: ``conv_first`` (in -> num_feat), ``body.0 .. body.{num_layer-3}``
    (num_feat -> num_feat), ``conv_last`` (num_feat -> out).
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64,
                 num_layer: int = 20, scale: int = 4):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_feat", num_feat)
        check_int("num_layer", num_layer, minimum=2)
        check_int("scale", scale)
        if num_out_ch != num_in_ch:
            raise ValueError(f"VDSR adds the bicubic input to its output, so num_out_ch ({num_out_ch!r}) "
                             f"must equal num_in_ch ({num_in_ch})")
        self.scale = scale
        self.num_in_ch = num_in_ch
        self.config = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat,
                           num_layer=num_layer, scale=scale)

        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.ModuleList(nn.Conv2d(num_feat, num_feat, 3, 1, 1) for _ in range(num_layer - 2))
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        # He et al. init for ReLU networks, as in the paper; zero biases
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) float in [0, 1] -> (N, C, h*scale, w*scale) = bicubic + residual, not clamped."""
        check_image_batch(x, self.num_in_ch, "VDSR")
        base = imresize(x, self.scale)
        feat = self.relu(self.conv_first(base))
        for conv in self.body:
            feat = self.relu(conv(feat))
        return base + self.conv_last(feat)
