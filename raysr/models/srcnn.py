"""SRCNN (Dong et al., "Image Super-Resolution Using Deep Convolutional Networks", 2014/2016).

Three convolutions (patch extraction 9x9 -> non-linear mapping 1x1 -> reconstruction
5x5) applied to the bicubic-upsampled LR image. The paper trains on valid
convolutions and a smaller target; here 'same' zero padding keeps the output at the
HR size so SRCNN drops into the same (LR -> HR) pipeline as every other generator.
"""

from __future__ import annotations

import torch
from torch import nn

from raysr.models.common import check_image_batch, check_int
from raysr.ops.resize import imresize


# the factors it is trained for (it refines a bicubic upscale, so the weights fit any factor)
SCALES = (2, 3, 4)

class SRCNN(nn.Module):
    """SRCNN 9-1-5.

    Args:
        num_in_ch: channels of the LR input (3 for RGB).
        num_out_ch: channels of the SR output.
        num_feat: output channels of the first two convolutions (n1, n2 in the
            paper; 64, 32).
        kernel_sizes: kernel sizes of the three convolutions (f1, f2, f3; 9, 1, 5),
            odd so that 'same' padding is symmetric.
        scale: integer upscaling factor; the input is first upsampled with MATLAB
            bicubic ``imresize`` by this factor.

    Parameters are named ``conv1``, ``conv2``, ``conv3`` as in the paper.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: tuple[int, int] = (64, 32),
                 kernel_sizes: tuple[int, int, int] = (9, 1, 5), scale: int = 4):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_out_ch", num_out_ch)
        check_int("scale", scale)
        # YAML gives lists; store tuples so the config is hashable and compares equal
        num_feat = tuple(num_feat) if isinstance(num_feat, (list, tuple)) else num_feat
        kernel_sizes = tuple(kernel_sizes) if isinstance(kernel_sizes, (list, tuple)) else kernel_sizes
        if not isinstance(num_feat, tuple) or len(num_feat) != 2:
            raise ValueError(f"num_feat must be two channel counts (n1, n2), e.g. (64, 32); got {num_feat!r}")
        if not isinstance(kernel_sizes, tuple) or len(kernel_sizes) != 3:
            raise ValueError(f"kernel_sizes must be three sizes (f1, f2, f3), e.g. (9, 1, 5); got {kernel_sizes!r}")
        for i, n in enumerate(num_feat):
            check_int(f"num_feat[{i}]", n)
        for i, k in enumerate(kernel_sizes):
            if check_int(f"kernel_sizes[{i}]", k) % 2 == 0:
                raise ValueError(f"kernel_sizes[{i}] must be odd so the padding is symmetric, got {k}")
        self.scale = scale
        self.num_in_ch = num_in_ch
        self.config = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat,
                           kernel_sizes=kernel_sizes, scale=scale)

        f1, f2, f3 = kernel_sizes
        n1, n2 = num_feat
        self.conv1 = nn.Conv2d(num_in_ch, n1, f1, padding=f1 // 2)
        self.conv2 = nn.Conv2d(n1, n2, f2, padding=f2 // 2)
        self.conv3 = nn.Conv2d(n2, num_out_ch, f3, padding=f3 // 2)
        self.relu = nn.ReLU(inplace=True)
        # the paper's init: weights ~ N(0, 0.001^2), zero biases
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.normal_(conv.weight, std=1e-3)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, h, w) float in [0, 1] -> (N, num_out_ch, h*scale, w*scale), not clamped."""
        check_image_batch(x, self.num_in_ch, "SRCNN")
        x = imresize(x, self.scale)
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.conv3(x)
