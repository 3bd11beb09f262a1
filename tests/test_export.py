"""raysr.export: ONNX files that onnxruntime runs like the PyTorch generator, at any size, and
raysr.upscale --model g.onnx."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from raysr.export import main
from raysr.generator_file import save_generator
from raysr.upscale import main as upscale_main
from test_upscale import assert_close_uint, expected_sr, save_png, tiny_generator


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name,scale", [("rrdbnet", 4), ("rrdbnet", 2), ("srresnet", 3), ("compact", 4)])
def test_exported_graph_runs_any_size_like_pytorch(name, scale, tmp_path, make_image, capsys):
    model = tiny_generator(name, scale)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    save_png(tmp_path / "photo.png", make_image(18, 22, seed=2))
    assert main(["--model", str(tmp_path / "g.pth"), "--onnx", str(tmp_path / "g.onnx"),
                 "--check-image", str(tmp_path / "photo.png")]) == 0
    assert "max |onnxruntime - PyTorch|" in capsys.readouterr().err
    x = torch.rand(3, 3, 14, 26)  # a size and batch the export never saw
    with torch.no_grad():
        want = model(x).numpy()
    got = ort_run(tmp_path / "g.onnx", x)
    assert got.shape == (3, 3, 14 * scale, 26 * scale)
    assert np.abs(got - want).max() < 1e-4


def test_srcnn_exports_for_one_size(tmp_path, capsys):
    model = tiny_generator("srcnn", 3)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    argv = ["--model", str(tmp_path / "g.pth"), "--onnx", str(tmp_path / "g.onnx")]
    assert main(argv) == 2
    assert "pass --size HxW" in capsys.readouterr().err and not (tmp_path / "g.onnx").exists()
    assert main(argv + ["--size", "16x12"]) == 0
    x = torch.rand(1, 3, 16, 12)
    with torch.no_grad():
        assert np.abs(ort_run(tmp_path / "g.onnx", x) - model(x).numpy()).max() < 1e-4


def test_bad_export_options(tmp_path, capsys):
    save_generator(tiny_generator("srresnet", 2), tmp_path / "g.pth", fmt="raysr")
    for extra, needle in ((["--onnx", str(tmp_path / "g.bin")], "name the file *.onnx"),
                          (["--onnx", str(tmp_path / "g.onnx"), "--size", "12"], "--size takes HxW"),
                          (["--onnx", str(tmp_path / "g.onnx"), "--opset", "9"], "--opset must be >= 13")):
        assert main(["--model", str(tmp_path / "g.pth")] + extra) == 2
        assert needle in capsys.readouterr().err, extra
    assert not (tmp_path / "g.onnx").exists()


def test_upscale_runs_an_onnx_model(tmp_path, make_image, capsys):
    model = tiny_generator("rrdbnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    assert main(["--model", str(tmp_path / "g.pth"), "--onnx", str(tmp_path / "g.onnx")]) == 0
    image = make_image(14, 18, seed=3)
    save_png(tmp_path / "in" / "a.png", image)
    args = ["--model", str(tmp_path / "g.onnx"), "--input", str(tmp_path / "in")]
    assert upscale_main(args + ["--output", str(tmp_path / "o")]) == 0
    assert_close_uint(np.asarray(Image.open(tmp_path / "o" / "a.png")), expected_sr(model, image))
    assert upscale_main(args + ["--output", str(tmp_path / "t"), "--tile", "8"]) == 0
    assert np.abs(np.asarray(Image.open(tmp_path / "t" / "a.png")).astype(int)
                  - np.asarray(Image.open(tmp_path / "o" / "a.png")).astype(int)).max() <= 1
    assert upscale_main(args + ["--output", str(tmp_path / "p"), "--precision", "bf16"]) == 2
    assert "leave --precision out" in capsys.readouterr().err
