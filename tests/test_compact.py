"""Real-ESRGAN's SRVGGNetCompact (model.generator.name=compact): the forward pass equals the
architecture written out in torch.nn.functional, BasicSR-named weights load strict and have their
hyper-parameters read off the shapes, raysr's files load in spandrel when it is installed, and the
command-line tools run it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from raysr.config import ConfigError, load_config
from raysr.generator_file import load_generator, save_generator
from raysr.models import SRVGGNetCompact, build_generator, generator_from_config


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight redrawn (PReLU slopes too, so a slope that stayed 0.25 cannot hide a wrong index)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen) * (t[0].numel() ** -0.5 if t.ndim > 1 else 0.3))
    return model.eval()


def basicsr_state_dict(num_in_ch: int, num_feat: int, num_conv: int, scale: int, prelu: bool = True,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict written from BasicSR's SRVGGNetCompact layout (one body list: conv, act, conv, act, ...,
    conv to num_in_ch * scale**2), by hand: keys and shapes only, no raysr code."""
    gen = torch.Generator().manual_seed(seed)
    sd, index = {}, 0

    def conv(c_in, c_out):
        nonlocal index
        sd[f"body.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (9 * c_in) ** -0.5
        sd[f"body.{index}.bias"] = torch.randn(c_out, generator=gen) * 0.02
        index += 1

    def act():
        nonlocal index
        if prelu:
            sd[f"body.{index}.weight"] = torch.rand(num_feat, generator=gen) * 0.5
        index += 1

    conv(num_in_ch, num_feat)
    act()
    for _ in range(num_conv):
        conv(num_feat, num_feat)
        act()
    conv(num_feat, num_in_ch * scale * scale)
    return sd


def by_hand(sd: dict[str, torch.Tensor], x: torch.Tensor, num_conv: int, scale: int, act: str = "prelu"):
    """The Compact forward pass in torch.nn.functional from the paper's / BasicSR's description, reading
    only the state dict: conv -> act, num_conv x (conv -> act), conv, pixel shuffle, + nearest-upsampled x."""
    def activation(h, index):
        if act == "prelu":
            return F.prelu(h, sd[f"body.{index}.weight"])
        return F.leaky_relu(h, 0.1) if act == "leakyrelu" else F.relu(h)

    h = x
    for layer in range(num_conv + 1):
        h = activation(F.conv2d(h, sd[f"body.{2 * layer}.weight"], sd[f"body.{2 * layer}.bias"], padding=1),
                       2 * layer + 1)
    last = 2 * (num_conv + 1)
    h = F.conv2d(h, sd[f"body.{last}.weight"], sd[f"body.{last}.bias"], padding=1)
    return F.pixel_shuffle(h, scale) + F.interpolate(x, scale_factor=scale, mode="nearest")


@pytest.mark.parametrize("scale,act", [(4, "prelu"), (2, "relu"), (3, "leakyrelu"), (1, "prelu")])
def test_forward_is_the_architecture_in_functional_form(scale, act):
    g = randomized(build_generator("compact", num_feat=6, num_conv=3, scale=scale, act_type=act), seed=scale)
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = g(x)
        expected = by_hand(g.state_dict(), x, num_conv=3, scale=scale, act=act)
    assert out.shape == (2, 3, 5 * scale, 7 * scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_keys_are_basicsr_body_entries_and_sizes_match_the_releases():
    g = build_generator("compact")  # realesr-general-x4v3: 64 features, 32 convs, x4, PReLU
    keys = list(g.state_dict())
    assert keys[:5] == ["body.0.weight", "body.0.bias", "body.1.weight", "body.2.weight", "body.2.bias"]
    assert keys[-2:] == ["body.66.weight", "body.66.bias"] and g.state_dict()["body.66.weight"].shape == (48, 64, 3, 3)
    # parameters by hand: first conv, 32 hidden convs, 33 PReLUs of 64 slopes, last conv to 3 * 4**2
    convs = (3 * 64 * 9 + 64) + 32 * (64 * 64 * 9 + 64) + (64 * 48 * 9 + 48)
    assert sum(p.numel() for p in g.parameters()) == convs + 33 * 64 == 1_213_296
    anime = build_generator("compact", num_conv=16)  # realesr-animevideov3
    assert sum(p.numel() for p in anime.parameters()) == 621_424
    relu = build_generator("compact", num_feat=4, num_conv=2, act_type="relu")
    assert list(relu.state_dict()) == [f"body.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")]


@pytest.mark.parametrize("num_conv,scale", [(16, 4), (2, 2), (3, 1)])
def test_basicsr_weights_load_strict_and_their_shape_is_inferred(num_conv, scale, tmp_path):
    sd = basicsr_state_dict(3, num_feat=8, num_conv=num_conv, scale=scale)
    g = build_generator("compact", num_feat=8, num_conv=num_conv, scale=scale)
    g.load_state_dict(sd, strict=True)
    torch.save({"params": sd}, tmp_path / "realesr.pth")  # Real-ESRGAN's release layout
    loaded = load_generator(tmp_path / "realesr.pth")
    assert isinstance(loaded, SRVGGNetCompact)
    assert loaded.config == dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=num_conv, scale=scale,
                                 act_type="prelu")
    x = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), by_hand(sd, x, num_conv, scale), rtol=1e-5, atol=1e-6)


def test_files_without_metadata_and_their_errors(tmp_path):
    relu = basicsr_state_dict(3, num_feat=4, num_conv=2, scale=3, prelu=False)
    with pytest.raises(ValueError, match=r"no PReLU slopes.*pass act_type='relu' or act_type='leakyrelu'"):
        load_generator(relu)
    g = load_generator(relu, act_type="leakyrelu")
    assert (g.scale, g.config["num_conv"], g.config["act_type"]) == (3, 2, "leakyrelu")
    broken = dict(basicsr_state_dict(3, num_feat=4, num_conv=2, scale=2))
    del broken["body.3.weight"]  # a PReLU missing in the middle
    with pytest.raises(ValueError, match="not a Compact"):
        load_generator(broken)
    odd = basicsr_state_dict(3, num_feat=4, num_conv=1, scale=2)
    odd["body.4.weight"], odd["body.4.bias"] = torch.zeros(10, 4, 3, 3), torch.zeros(10)
    with pytest.raises(ValueError, match=r"makes 10 channels, not num_in_ch \(3\) x scale\*\*2"):
        load_generator(odd)


@pytest.mark.parametrize("path,fmt", [("g.pth", "raysr"), ("g.pth", "basicsr"), ("g.safetensors", "basicsr")])
def test_saved_files_round_trip(path, fmt, tmp_path):
    g = randomized(build_generator("compact", num_feat=5, num_conv=2, scale=2), seed=4)
    save_generator(g, tmp_path / path, fmt=fmt)
    loaded = load_generator(tmp_path / path)
    assert loaded.config == g.config
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), g(x))


def test_config_builds_it_and_checks_its_keys():
    cfg = load_config("quickstart", overrides=["model.generator.name=compact", "model.generator.num_conv=16",
                                               "model.generator.num_feat=8", "model.generator.scale=2"])
    g = generator_from_config(cfg.model.generator)
    assert g.config == dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=16, scale=2, act_type="prelu")
    with pytest.raises(ConfigError, match=r"model.generator.num_conv: 0 must be > 0"):
        load_config("quickstart", overrides=["model.generator.name=compact", "model.generator.num_conv=0"])
    with pytest.raises(ConfigError, match=r"model.generator.act_type: 'gelu' is not allowed"):
        load_config("quickstart", overrides=["model.generator.name=compact", "model.generator.act_type=gelu"])
    from raysr.tune.space import unused_reason  # a search over num_conv of another network is refused
    assert "only Compact has num_conv" in unused_reason(load_config("esrgan_psnr_x4").to_dict(),
                                                        "model.generator.num_conv", set())
    assert unused_reason(cfg.to_dict(), "model.generator.num_conv", set()) is None
    with pytest.raises(ConfigError, match=r"model.generator.scale: 8 is not supported by compact"):
        load_config("quickstart", overrides=["model.generator.name=compact", "model.generator.scale=8",
                                             "data.gt_size=64"])


def test_upscale_evaluate_and_interpolate_run_it(tmp_path):
    from raysr.evaluate import main as evaluate_main
    from raysr.interpolate import main as interpolate_main
    from raysr.upscale import main as upscale_main

    a = randomized(build_generator("compact", num_feat=4, num_conv=1, scale=2), seed=6)
    b = randomized(build_generator("compact", num_feat=4, num_conv=1, scale=2), seed=7)
    save_generator(a, tmp_path / "a.pth", fmt="basicsr")
    save_generator(b, tmp_path / "b.pth", fmt="raysr")
    (tmp_path / "hr").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 32, 3), dtype=np.uint8)).save(tmp_path / "hr" / "img.png")

    assert interpolate_main(["--psnr", str(tmp_path / "a.pth"), "--gan", str(tmp_path / "b.pth"), "--alpha", "0.5",
                             "--output", str(tmp_path / "mixed.pth")]) == 0
    mixed = load_generator(tmp_path / "mixed.pth")
    torch.testing.assert_close(mixed.state_dict()["body.1.weight"],
                               (a.state_dict()["body.1.weight"] + b.state_dict()["body.1.weight"]) / 2)

    assert upscale_main(["--model", str(tmp_path / "mixed.pth"), "--input", str(tmp_path / "hr"),
                         "--output", str(tmp_path / "sr")]) == 0
    x = torch.from_numpy(np.array(Image.open(tmp_path / "hr" / "img.png"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = (mixed(x)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    written = np.asarray(Image.open(next((tmp_path / "sr").iterdir())))
    assert written.shape == (60, 64, 3) and np.array_equal(written, expected)

    assert evaluate_main(["--hr", str(tmp_path / "hr"), "--scale", "2", "--model", str(tmp_path / "a.pth"),
                          "--json", str(tmp_path / "a.json")]) == 0
    assert '"arch": "compact"' in (tmp_path / "a.json").read_text()
