"""python -m raysr.interpolate: the written weights are (1 - alpha) * PSNR + alpha * GAN."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from raysr.generator_file import load_generator, save_generator
from raysr.interpolate import main

sys.path.insert(0, str(Path(__file__).parent))
from test_upscale import tiny_generator, to_esrgan_layouts  # noqa: E402


def run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture
def pair(tmp_path):
    """A PSNR net in the ESRGAN 2018 layout and a GAN net in BasicSR format: same architecture."""
    psnr, gan = tiny_generator("rrdbnet", 4, seed=1), tiny_generator("rrdbnet", 4, seed=2)
    psnr_sd = {k: v.clone() for k, v in psnr.state_dict().items()}
    gan_sd = {k: v.clone() for k, v in gan.state_dict().items()}
    torch.save(to_esrgan_layouts(psnr_sd, num_block=1)["esrgan_2018"], tmp_path / "psnr.pth")
    save_generator(gan, tmp_path / "gan.pth", fmt="basicsr")
    return psnr_sd, gan_sd


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_output_is_hand_mixed_weights(alpha, tmp_path, pair):
    psnr_sd, gan_sd = pair
    out = tmp_path / "mixed.pth"
    assert run(["--psnr", tmp_path / "psnr.pth", "--gan", tmp_path / "gan.pth", "--alpha", alpha,
                "--output", out]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "raysr" and saved["arch"] == "rrdbnet"
    assert set(saved["params"]) == set(psnr_sd)
    for key, value in saved["params"].items():
        want = (1 - alpha) * psnr_sd[key].double() + alpha * gan_sd[key].double()
        assert torch.allclose(value.double(), want, atol=1e-7), key
    assert load_generator(out).scale == 4


def test_basicsr_output_format(tmp_path, pair):
    psnr_sd, gan_sd = pair
    out = tmp_path / "mixed_basicsr.pth"
    assert run(["--psnr", tmp_path / "psnr.pth", "--gan", tmp_path / "gan.pth", "--alpha", 0.5,
                "--output", out, "--format", "basicsr"]) == 0
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"params"}
    key = "body.0.rdb2.conv3.weight"
    assert torch.allclose(saved["params"][key], (psnr_sd[key] + gan_sd[key]) / 2, atol=1e-7)


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, pair, capsys):
    save_generator(tiny_generator("srresnet", 4), tmp_path / "other.pth", fmt="basicsr")
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x02garbage")
    out = tmp_path / "out.pth"
    psnr, gan = tmp_path / "psnr.pth", tmp_path / "gan.pth"
    cases = [
        (["--psnr", psnr, "--gan", tmp_path / "other.pth", "--alpha", 0.5, "--output", out],
         "--psnr and --gan are different architectures"),
        (["--psnr", psnr, "--gan", tmp_path / "corrupt.pth", "--alpha", 0.5, "--output", out], "corrupt.pth"),
        (["--psnr", psnr, "--gan", tmp_path / "nope.pth", "--alpha", 0.5, "--output", out], "nope.pth"),
        (["--psnr", psnr, "--gan", tmp_path, "--alpha", 0.5, "--output", out], "gan.pth"),  # a directory
        (["--psnr", psnr, "--gan", gan, "--alpha", 1.2, "--output", out], "[0, 1]"),
        (["--psnr", psnr, "--gan", gan, "--alpha", 0.5, "--output", gan], "--gan checkpoint"),
    ]
    gan_bytes = gan.read_bytes()
    for argv, needle in cases:
        assert run(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
        assert not out.exists()
    assert gan.read_bytes() == gan_bytes


def test_scale_free_weights_need_model_scale(tmp_path, capsys):
    """SRCNN weights in BasicSR format do not record the scale; the error names the flag that gives it."""
    psnr, gan = tiny_generator("srcnn", 2, seed=1), tiny_generator("srcnn", 2, seed=2)
    save_generator(psnr, tmp_path / "psnr.pth", fmt="basicsr")
    save_generator(gan, tmp_path / "gan.pth", fmt="basicsr")
    argv = ["--psnr", tmp_path / "psnr.pth", "--gan", tmp_path / "gan.pth", "--alpha", 0.5,
            "--output", tmp_path / "mixed.pth"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "--psnr" in err and "--model-scale N" in err and not (tmp_path / "mixed.pth").exists()
    assert run(argv + ["--model-scale", 2]) == 0
    mixed = load_generator(tmp_path / "mixed.pth")
    assert mixed.scale == 2
    key = "conv2.weight"
    assert torch.allclose(mixed.state_dict()[key], (psnr.state_dict()[key] + gan.state_dict()[key]) / 2, atol=1e-7)


def test_safetensors_in_and_out(tmp_path, pair):
    """--gan given as .safetensors and --output written as .safetensors (the chaiNNer format)."""
    from safetensors.torch import load_file

    psnr_sd, gan_sd = pair
    save_generator(load_generator(tmp_path / "gan.pth"), tmp_path / "gan.safetensors", fmt="basicsr")
    out = tmp_path / "mixed.safetensors"
    assert run(["--psnr", tmp_path / "psnr.pth", "--gan", tmp_path / "gan.safetensors", "--alpha", 0.25,
                "--output", out]) == 0
    saved = load_file(str(out))
    assert set(saved) == set(psnr_sd)
    key = "body.0.rdb1.conv1.weight"
    assert torch.allclose(saved[key].double(), 0.75 * psnr_sd[key].double() + 0.25 * gan_sd[key].double(),
                          atol=1e-7)
    assert load_generator(out).scale == 4  # the architecture travels in the metadata
