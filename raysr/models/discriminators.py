"""GAN discriminators: the VGG-style classifiers of SRGAN (paper) / ESRGAN (BasicSR) and
Real-ESRGAN's U-Net.

All return raw logits; the losses apply the sigmoid (or the relativistic
average) themselves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from raysr.models.common import check_choice, check_image_batch, check_int

VGG_INPUT_SIZES = (64, 96, 128, 192, 256)  # = data.gt_size, which the training config derives it from
VGG_VARIANTS = ("basicsr", "paper")
# basicsr: input size -> number of stride-2 stages; the last feature map is 4, 3, 4, 6 or 4 pixels wide
# (BasicSR has 128 and 256; 64 is the 128 network without its fifth stage, 96 / 192 its five at other sizes)
BASICSR_STAGES = {64: 4, 96: 5, 128: 5, 192: 5, 256: 6}
# paper (Ledig et al. 2017, Fig. 4): (channel multiplier, stride) of conv1..conv7, all 3x3 + BN
PAPER_BLOCKS = ((1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2))


class VGGDiscriminator(nn.Module):
    """The VGG-style classifier of SRGAN / ESRGAN, image -> one logit. LeakyReLU 0.2
    after every conv and after ``linear1``; convs followed by BN have no bias.

    ``variant="basicsr"``: BasicSR's ``VGGStyleDiscriminator`` (ESRGAN), same
    parameter names. Stage 0: ``conv0_0`` (3x3, bias) -> LReLU, ``conv0_1`` (4x4
    stride 2) -> ``bn0_1`` -> LReLU. Stage i >= 1: ``conv{i}_0`` (3x3) -> ``bn{i}_0``
    -> LReLU, ``conv{i}_1`` (4x4 stride 2) -> ``bn{i}_1`` -> LReLU, with channels
    num_feat * (1, 2, 4, 8, 8, 8) per stage. Four stages for input 64 (final 4x4 map), five for
    96 / 128 / 192 (3x3 / 4x4 / 6x6), six (``conv5_*``) for 256.

    ``variant="paper"``: the SRGAN paper's network (Ledig et al. 2017, Fig. 4).
    ``conv0`` (3x3, bias, no BN) -> LReLU, then ``conv1..conv7`` (3x3) -> ``bn1..bn7``
    -> LReLU with channels num_feat * (1, 2, 2, 4, 4, 8, 8) and strides
    (2, 1, 2, 1, 2, 1, 2): a 96x96 input ends as 6x6 x 8*num_feat (input_size / 16
    in general, so ``linear1`` grows with input_size^2: 18.9M weights at 96 with
    dense_feat 1024, 134M at 256).

    Both end with ``linear1`` (-> dense_feat) -> LReLU -> ``linear2`` (-> 1).

    Args:
        num_in_ch: channels of the input image.
        num_feat: channels of the first conv (64).
        input_size: H = W of the input; one of 64, 96, 128, 192, 256. Training builds it for
            its crop size ``data.gt_size``.
        dense_feat: width of the hidden dense layer: 100 (ESRGAN / BasicSR) or
            1024 (SRGAN paper).
        variant: ``"basicsr"`` or ``"paper"``, as above.
    """

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, input_size: int = 128, dense_feat: int = 100,
                 variant: str = "basicsr"):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_feat", num_feat)
        check_int("dense_feat", dense_feat)
        check_choice("variant", variant, VGG_VARIANTS)
        if isinstance(input_size, bool) or input_size not in VGG_INPUT_SIZES:
            raise ValueError(f"VGGDiscriminator input_size must be one of {list(VGG_INPUT_SIZES)}, got "
                             f"{input_size!r}; set data.gt_size to one of these (or use the 'unet' "
                             "discriminator, which takes any size)")
        self.num_in_ch = num_in_ch
        self.input_size = input_size
        self.variant = variant
        self.config = dict(num_in_ch=num_in_ch, num_feat=num_feat, input_size=input_size, dense_feat=dense_feat,
                           variant=variant)

        layers = self._basicsr_layers(num_feat, input_size) if variant == "basicsr" else self._paper_layers(num_feat)
        # (conv name, bn name or None) in forward order; the first conv has a bias and no BN
        layer_names = []
        c_in = num_in_ch
        for conv_name, bn_name, c_out, kernel, stride in layers:
            setattr(self, conv_name, nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=bn_name is None))
            if bn_name is not None:
                setattr(self, bn_name, nn.BatchNorm2d(c_out))
            layer_names.append((conv_name, bn_name))
            c_in = c_out
        self.layer_names = tuple(layer_names)

        num_down = sum(stride == 2 for *_, stride in layers)
        final = input_size // 2 ** num_down
        self.linear1 = nn.Linear(c_in * final * final, dense_feat)
        self.linear2 = nn.Linear(dense_feat, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    @staticmethod
    def _basicsr_layers(num_feat: int, input_size: int) -> list[tuple]:
        """(conv name, bn name, out channels, kernel, stride) of VGGStyleDiscriminator."""
        channels = [num_feat * m for m in (1, 2, 4, 8, 8, 8)[:BASICSR_STAGES[input_size]]]
        layers = [("conv0_0", None, num_feat, 3, 1), ("conv0_1", "bn0_1", num_feat, 4, 2)]
        for i, c in enumerate(channels[1:], start=1):
            layers += [(f"conv{i}_0", f"bn{i}_0", c, 3, 1), (f"conv{i}_1", f"bn{i}_1", c, 4, 2)]
        return layers

    @staticmethod
    def _paper_layers(num_feat: int) -> list[tuple]:
        """(conv name, bn name, out channels, kernel, stride) of the SRGAN paper's discriminator."""
        return [("conv0", None, num_feat, 3, 1)] + [
            (f"conv{k}", f"bn{k}", num_feat * mult, 3, stride)
            for k, (mult, stride) in enumerate(PAPER_BLOCKS, start=1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, input_size, input_size) float -> (N, 1) logits."""
        check_image_batch(x, self.num_in_ch, "VGGDiscriminator")
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"VGGDiscriminator was built for {self.input_size}x{self.input_size} inputs but got "
                             f"{x.shape[-2]}x{x.shape[-1]}; data.gt_size must equal the discriminator "
                             "input_size")
        feat = x
        for conv_name, bn_name in self.layer_names:
            feat = getattr(self, conv_name)(feat)
            if bn_name is not None:
                feat = getattr(self, bn_name)(feat)
            feat = self.lrelu(feat)
        feat = self.lrelu(self.linear1(feat.flatten(1)))
        return self.linear2(feat)


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral norm, image -> per-pixel logits.

    ``conv0`` (3x3) -> three 4x4 stride-2 downsampling convs ``conv1..conv3``
    (num_feat * 2, 4, 8 channels) -> three bilinear-upsample + 3x3 convs
    ``conv4..conv6`` (num_feat * 4, 2, 1), each optionally adding the encoder
    feature of the same size (``skip_connection``) -> ``conv7``, ``conv8`` (3x3)
    -> ``conv9`` (3x3, -> 1 channel). LeakyReLU 0.2 after every conv but the last;
    spectral norm on conv1..conv8 (parameters ``convK.weight_orig/_u/_v``).

    Args:
        num_in_ch: channels of the input image.
        num_feat: channels after ``conv0`` (64).
        skip_connection: add encoder features to the decoder (Real-ESRGAN: True).

    Any H, W >= 8 works: each decoder stage upsamples to the exact size of the
    matching encoder feature, so odd sizes round-trip.
    """

    MIN_SIZE = 8  # three stride-2 convs must leave at least one pixel

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True):
        super().__init__()
        check_int("num_in_ch", num_in_ch)
        check_int("num_feat", num_feat)
        if not isinstance(skip_connection, bool):
            raise ValueError(f"skip_connection must be True or False, got {skip_connection!r}")
        self.num_in_ch = num_in_ch
        self.skip_connection = skip_connection
        self.config = dict(num_in_ch=num_in_ch, num_feat=num_feat, skip_connection=skip_connection)
        nf = num_feat

        def sn_conv(c_in, c_out, k, s, p):
            return spectral_norm(nn.Conv2d(c_in, c_out, k, s, p, bias=False))

        self.conv0 = nn.Conv2d(num_in_ch, nf, 3, 1, 1)
        self.conv1 = sn_conv(nf, nf * 2, 4, 2, 1)
        self.conv2 = sn_conv(nf * 2, nf * 4, 4, 2, 1)
        self.conv3 = sn_conv(nf * 4, nf * 8, 4, 2, 1)
        self.conv4 = sn_conv(nf * 8, nf * 4, 3, 1, 1)
        self.conv5 = sn_conv(nf * 4, nf * 2, 3, 1, 1)
        self.conv6 = sn_conv(nf * 2, nf, 3, 1, 1)
        self.conv7 = sn_conv(nf, nf, 3, 1, 1)
        self.conv8 = sn_conv(nf, nf, 3, 1, 1)
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, num_in_ch, H, W) float, H, W >= 8 -> (N, 1, H, W) logits."""
        check_image_batch(x, self.num_in_ch, "UNetDiscriminatorSN")
        if min(x.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(f"UNetDiscriminatorSN needs H and W >= {self.MIN_SIZE}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)
        x2 = F.leaky_relu(self.conv2(x1), 0.2)
        x3 = F.leaky_relu(self.conv3(x2), 0.2)

        feat = x3
        for conv, skip in ((self.conv4, x2), (self.conv5, x1), (self.conv6, x0)):
            # stride-2 convs floor odd sizes; upsampling to the skip's exact size undoes that
            feat = F.interpolate(feat, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            feat = F.leaky_relu(conv(feat), 0.2)
            if self.skip_connection:
                feat = feat + skip

        feat = F.leaky_relu(self.conv7(feat), 0.2)
        feat = F.leaky_relu(self.conv8(feat), 0.2)
        return self.conv9(feat)
