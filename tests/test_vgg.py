"""VGG19 feature extractor: torchvision layer layout, weight loading (file, s3://, hub cache), freezing."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysr.storage import StorageError, write_bytes
from raysr.models.vgg import VGG19_LAYERS, VGGFeatureExtractor, load_vgg19_weights

# torchvision's vgg19 "E" config as written in torchvision.models.vgg.cfgs: each
# number is a 3x3 conv (+ReLU, two entries of `features`), "M" a 2x2 max pool.
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def torchvision_conv_shapes() -> dict[int, tuple[int, int]]:
    """features index -> (out, in) channels of each conv, walking VGG19_CFG like torchvision's make_layers."""
    shapes, idx, in_ch = {}, 0, 3
    for v in VGG19_CFG:
        if v == "M":
            idx += 1
        else:
            shapes[idx] = (v, in_ch)
            in_ch, idx = v, idx + 2
    return shapes


def random_vgg19_state(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict with random weights and non-zero biases, plus a classifier entry."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (out_ch, in_ch) in torchvision_conv_shapes().items():
        state[f"features.{idx}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * (2.0 / (in_ch * 9)) ** 0.5
        state[f"features.{idx}.bias"] = torch.randn(out_ch, generator=gen) * 0.1
    state["classifier.6.bias"] = torch.zeros(1000)  # torchvision files carry the classifier; it is ignored
    return state


def reference_vgg19(x: torch.Tensor, state: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Independent float64 VGG19 forward: features index -> activation, with ImageNet normalisation."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    x = (x.double() - mean) / std
    out, idx = {}, 0
    for v in VGG19_CFG:
        if v == "M":
            x = out[idx] = F.max_pool2d(x, 2)
            idx += 1
        else:
            x = out[idx] = F.conv2d(x, state[f"features.{idx}.weight"].double(),
                                    state[f"features.{idx}.bias"].double(), padding=1)
            x = out[idx + 1] = F.relu(x)
            idx += 2
    return out


def images(make_image, size: int = 32, seeds=(1, 2)) -> torch.Tensor:
    """(N,3,size,size) float in [0,1] photo-like test images."""
    arr = np.stack([make_image(size, size, s) for s in seeds])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max abs error {err}"


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch):
    """Point the torch hub cache at an empty directory so no real weights are picked up."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    return random_vgg19_state(seed=123)


@pytest.fixture(scope="module")
def weights_file(vgg_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg19-test.pth"
    torch.save(vgg_state, path)
    return path


def test_layer_names_follow_torchvision_feature_indices():
    expected = {"conv1_1": 0, "relu1_1": 1, "conv1_2": 2, "relu1_2": 3, "pool1": 4, "conv2_1": 5,
                "conv2_2": 7, "relu2_2": 8, "pool2": 9, "conv3_1": 10, "conv3_4": 16, "pool3": 18,
                "conv4_1": 19, "pool4": 27, "conv5_1": 28, "conv5_4": 34, "relu5_4": 35, "pool5": 36}
    assert len(VGG19_LAYERS) == 37
    for name, idx in expected.items():
        assert VGG19_LAYERS[idx] == name
    conv_indices = [i for i, n in enumerate(VGG19_LAYERS) if n.startswith("conv")]
    assert conv_indices == sorted(torchvision_conv_shapes())


def test_extractor_is_built_only_to_the_deepest_layer(vgg_state):
    vgg = VGGFeatureExtractor(["conv1_1", "relu2_2"], weights=vgg_state)
    assert len(vgg.features) == 9  # features.0 .. features.8
    assert list(vgg.state_dict()) == [f"features.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")]


def test_weights_file_matches_independent_vgg19_forward(vgg_state, weights_file, make_image):
    vgg = VGGFeatureExtractor(["conv5_4", "relu2_2", "pool3"], weights=str(weights_file))
    assert not vgg.random_weights
    x = images(make_image)
    out = vgg(x)
    ref = reference_vgg19(x, vgg_state)
    assert set(out) == {"conv5_4", "relu2_2", "pool3"}
    assert out["conv5_4"].shape == (2, 512, 2, 2)
    assert_close_rel(out["conv5_4"], ref[34])
    assert_close_rel(out["relu2_2"], ref[8])
    assert_close_rel(out["pool3"], ref[18])
    assert out["conv5_4"].min() < 0  # before ReLU


def test_load_vgg19_weights_returns_features_only(vgg_state, weights_file):
    loaded = load_vgg19_weights(weights_file)
    assert len(loaded) == 32 and "classifier.6.bias" not in loaded
    for key, value in loaded.items():
        assert torch.equal(value, vgg_state[key])


def test_weights_from_s3(s3_bucket, weights_file, make_image):
    uri = f"s3://{s3_bucket}/models/vgg19.pth"
    write_bytes(uri, weights_file.read_bytes())
    from_s3 = VGGFeatureExtractor("relu3_1", weights=uri)
    from_file = VGGFeatureExtractor("relu3_1", weights=weights_file)
    x = images(make_image)
    assert torch.equal(from_s3(x)["relu3_1"], from_file(x)["relu3_1"])
    with pytest.raises(StorageError, match="does not exist"):
        load_vgg19_weights(f"s3://{s3_bucket}/models/missing.pth")


def test_weights_from_torch_hub_cache(empty_hub, vgg_state, weights_file):
    empty_hub.mkdir(parents=True)
    (empty_hub / "vgg19-dcbb9e9d.pth").symlink_to(weights_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real weights found: no random-init warning
        vgg = VGGFeatureExtractor("conv2_1", allow_random_weights=True)
    assert not vgg.random_weights
    assert torch.equal(vgg.features[5].weight, vgg_state["features.5.weight"])
    assert torch.equal(vgg.features[5].bias, vgg_state["features.5.bias"])


def test_other_hash_suffix_in_hub_cache_is_found(empty_hub, vgg_state, weights_file):
    empty_hub.mkdir(parents=True)
    shutil.copy(weights_file, empty_hub / "vgg19_bn-c79401a0.pth")  # batch-norm variant: must be skipped
    with pytest.raises(FileNotFoundError):
        load_vgg19_weights()
    (empty_hub / "vgg19-0123abcd.pth").symlink_to(weights_file)
    assert torch.equal(load_vgg19_weights()["features.34.weight"], vgg_state["features.34.weight"])


def test_missing_weights_error_says_where_and_how(empty_hub):
    with pytest.raises(FileNotFoundError) as info:
        VGGFeatureExtractor("conv5_4")
    message = str(info.value)
    assert str(empty_hub) in message
    assert "vgg19-dcbb9e9d.pth" in message and "loss.perceptual.weights_path" in message
    with pytest.raises(StorageError, match="does not exist"):
        VGGFeatureExtractor("conv5_4", weights="/nonexistent/vgg19.pth", allow_random_weights=True)


def test_wrong_state_dicts_are_rejected_with_the_key(vgg_state, tmp_path):
    missing = {k: v for k, v in vgg_state.items() if k != "features.34.weight"}
    with pytest.raises(ValueError, match=r"missing keys \[features\.34\.weight\]"):
        VGGFeatureExtractor("conv1_1", weights=missing)
    wrong_shape = dict(vgg_state, **{"features.2.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(ValueError, match=r"features\.2\.weight: \(64, 64, 1, 1\) != \(64, 64, 3, 3\)"):
        VGGFeatureExtractor("conv1_1", weights=wrong_shape)
    batch_norm = dict(vgg_state, **{"features.1.running_mean": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"unexpected keys \[features\.1\.running_mean\]"):
        VGGFeatureExtractor("conv1_1", weights=batch_norm)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable PyTorch state dict"):
        load_vgg19_weights(garbage)


def test_params_wrapper_is_unwrapped(vgg_state):
    vgg = VGGFeatureExtractor("conv1_1", weights={"params": vgg_state})
    assert torch.equal(vgg.features[0].weight, vgg_state["features.0.weight"])


def test_random_weights_need_opt_in_and_are_deterministic(make_image):
    with pytest.warns(UserWarning, match="allow_random_weights=True"):
        deep = VGGFeatureExtractor("conv3_1", allow_random_weights=True)
    with pytest.warns(UserWarning):
        shallow = VGGFeatureExtractor("conv2_2", allow_random_weights=True)
    assert deep.random_weights and shallow.random_weights
    # Same seed, layers drawn in order: the shallow net is a prefix of the deep one.
    for key, value in shallow.state_dict().items():
        assert torch.equal(value, deep.state_dict()[key])
    with pytest.warns(UserWarning):
        again = VGGFeatureExtractor("conv3_1", allow_random_weights=True)
    for key, value in deep.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    x = images(make_image)
    assert torch.equal(deep(x)["conv3_1"], again(x)["conv3_1"])
    assert deep(x)["conv3_1"].std() > 0


def test_extractor_is_frozen_and_stays_in_eval(vgg_state, make_image):
    vgg = VGGFeatureExtractor("relu2_1", weights=vgg_state)
    assert all(not p.requires_grad for p in vgg.parameters())
    parent = nn.ModuleDict({"vgg": vgg, "head": nn.Conv2d(3, 3, 1)})
    parent.train()
    assert parent["head"].training and not vgg.training
    assert not any(m.training for m in vgg.modules())
    x = images(make_image).requires_grad_(True)
    vgg(x)["relu2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in vgg.parameters())


def test_before_relu_output_is_not_overwritten(vgg_state, make_image):
    vgg = VGGFeatureExtractor(["conv1_2", "relu1_2"], weights=vgg_state)
    out = vgg(images(make_image))
    conv, relu = out["conv1_2"], out["relu1_2"]
    assert conv.min() < 0 and relu.min() >= 0
    assert torch.equal(relu, conv.clamp(min=0))


def test_input_normalisation_options(vgg_state, make_image):
    x = images(make_image)
    plain = VGGFeatureExtractor("conv1_1", weights=vgg_state)
    ranged = VGGFeatureExtractor("conv1_1", weights=vgg_state, range_norm=True)
    raw = VGGFeatureExtractor("conv1_1", weights=vgg_state, use_input_norm=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = plain(x)["conv1_1"]
    torch.testing.assert_close(ranged(2 * x - 1)["conv1_1"], expected)
    torch.testing.assert_close(raw((x - mean) / std)["conv1_1"], expected)


def test_bad_layer_names_and_inputs(vgg_state):
    with pytest.raises(ValueError, match=r"unknown VGG19 layer\(s\) \['conv6_1'\].*conv5_4"):
        VGGFeatureExtractor(["conv6_1"], weights=vgg_state)
    with pytest.raises(ValueError, match="layer_names is empty"):
        VGGFeatureExtractor([], weights=vgg_state)
    vgg = VGGFeatureExtractor("conv5_4", weights=vgg_state)
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        vgg(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than 16x16"):
        vgg(torch.rand(1, 3, 8, 32))
