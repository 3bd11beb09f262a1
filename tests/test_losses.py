"""Pixel, perceptual and adversarial losses against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raysr.losses import ADV_TYPES, PerceptualLoss, d_adv_loss, g_adv_loss, pixel_loss
from raysr.models.vgg import VGGFeatureExtractor


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- pixel losses

PRED = torch.tensor([[0.0, 0.5], [1.0, -2.0]])
TARGET = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # differences: 0, -0.5, 1, -3


def test_pixel_l1_and_mse_hand_values():
    assert pixel_loss(PRED, TARGET, "l1").item() == pytest.approx((0 + 0.5 + 1 + 3) / 4)
    assert pixel_loss(PRED, TARGET, "mse").item() == pytest.approx((0 + 0.25 + 1 + 9) / 4)


def test_charbonnier_formula_and_l1_limit():
    eps = 1e-3
    expected = mean(math.sqrt(d * d + eps) for d in (0, -0.5, 1, -3))
    assert pixel_loss(PRED, TARGET, "charbonnier", eps=eps).item() == pytest.approx(expected, rel=1e-6)
    # With the default tiny eps it is L1 up to sqrt(eps) per element.
    assert pixel_loss(PRED, TARGET, "charbonnier").item() == pytest.approx(4.5 / 4, abs=1e-5)


def test_pixel_loss_errors():
    with pytest.raises(ValueError, match="allowed: l1, mse, charbonnier"):
        pixel_loss(PRED, TARGET, "l2")
    with pytest.raises(ValueError, match=r"differ in shape"):
        pixel_loss(PRED, TARGET[:1])


# ------------------------------------------------------------ perceptual loss

@pytest.fixture(scope="module")
def vgg_state(tmp_path_factory):
    """A full random VGG19 state dict in torchvision layout (no real weights exist here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
        with pytest.warns(UserWarning, match="randomly initialised"):
            return VGGFeatureExtractor("conv5_4", allow_random_weights=True).state_dict()


@pytest.fixture
def sr_hr(make_image):
    """Two different (2,3,32,32) images in [0,1]: an 'SR' output and its HR target."""
    hr = torch.from_numpy(np.stack([make_image(32, 32, s) for s in (3, 4)])).permute(0, 3, 1, 2).float() / 255
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, hr.shape)).float()
    return (hr + noise).clamp(0, 1), hr


def test_perceptual_l1_before_relu_equals_hand_computation(vgg_state, sr_hr):
    sr, hr = sr_hr
    scale = 1 / 12.75
    loss = PerceptualLoss({"conv1_2": 0.5, "conv2_2": 2.0}, before_relu=True, criterion="l1",
                          feature_scale=scale, weights=vgg_state)(sr, hr)
    vgg = VGGFeatureExtractor(["conv1_2", "conv2_2"], weights=vgg_state)
    fs, fh = vgg(sr), vgg(hr)
    expected = sum(w * scale * (fs[n].double() - fh[n].double()).abs().mean().item()
                   for n, w in (("conv1_2", 0.5), ("conv2_2", 2.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_perceptual_l2_after_relu_is_srgan_phi54(vgg_state, sr_hr):
    sr, hr = sr_hr
    scale = 1 / 12.75
    loss = PerceptualLoss({"conv5_4": 1.0}, before_relu=False, criterion="l2",
                          feature_scale=scale, weights=vgg_state)(sr, hr)
    vgg = VGGFeatureExtractor("relu5_4", weights=vgg_state)
    diff = scale * (vgg(sr)["relu5_4"].double() - vgg(hr)["relu5_4"].double())
    assert loss.item() == pytest.approx((diff ** 2).mean().item(), rel=1e-5)
    before = PerceptualLoss({"conv5_4": 1.0}, before_relu=True, criterion="l2",
                            feature_scale=scale, weights=vgg_state)(sr, hr)
    assert before.item() != pytest.approx(loss.item(), rel=1e-3)  # the flag selects a different activation


def test_perceptual_loss_is_zero_for_identical_images_and_grads_reach_sr_only(vgg_state, sr_hr):
    sr, hr = sr_hr
    criterion = PerceptualLoss(weights=vgg_state)  # ESRGAN default: conv5_4 before ReLU, L1
    assert criterion(hr, hr.clone()).item() == 0.0
    sr = sr.clone().requires_grad_(True)
    hr = hr.clone().requires_grad_(True)
    criterion(sr, hr).backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert hr.grad is None
    assert all(p.grad is None for p in criterion.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": {"relu5_4": 1.0}}, "before_relu=True"),
    ({"layers": {"pool5": 1.0}}, "unknown perceptual layer 'pool5'"),
    ({"layers": {"conv6_1": 1.0}}, "unknown perceptual layer 'conv6_1'"),
    ({"layers": {"conv5_4": -1.0}}, "must be numbers >= 0"),
    ({"layers": {}}, "layers is empty"),
    ({"layers": {"conv5_4": 1.0, "relu5_4": 1.0}, "before_relu": False}, "same VGG19 activation twice"),
    ({"criterion": "mse"}, "allowed: l1, l2"),
    ({"before_relu": "yes"}, "before_relu must be True"),
    ({"feature_scale": 0.0}, "feature_scale must be > 0"),
])
def test_perceptual_loss_rejects_bad_settings(vgg_state, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerceptualLoss(weights=vgg_state, **kwargs)


def test_perceptual_loss_shape_mismatch(vgg_state):
    with pytest.raises(ValueError, match="differ in shape"):
        PerceptualLoss(weights=vgg_state)(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))


# --------------------------------------------------------- adversarial losses

REAL = (1.0, -0.5, 2.0)
FAKE = (0.3, -1.2, 0.0)


def test_vanilla_hand_values():
    assert d_adv_loss("vanilla", t(0, 0), t(0, 0)).item() == pytest.approx(2 * math.log(2))
    assert g_adv_loss("vanilla", t(0, 0)).item() == pytest.approx(math.log(2))
    d_expected = mean(-math.log(sigmoid(r)) for r in REAL) + mean(-math.log(1 - sigmoid(f)) for f in FAKE)
    assert d_adv_loss("vanilla", t(*REAL), t(*FAKE)).item() == pytest.approx(d_expected, rel=1e-12)
    g_expected = mean(-math.log(sigmoid(f)) for f in FAKE)
    assert g_adv_loss("vanilla", t(*FAKE)).item() == pytest.approx(g_expected, rel=1e-12)


def test_vanilla_is_stable_for_confident_logits():
    # A naive log(sigmoid(-200)) is log(0) = -inf in float32; the softplus form gives 200.
    assert g_adv_loss("vanilla", torch.tensor([-200.0])).item() == pytest.approx(200.0)
    assert d_adv_loss("vanilla", torch.tensor([200.0]), torch.tensor([-200.0])).item() == pytest.approx(0.0, abs=1e-30)


def test_ragan_hand_values():
    mean_real, mean_fake = mean(REAL), mean(FAKE)
    d_expected = (mean(-math.log(sigmoid(r - mean_fake)) for r in REAL)
                  + mean(-math.log(1 - sigmoid(f - mean_real)) for f in FAKE)) / 2
    g_expected = (mean(-math.log(1 - sigmoid(r - mean_fake)) for r in REAL)
                  + mean(-math.log(sigmoid(f - mean_real)) for f in FAKE)) / 2
    assert d_adv_loss("ragan", t(*REAL), t(*FAKE)).item() == pytest.approx(d_expected, rel=1e-12)
    assert g_adv_loss("ragan", t(*FAKE), t(*REAL)).item() == pytest.approx(g_expected, rel=1e-12)


def test_ragan_identities():
    real, fake = t(*REAL), t(*FAKE)
    # The generator loss is the discriminator loss with real and fake swapped.
    assert g_adv_loss("ragan", fake, real).item() == pytest.approx(d_adv_loss("ragan", fake, real).item(), rel=1e-12)
    # Shifting every logit by a constant changes nothing: only differences to the other side's mean count.
    assert d_adv_loss("ragan", real + 7, fake + 7).item() == pytest.approx(d_adv_loss("ragan", real, fake).item())
    # When D cannot tell them apart, D_Ra = 1/2 everywhere: both losses are log 2.
    same = t(0.4, 0.4, 0.4)
    assert d_adv_loss("ragan", same, same).item() == pytest.approx(math.log(2))
    assert g_adv_loss("ragan", same, same).item() == pytest.approx(math.log(2))


def test_lsgan_and_hinge_hand_values():
    assert d_adv_loss("lsgan", t(1.0, 0.5), t(0.0, -1.0)).item() == pytest.approx((0 + 0.25) / 2 + (0 + 1) / 2)
    assert g_adv_loss("lsgan", t(0.0, -1.0)).item() == pytest.approx((1 + 4) / 2)
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 1.5]
    assert d_adv_loss("hinge", t(2.0, 0.5, -1.0), t(-2.0, 0.0, 0.5)).item() == pytest.approx(2.5 / 3 + 2.5 / 3)
    assert g_adv_loss("hinge", t(-2.0, 0.0, 0.5)).item() == pytest.approx(0.5)


@pytest.mark.parametrize("adv_type", ADV_TYPES)
def test_logit_maps_are_averaged_over_all_elements(adv_type):
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    fake = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    flat_real, flat_fake = real.flatten(), fake.flatten()
    assert d_adv_loss(adv_type, real, fake).item() == pytest.approx(d_adv_loss(adv_type, flat_real, flat_fake).item())
    assert g_adv_loss(adv_type, fake, real).item() == pytest.approx(g_adv_loss(adv_type, flat_fake, flat_real).item())


@pytest.mark.parametrize("adv_type", ADV_TYPES)
def test_generator_loss_trains_generator_not_discriminator(adv_type):
    torch.manual_seed(0)
    net_g = nn.Conv2d(3, 3, 3, padding=1)
    net_d = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))  # U-Net-like logit map
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    real_logits = net_d(hr)
    loss = g_adv_loss(adv_type, net_d(net_g(lr)), real_logits)
    loss.backward()
    assert net_g.weight.grad is not None and net_g.weight.grad.abs().sum() > 0
    if adv_type == "ragan":  # real logits are detached inside: the G step leaves D's real pass alone
        real_leaf = real_logits.detach().requires_grad_(True)
        g_adv_loss(adv_type, net_d(net_g(lr)), real_leaf).backward()
        assert real_leaf.grad is None


@pytest.mark.parametrize("adv_type", ADV_TYPES)
def test_discriminator_loss_pushes_real_up_and_fake_down(adv_type):
    # Logits inside hinge's margin (-1, 1) and between lsgan's targets 0 and 1.
    real = t(0.5, -0.5, 0.9).requires_grad_(True)
    fake = t(0.3, 0.7, 0.1).requires_grad_(True)
    d_adv_loss(adv_type, real, fake).backward()
    # Descending the D loss raises every real logit and lowers every fake one.
    assert (real.grad < 0).all()
    assert (fake.grad > 0).all()


def test_adversarial_errors():
    with pytest.raises(ValueError, match="allowed: vanilla, ragan, lsgan, hinge"):
        d_adv_loss("wgan", t(0.0), t(0.0))
    with pytest.raises(ValueError, match="allowed: vanilla, ragan, lsgan, hinge"):
        g_adv_loss("wgan", t(0.0))
    with pytest.raises(ValueError, match="needs real_logits"):
        g_adv_loss("ragan", t(0.0))
