"""Generators as ONNX files: export with dynamic height and width, verification with onnxruntime
against PyTorch, and :class:`OnnxGenerator`, which runs such a file wherever raysr runs a generator.

The graph has one input ``lr`` (N, 3, h, w) float32 in [0, 1] and one output ``sr``
(N, 3, h*scale, w*scale), not clamped, as the PyTorch forward. The file's metadata records
``raysr_scale`` (the upscaling factor) and ``raysr_multiple`` (what h and w must divide by: 2 or 4 for
RRDBNet x2 / x1, which pixel-unshuffle their input), so ``raysr.upscale --model g.onnx`` pads
and tiles as for the PyTorch network. The ``onnx``/``onnxruntime`` packages (the ``onnx`` extra) are
imported only when a function here runs.

SRCNN and VDSR upsample with MATLAB bicubic inside the network, whose weights depend on the
input size; their graphs are exported for one fixed size (``size=(h, w)``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from raysr import storage
from raysr.models import generator_name

OPSET = 17
# fp32 export must match PyTorch to this (max absolute difference, outputs in [0, 1] units)
FP32_TOLERANCE = 1e-4
_FIXED_SIZE_ONLY = ("SRCNN", "VDSR")


class OnnxError(ValueError):
    """An ONNX file raysr cannot write, verify or run; the message says why and what to do."""


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise OnnxError(f"ONNX export and inference need the onnx and onnxruntime packages ({err}); "
                        "pip install 'raysr[onnx]' (or onnx onnxruntime)") from err
    return onnx, onnxruntime


def export_onnx(model: nn.Module, size: tuple[int, int] | None = None, opset: int = OPSET) -> bytes:
    """The ONNX file of ``model`` (a raysr generator, eval mode) as bytes.

    size: None = dynamic batch, height and width; (h, w) = a graph for inputs of that height and
    width only, any batch (required for SRCNN and VDSR). opset: the ONNX opset (>= 13).
    """
    onnx, _ = _require_onnx()
    name = type(model).__name__
    if size is None and name in _FIXED_SIZE_ONLY:
        raise OnnxError(f"{name} upsamples with MATLAB bicubic inside the network, whose weights depend on the "
                        "input size, so its graph cannot take any size; pass --size HxW to export it for one size")
    if opset < 13:
        raise OnnxError(f"--opset must be >= 13 (the first with the ops raysr's generators use), got {opset}")
    multiple = getattr(model, "unshuffle", 1)
    h, w = size or (8 * multiple, 8 * multiple)
    example = torch.rand(1, 3, h, w)
    dynamic = {"lr": {0: "batch"}, "sr": {0: "batch"}} if size else \
        {"lr": {0: "batch", 2: "height", 3: "width"}, "sr": {0: "batch", 2: "out_height", 3: "out_width"}}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # SRCNN/VDSR's bicubic weight matrices become constants of the fixed-size graph, as intended
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # TorchScript-based exporter: traces every raysr generator with dynamic axes in seconds
        # (the torch.export one needs onnxscript and minutes for a 23-block RRDBNet)
        torch.onnx.export(model.eval(), (example,), buf, input_names=["lr"], output_names=["sr"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    meta = {"raysr_scale": model.scale, "raysr_multiple": multiple, "raysr_arch": generator_name(model)}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto.SerializeToString()


def verify_onnx(data: bytes, model: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Max absolute difference between the ONNX graph ``data`` (run by onnxruntime on the CPU) and
    ``model`` on each (N, 3, h, w) input in [0, 1]."""
    session = _session(data)
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {"lr": x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxError(f"the ONNX graph turned input {tuple(x.shape)} into {got.shape}, PyTorch into {want.shape}")
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
    return worst


def _session(data: bytes):
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(data, options, providers=providers)


class OnnxGenerator(nn.Module):
    """An exported generator run by onnxruntime, shaped like raysr's PyTorch generators where
    :func:`raysr.inference.upscale_tensor` looks (``scale``, ``unshuffle``, a device), so
    ``raysr.upscale`` and ``raysr.evaluate`` run it unchanged. Picklable (Ray actors get the file's
    bytes and open their own session)."""

    def __init__(self, data: bytes, source: str = ""):
        super().__init__()
        onnx, _ = _require_onnx()
        meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        if "raysr_scale" not in meta:
            raise OnnxError(f"{source or 'this ONNX file'} was not exported by raysr (no raysr_scale in its metadata); "
                            "export the checkpoint with python -m raysr.export")
        self.data, self.source = data, source
        self.scale, self.unshuffle = int(meta["raysr_scale"]), int(meta.get("raysr_multiple", 1))
        self.arch = meta.get("raysr_arch", "onnx")
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # where upscale_tensor looks for the device
        self.session = _session(data)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("session")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session = _session(self.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"lr": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx_generator(source: str | os.PathLike) -> OnnxGenerator:
    """The :class:`OnnxGenerator` in the file at a local path or s3:// URI."""
    return OnnxGenerator(storage.read_bytes(str(source)), str(source))
