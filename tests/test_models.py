"""Generators and discriminators: shapes, BasicSR parameter names, and forwards that
equal independent functional references written here from the published forwards."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from raysr.models import (DISCRIMINATORS, GENERATORS, RRDBNet, SRResNet, SRVGGNetCompact, UNetDiscriminatorSN,
                          VGGDiscriminator, build_discriminator, build_generator)
from raysr.models.srcnn import SRCNN
from raysr.models.vdsr import VDSR
from raysr.ops.resize import imresize

TINY = {
    "srcnn": dict(num_feat=(6, 4)),
    "vdsr": dict(num_feat=6, num_layer=4),
    "srresnet": dict(num_feat=6, num_block=2),
    "rrdbnet": dict(num_feat=6, num_block=1, num_grow_ch=4),
    "compact": dict(num_feat=6, num_conv=2),
}



# --------------------------------------------------------------------------- functional references (float64)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 weights of healthy magnitude (the x0.1 init would hide mistakes in residual paths)."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            elif t.ndim > 1:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) / t[0].numel() ** 0.5)
            else:  # biases, BN affine/statistics, PReLU slopes
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * 0.4 - 0.1)
    return model.eval()


def conv(x, sd, name, stride=1):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd.get(f"{name}.bias"), stride=stride, padding=w.shape[-1] // 2 if stride == 1 else 1)


def lrelu(x, slope):
    return torch.where(x >= 0, x, slope * x)


def prelu(x, sd, name):
    return torch.where(x >= 0, x, sd[f"{name}.weight"].view(1, -1, 1, 1) * x)


def bn(x, sd, name, eps=1e-5):
    view = lambda k: sd[f"{name}.{k}"].view(1, -1, 1, 1)  # noqa: E731
    return (x - view("running_mean")) / torch.sqrt(view("running_var") + eps) * view("weight") + view("bias")


def pixel_shuffle(x, r):
    n, c, h, w = x.shape
    return x.view(n, c // (r * r), r, r, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def pixel_unshuffle(x, r):
    n, c, hh, ww = x.shape
    return x.view(n, c, hh // r, r, ww // r, r).permute(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, hh // r, ww // r)


def nearest2(x):
    return x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)


def rrdbnet_reference(sd, x, scale, num_block):
    """BasicSR RRDBNet.forward, written out over the state dict."""
    if scale in (1, 2):
        x = pixel_unshuffle(x, 4 // scale)
    feat = conv(x, sd, "conv_first")
    trunk = feat
    for i in range(num_block):
        h = trunk
        for r in (1, 2, 3):
            feats = [h]
            for c in (1, 2, 3, 4):
                feats.append(lrelu(conv(torch.cat(feats, 1), sd, f"body.{i}.rdb{r}.conv{c}"), 0.2))
            h = conv(torch.cat(feats, 1), sd, f"body.{i}.rdb{r}.conv5") * 0.2 + h
        trunk = h * 0.2 + trunk
    feat = feat + conv(trunk, sd, "conv_body")
    feat = lrelu(conv(nearest2(feat), sd, "conv_up1"), 0.2)
    feat = lrelu(conv(nearest2(feat), sd, "conv_up2"), 0.2)
    return conv(lrelu(conv(feat, sd, "conv_hr"), 0.2), sd, "conv_last")


def upsample_reference(feat, sd, scale, act):
    """x4 = two (conv, shuffle 2, act) stages; x2/x3 one stage of that factor."""
    stages = (1, 2) if scale == 4 else (1,)
    for i in stages:
        feat = act(pixel_shuffle(conv(feat, sd, f"upconv{i}"), 2 if scale == 4 else scale), i)
    return feat


def msrresnet_reference(sd, x, scale, num_block):
    """BasicSR MSRResNet.forward, written out over the state dict."""
    feat = lrelu(conv(x, sd, "conv_first"), 0.1)
    for i in range(num_block):
        feat = feat + conv(torch.relu(conv(feat, sd, f"body.{i}.conv1")), sd, f"body.{i}.conv2")
    feat = upsample_reference(feat, sd, scale, lambda t, i: lrelu(t, 0.1))
    out = conv(lrelu(conv(feat, sd, "conv_hr"), 0.1), sd, "conv_last")
    return out + F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def srresnet_paper_reference(sd, x, scale, num_block):
    """SRGAN paper SRResNet (BN in eval mode)."""
    feat = prelu(conv(x, sd, "conv_first"), sd, "act_first")
    h = feat
    for i in range(num_block):
        b = f"body.{i}"
        h = h + bn(conv(prelu(bn(conv(h, sd, f"{b}.conv1"), sd, f"{b}.bn1"), sd, f"{b}.act"), sd, f"{b}.conv2"),
                   sd, f"{b}.bn2")
    feat = feat + bn(conv(h, sd, "conv_body"), sd, "bn_body")
    feat = upsample_reference(feat, sd, scale, lambda t, i: prelu(t, sd, f"upact{i}"))
    return conv(feat, sd, "conv_last")


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name,extra,scale,size", [
    ("srcnn", {}, 2, (7, 9)), ("srcnn", {}, 3, (5, 4)), ("srcnn", {}, 4, (6, 7)),
    ("vdsr", {}, 2, (7, 9)), ("vdsr", {}, 3, (5, 4)), ("vdsr", {}, 4, (6, 7)),
    ("srresnet", {}, 2, (7, 9)), ("srresnet", {}, 3, (5, 4)), ("srresnet", {}, 4, (6, 7)),
    ("srresnet", {"variant": "paper"}, 2, (7, 9)), ("srresnet", {"variant": "paper"}, 3, (5, 4)),
    ("srresnet", {"variant": "paper"}, 4, (6, 7)),
    ("rrdbnet", {}, 4, (5, 7)), ("rrdbnet", {}, 2, (6, 10)), ("rrdbnet", {}, 1, (8, 12)),
    ("compact", {}, 4, (5, 7)), ("compact", {"act_type": "relu"}, 3, (5, 4)),
    ("compact", {"act_type": "leakyrelu"}, 1, (6, 7)),
])
def test_generator_output_size_and_gradients(name, extra, scale, size):
    g = build_generator(name, scale=scale, **TINY[name], **extra)
    x = torch.rand(2, 3, *size, requires_grad=True)
    y = g(x)
    assert g.scale == scale
    assert y.shape == (2, 3, size[0] * scale, size[1] * scale)
    assert y.dtype == torch.float32
    y.square().mean().backward()
    # every weight and the input receive gradient (no detached path, no in-place autograd error)
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in g.parameters())
    assert g.config == {**g.config, **TINY[name], **extra, "scale": scale}


def test_rrdbnet_unshuffle_needs_divisible_input():
    g = RRDBNet(num_feat=4, num_block=1, num_grow_ch=4, scale=2)
    with pytest.raises(ValueError, match="divisible by 2"):
        g(torch.rand(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        g(torch.rand(3, 8, 8))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_vdsr_is_bicubic_plus_residual(scale):
    torch.manual_seed(0)
    g = VDSR(num_feat=6, num_layer=4, scale=scale).eval()
    x = torch.rand(2, 3, 7, 6)
    with torch.no_grad():
        body = g(x) - imresize(x, scale)
        g.conv_last.weight.zero_()
        g.conv_last.bias.zero_()
        out = g(x)
    assert torch.equal(out, imresize(x, scale))
    assert body.abs().max() > 0  # the residual branch really contributes before zeroing
    # bicubic reproduces a constant image exactly (weights sum to 1): an independent anchor
    flat = torch.full((1, 3, 5, 5), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(g(flat), torch.full((1, 3, 5 * scale, 5 * scale), 0.3), atol=1e-6, rtol=0)


def test_vdsr_and_srcnn_match_functional_reference():
    x = torch.rand(1, 3, 6, 5, dtype=torch.float64)
    vdsr = randomize_(VDSR(num_feat=5, num_layer=5, scale=3), seed=1)
    srcnn = randomize_(SRCNN(num_feat=(6, 4), kernel_sizes=(9, 1, 5), scale=3), seed=2)
    sd_v, sd_s = vdsr.state_dict(), srcnn.state_dict()
    base = imresize(x, 3)

    feat = torch.relu(conv(base, sd_v, "conv_first"))
    for i in range(3):
        feat = torch.relu(conv(feat, sd_v, f"body.{i}"))
    expected_vdsr = base + conv(feat, sd_v, "conv_last")
    expected_srcnn = conv(torch.relu(conv(torch.relu(conv(base, sd_s, "conv1")), sd_s, "conv2")), sd_s, "conv3")
    with torch.no_grad():
        torch.testing.assert_close(vdsr(x), expected_vdsr, atol=1e-10, rtol=0)
        torch.testing.assert_close(srcnn(x), expected_srcnn, atol=1e-10, rtol=0)
    assert [k for k in sd_s] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                 "conv3.weight", "conv3.bias"]
    assert sd_s["conv1.weight"].shape == (6, 3, 9, 9) and sd_s["conv3.weight"].shape == (3, 4, 5, 5)


def test_msrresnet_parameter_names_equal_basicsr():
    g = SRResNet(num_feat=4, num_block=2, scale=4)
    assert list(g.state_dict()) == [
        "conv_first.weight", "conv_first.bias",
        "body.0.conv1.weight", "body.0.conv1.bias", "body.0.conv2.weight", "body.0.conv2.bias",
        "body.1.conv1.weight", "body.1.conv1.bias", "body.1.conv2.weight", "body.1.conv2.bias",
        "upconv1.weight", "upconv1.bias", "upconv2.weight", "upconv2.bias",
        "conv_hr.weight", "conv_hr.bias", "conv_last.weight", "conv_last.bias"]
    assert g.upconv1.weight.shape == (16, 4, 3, 3)
    x3 = SRResNet(num_feat=4, num_block=1, scale=3)
    assert "upconv2.weight" not in x3.state_dict() and x3.upconv1.weight.shape == (36, 4, 3, 3)


def test_rrdbnet_parameter_names_equal_basicsr():
    g = RRDBNet(num_feat=4, num_block=2, num_grow_ch=2, scale=4)
    rdb = [f"body.{b}.rdb{r}.conv{c}.{p}" for b in (0, 1) for r in (1, 2, 3) for c in (1, 2, 3, 4, 5)
           for p in ("weight", "bias")]
    assert list(g.state_dict()) == ["conv_first.weight", "conv_first.bias", *rdb,
                                    "conv_body.weight", "conv_body.bias", "conv_up1.weight", "conv_up1.bias",
                                    "conv_up2.weight", "conv_up2.bias", "conv_hr.weight", "conv_hr.bias",
                                    "conv_last.weight", "conv_last.bias"]
    # dense growth: conv5 sees num_feat + 4 * num_grow_ch channels
    assert g.body[0].rdb1.conv5.weight.shape == (4, 4 + 4 * 2, 3, 3)
    assert RRDBNet(num_feat=4, num_block=1, num_grow_ch=2, scale=2).conv_first.weight.shape[1] == 12
    assert RRDBNet(num_feat=4, num_block=1, num_grow_ch=2, scale=1).conv_first.weight.shape[1] == 48


def test_basicsr_init_scales_residual_convs():
    torch.manual_seed(0)
    g = RRDBNet(num_feat=64, num_block=1, num_grow_ch=32)
    w = g.body[0].rdb1.conv1.weight  # Kaiming normal std sqrt(2 / fan_in), times 0.1
    assert abs(w.std().item() - 0.1 * (2 / (64 * 9)) ** 0.5) < 0.1 * 0.1 * (2 / (64 * 9)) ** 0.5
    assert torch.count_nonzero(g.body[0].rdb1.conv1.bias) == 0


@pytest.mark.parametrize("scale,size", [(4, (5, 7)), (2, (6, 8)), (1, (8, 4))])
def test_rrdbnet_matches_basicsr_forward(scale, size):
    g = randomize_(RRDBNet(num_feat=6, num_block=2, num_grow_ch=3, scale=scale))
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(g(x), rrdbnet_reference(g.state_dict(), x, scale, 2), atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant,reference", [("msrresnet", msrresnet_reference),
                                               ("paper", srresnet_paper_reference)])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_srresnet_matches_reference_forward(variant, reference, scale):
    g = randomize_(SRResNet(num_feat=5, num_block=2, scale=scale, variant=variant), seed=scale)
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(g(x), reference(g.state_dict(), x, scale, 2), atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- discriminators


def vgg_discriminator_reference(sd, x, num_stages):
    feat = lrelu(conv(x, sd, "conv0_0"), 0.2)
    feat = lrelu(bn(conv(feat, sd, "conv0_1", stride=2), sd, "bn0_1"), 0.2)
    for i in range(1, num_stages):
        feat = lrelu(bn(conv(feat, sd, f"conv{i}_0"), sd, f"bn{i}_0"), 0.2)
        feat = lrelu(bn(conv(feat, sd, f"conv{i}_1", stride=2), sd, f"bn{i}_1"), 0.2)
    feat = lrelu(F.linear(feat.flatten(1), sd["linear1.weight"], sd["linear1.bias"]), 0.2)
    return F.linear(feat, sd["linear2.weight"], sd["linear2.bias"])


@pytest.mark.parametrize("input_size,num_stages,final", [(64, 4, 4), (96, 5, 3), (128, 5, 4), (192, 5, 6), (256, 6, 4)])
def test_vgg_discriminator_structure_and_forward(input_size, num_stages, final):
    d = randomize_(VGGDiscriminator(num_feat=2, input_size=input_size, dense_feat=7))
    params = [k for k, _ in d.named_parameters()]
    expected = ["conv0_0.weight", "conv0_0.bias", "conv0_1.weight", "bn0_1.weight", "bn0_1.bias"]
    for i in range(1, num_stages):
        expected += [f"conv{i}_0.weight", f"bn{i}_0.weight", f"bn{i}_0.bias",
                     f"conv{i}_1.weight", f"bn{i}_1.weight", f"bn{i}_1.bias"]
    assert params == expected + ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    assert d.linear1.weight.shape == (7, 2 * 8 * final * final)
    x = torch.rand(2, 3, input_size, input_size, dtype=torch.float64)
    with torch.no_grad():
        out = d(x)
    assert out.shape == (2, 1)
    torch.testing.assert_close(out, vgg_discriminator_reference(d.state_dict(), x, num_stages), atol=1e-10, rtol=0)


# SRGAN paper, Fig. 4: (channels, stride) of the eight 3x3 convs for num_feat = 64
SRGAN_PAPER_CONVS = [(64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2), (512, 1), (512, 2)]


def srgan_paper_discriminator_reference(sd, x, num_feat):
    """Ledig et al. 2017 Fig. 4: conv-LReLU, 7 x (conv-BN-LReLU), dense-LReLU-dense (BN in eval mode)."""
    feat = x
    for k, (channels, stride) in enumerate(SRGAN_PAPER_CONVS):
        w = sd[f"conv{k}.weight"]
        assert w.shape[0] == channels * num_feat // 64 and w.shape[-2:] == (3, 3)
        feat = F.conv2d(feat, w, sd.get(f"conv{k}.bias"), stride=stride, padding=1)
        feat = lrelu(feat if k == 0 else bn(feat, sd, f"bn{k}"), 0.2)
    feat = lrelu(F.linear(feat.flatten(1), sd["linear1.weight"], sd["linear1.bias"]), 0.2)
    return F.linear(feat, sd["linear2.weight"], sd["linear2.bias"])


@pytest.mark.parametrize("input_size", [64, 96, 128, 192, 256])
def test_srgan_paper_discriminator_structure_and_forward(input_size):
    d = randomize_(VGGDiscriminator(num_feat=4, input_size=input_size, dense_feat=7, variant="paper"))
    expected = ["conv0.weight", "conv0.bias"]
    for k in range(1, 8):
        expected += [f"conv{k}.weight", f"bn{k}.weight", f"bn{k}.bias"]
    assert [k for k, _ in d.named_parameters()] == expected + [
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    final = input_size // 16  # four stride-2 convs
    assert d.linear1.weight.shape == (7, 4 * 8 * final * final)
    x = torch.rand(2, 3, input_size, input_size, dtype=torch.float64)
    with torch.no_grad():
        out = d(x)
    assert out.shape == (2, 1)
    torch.testing.assert_close(out, srgan_paper_discriminator_reference(d.state_dict(), x, 4), atol=1e-10, rtol=0)


def test_srgan_paper_discriminator_full_width_is_6x6x512_at_96():
    d = VGGDiscriminator(input_size=96, dense_feat=1024, variant="paper").eval()
    seen = {}
    d.bn7.register_forward_hook(lambda m, i, o: seen.update(last=o.shape))  # returns None: output kept
    with torch.no_grad():
        assert d(torch.rand(1, 3, 96, 96)).shape == (1, 1)
    assert seen["last"] == (1, 512, 6, 6)
    assert d.linear1.weight.shape == (1024, 512 * 6 * 6) and d.linear2.weight.shape == (1, 1024)
    assert d.conv0.bias is not None and all(getattr(d, f"conv{k}").bias is None for k in range(1, 8))
    assert d.config["variant"] == "paper"


def test_srgan_preset_builds_the_paper_discriminator():
    from raysr.config import ConfigError, load_config
    from raysr.models import discriminator_from_config

    random_vgg = ["loss.perceptual.allow_random_weights=true"]
    srgan = load_config("srgan_x4", overrides=random_vgg)
    d = discriminator_from_config(srgan.model.discriminator, srgan.data.gt_size)
    assert d.config == dict(num_in_ch=3, num_feat=64, input_size=96, dense_feat=1024, variant="paper")
    esrgan = load_config("esrgan_x4", overrides=random_vgg)
    assert discriminator_from_config(esrgan.model.discriminator, esrgan.data.gt_size).config["variant"] == "basicsr"
    with pytest.raises(ConfigError, match=r"model.discriminator.variant: 'paper' applies to the vgg discriminator"):
        load_config("srgan_x4", overrides=random_vgg + ["model.discriminator.name=unet"])


@pytest.mark.parametrize("variant", ["basicsr", "paper"])
def test_vgg_discriminator_errors_name_the_fix(variant):
    with pytest.raises(ValueError, match=r"\[64, 96, 128, 192, 256\]"):
        VGGDiscriminator(input_size=100, variant=variant)
    d = VGGDiscriminator(num_feat=2, input_size=96, variant=variant)
    with pytest.raises(ValueError, match=r"96x96.*got 128x128.*data.gt_size must equal"):
        d(torch.rand(1, 3, 128, 128))


def sn_weight(sd, name):
    """Spectral-normalised weight as torch.nn.utils.spectral_norm uses it in eval mode: W / (u^T W v)."""
    w = sd[f"{name}.weight_orig"]
    sigma = sd[f"{name}.weight_u"] @ w.flatten(1) @ sd[f"{name}.weight_v"]
    return w / sigma


def unet_reference(sd, x):
    """Real-ESRGAN UNetDiscriminatorSN.forward (x2 bilinear upsampling; H, W divisible by 8)."""
    act = lambda t: lrelu(t, 0.2)  # noqa: E731
    c = lambda t, n, s=1: F.conv2d(t, sn_weight(sd, n), None, stride=s, padding=1)  # noqa: E731
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    x0 = act(conv(x, sd, "conv0"))
    x1 = act(c(x0, "conv1", 2))
    x2 = act(c(x1, "conv2", 2))
    x3 = act(c(x2, "conv3", 2))
    x4 = act(c(up(x3), "conv4")) + x2
    x5 = act(c(up(x4), "conv5")) + x1
    x6 = act(c(up(x5), "conv6")) + x0
    out = act(c(act(c(x6, "conv7")), "conv8"))
    return conv(out, sd, "conv9")


def test_unet_discriminator_matches_real_esrgan_forward():
    torch.manual_seed(0)
    d = UNetDiscriminatorSN(num_feat=4)
    assert sorted(d.state_dict()) == sorted(
        ["conv0.weight", "conv0.bias", "conv9.weight", "conv9.bias"]
        + [f"conv{i}.{p}" for i in range(1, 9) for p in ("weight_orig", "weight_u", "weight_v")])
    d(torch.rand(2, 3, 16, 16))  # a training-mode step moves the power-iteration vectors u, v
    d = d.double().eval()  # (randomize_ would denormalise u and v)
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(d(x), unet_reference(d.state_dict(), x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("size", [(13, 17), (9, 8), (31, 10)])
@pytest.mark.parametrize("skip", [True, False])
def test_unet_discriminator_any_size(size, skip):
    d = UNetDiscriminatorSN(num_feat=4, skip_connection=skip)
    out = d(torch.rand(2, 3, *size))
    assert out.shape == (2, 1, *size)
    with pytest.raises(ValueError, match=">= 8"):
        d(torch.rand(1, 3, 7, 16))


# --------------------------------------------------------------------------- builders


def test_builders_expose_every_network():
    assert GENERATORS == {"srcnn": SRCNN, "vdsr": VDSR, "srresnet": SRResNet, "rrdbnet": RRDBNet,
                          "compact": SRVGGNetCompact}
    assert DISCRIMINATORS == {"vgg": VGGDiscriminator, "unet": UNetDiscriminatorSN}
    assert isinstance(build_discriminator("vgg", num_feat=2, input_size=96), VGGDiscriminator)
    assert isinstance(build_discriminator("unet", num_feat=2), UNetDiscriminatorSN)
    assert build_discriminator("vgg", num_feat=2, input_size=96, variant="paper").variant == "paper"


@pytest.mark.parametrize("call,message", [
    (lambda: build_generator("edsr"), r"unknown generator 'edsr'; choose one of \['compact', 'rrdbnet', "
                                      r"'srcnn', 'srresnet', 'vdsr'\]"),
    (lambda: build_discriminator("patch"), r"unknown discriminator 'patch'; choose one of \['unet', 'vgg'\]"),
    (lambda: build_generator("rrdbnet", nb=3), r"does not take \['nb'\]; it accepts \['num_in_ch', "
                                               r"'num_out_ch', 'num_feat', 'num_block', 'num_grow_ch', 'scale'\]"),
    (lambda: build_generator("rrdbnet", scale=3), r"'rrdbnet': scale must be one of \[1, 2, 4\], got 3"),
    (lambda: build_generator("srresnet", scale=8), r"scale must be one of \[2, 3, 4\], got 8"),
    (lambda: build_generator("srresnet", variant="srgan"), r"variant must be one of \['msrresnet', 'paper'\]"),
    (lambda: build_generator("srresnet", num_block=0), r"num_block must be an integer >= 1, got 0"),
    (lambda: build_generator("rrdbnet", num_feat=32.0), r"num_feat must be an integer >= 1, got 32.0"),
    (lambda: build_generator("vdsr", num_layer=1), r"num_layer must be an integer >= 2"),
    (lambda: build_generator("vdsr", num_out_ch=1), r"num_out_ch \(1\) must equal num_in_ch \(3\)"),
    (lambda: build_generator("srcnn", kernel_sizes=(9, 2, 5)), r"kernel_sizes\[1\] must be odd"),
    (lambda: build_generator("srcnn", num_feat=64), r"num_feat must be two channel counts"),
    (lambda: build_discriminator("vgg", input_size=80), r"input_size must be one of \[64, 96, 128, 192, 256\]"),
    (lambda: build_discriminator("unet", skip_connection="yes"), r"skip_connection must be True or False"),
    (lambda: build_discriminator("vgg", variant="srgan"), r"variant must be one of \['basicsr', 'paper'\]"),
])
def test_builder_errors_list_allowed_values(call, message):
    with pytest.raises(ValueError, match=message):
        call()
