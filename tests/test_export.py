"""raysr.export: ONNX files that onnxruntime runs like the PyTorch generator, at any size, in float32
and float16, and raysr.upscale --model g.onnx."""

from __future__ import annotations

import numpy as np
import onnx
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
    assert "max |onnxruntime - PyTorch fp32|" in capsys.readouterr().err
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


# --------------------------------------------------------------------------- --fp16


@pytest.mark.parametrize("name,scale,size", [("rrdbnet", 4, None), ("rrdbnet", 2, None), ("srresnet", 3, None),
                                             ("compact", 4, None), ("vdsr", 2, (16, 12))])
def test_fp16_graph_takes_and_returns_float16_and_stays_near_pytorch_fp32(name, scale, size, tmp_path, make_image,
                                                                          capsys):
    model = tiny_generator(name, scale)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    save_png(tmp_path / "photo.png", make_image(18, 22, seed=2))
    argv = ["--model", str(tmp_path / "g.pth"), "--check-image", str(tmp_path / "photo.png")]
    argv += ["--size", f"{size[0]}x{size[1]}"] if size else []
    assert main(argv + ["--onnx", str(tmp_path / "g16.onnx"), "--fp16"]) == 0
    err = capsys.readouterr().err
    assert "fp16" in err and "max |onnxruntime - PyTorch fp32|" in err
    # what was checked is said as it was: float16 arithmetic, or on a provider that ran the ops in float32, not
    if "Casts added" in err:
        assert "float16 arithmetic itself was not run here" in err
    else:
        assert "; float16 arithmetic;" in err
    proto = onnx.load(tmp_path / "g16.onnx")
    assert {p.key: p.value for p in proto.metadata_props}["raysr_precision"] == "fp16"
    session = onnxruntime.InferenceSession(str(tmp_path / "g16.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float16)"
    # float16 weights: no float32 tensor left, half the float32 file's weight bytes
    assert main(argv + ["--onnx", str(tmp_path / "g32.onnx")]) == 0
    weights = [t for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert sum(len(t.raw_data) for t in weights) == sum(len(t.raw_data) for t in onnx.load(tmp_path / "g32.onnx")
                                                       .graph.initializer if t.data_type == onnx.TensorProto.FLOAT) / 2
    h, w = size or (14, 26)  # with no --size, a size and batch the export never saw
    x = torch.rand(3, 3, h, w)
    with torch.no_grad():
        want = model(x).numpy()
    got = session.run(None, {"lr": x.numpy().astype(np.float16)})[0]
    assert got.dtype == np.float16 and got.shape == want.shape
    # float16 rounding (11 significant bits) through a few layers: measured <= 7e-4 on these networks
    assert 0 < np.abs(got.astype(np.float64) - want).max() < 2e-3


def test_fp16_export_is_refused_when_an_activation_exceeds_float16(tmp_path, capsys):
    model = tiny_generator("srresnet", 3)
    with torch.no_grad():  # the same function, with activations 1e5 times larger inside: beyond float16's 65504
        model.conv_first.weight.mul_(1e5)
        model.conv_first.bias.mul_(1e5)
        model.conv_last.weight.mul_(1e-5)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    argv = ["--model", str(tmp_path / "g.pth"), "--onnx", str(tmp_path / "g.onnx")]
    assert main(argv + ["--fp16"]) == 1
    err = capsys.readouterr().err
    assert "--fp16 refused" in err and "beyond float16's largest value 65504" in err and "without --fp16" in err
    assert "(Conv2d) reaches" in err  # names the layer with the largest output
    assert not (tmp_path / "g.onnx").exists()
    assert main(argv) == 0  # float32 holds it


def test_upscale_runs_fp16_graphs_with_float16_or_float32_io(tmp_path, make_image):
    float16 = pytest.importorskip("onnxconverter_common.float16")
    model = tiny_generator("srresnet", 2)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    base = ["--model", str(tmp_path / "g.pth")]
    assert main(base + ["--onnx", str(tmp_path / "g16.onnx"), "--fp16"]) == 0
    assert main(base + ["--onnx", str(tmp_path / "g32.onnx")]) == 0
    # the other common fp16 layout: float32 input and output around float16 weights (onnxconverter-common)
    kept = float16.convert_float_to_float16(onnx.load(tmp_path / "g32.onnx"), keep_io_types=True)
    onnx.save(kept, tmp_path / "kept_io.onnx")
    assert onnxruntime.InferenceSession(str(tmp_path / "kept_io.onnx"), providers=["CPUExecutionProvider"]) \
        .get_inputs()[0].type == "tensor(float)"
    image = make_image(14, 18, seed=3)
    save_png(tmp_path / "in" / "a.png", image)
    want = expected_sr(model, image)
    for graph in ("g16", "kept_io"):
        out = tmp_path / graph
        assert upscale_main(["--model", str(tmp_path / f"{graph}.onnx"), "--input", str(tmp_path / "in"),
                             "--output", str(out)]) == 0
        diff = np.abs(np.asarray(Image.open(out / "a.png")).astype(int) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.05, graph  # float16 moves a few values by one level
