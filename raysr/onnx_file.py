"""Generators as ONNX files: export with dynamic height and width, verification with onnxruntime
against PyTorch, and :class:`OnnxGenerator`, which runs such a file wherever raysr runs a generator.

The graph has one input ``lr`` (N, 3, h, w) in [0, 1] and one output ``sr`` (N, 3, h*scale,
w*scale), not clamped, as the PyTorch forward: float32, or with ``fp16=True`` float16 weights, input
and output (the way Real-ESRGAN's and chaiNNer's fp16 files take and return float16).
:class:`OnnxGenerator` runs either, and also a graph with float32 input and output around float16
weights (what onnxconverter-common's ``keep_io_types=True`` makes): it feeds the input type the graph
declares. The file's metadata records ``raysr_scale`` (the upscaling factor), ``raysr_multiple`` (what
h and w must divide by: 2 or 4 for RRDBNet x2 / x1, which pixel-unshuffle their input) and
``raysr_precision``, so ``raysr.upscale --model g.onnx`` pads and tiles as for the PyTorch network.
The ``onnx``/``onnxruntime`` packages (the ``onnx`` extra) are imported only when a function here runs.

SRCNN and VDSR upsample with MATLAB bicubic inside the network, whose weights depend on the
input size; their graphs are exported for one fixed size (``size=(h, w)``).
"""

from __future__ import annotations

import copy
import io
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raysr import storage
from raysr.models import generator_name

OPSET = 17
# an export must match PyTorch's float32 output to this (max absolute difference, outputs in [0, 1] units).
# fp16: 2.55 levels of 8 bits. float16 keeps 11 significant bits, so rounding the output alone is up
# to 2**-12 ~ 2.4e-4 near 1, and the error grows with depth: an RRDBNet-23 with random weights measured
# 1.7e-3 through onnxruntime's CPU provider and 3.5e-3 in PyTorch's float16 arithmetic (docs/upscale-evaluate.md).
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}
FP16_MAX = 65504.0  # the largest finite float16
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


def export_onnx(model: nn.Module, size: tuple[int, int] | None = None, opset: int = OPSET,
                fp16: bool = False) -> bytes:
    """The ONNX file of ``model`` (a raysr generator, eval mode) as bytes.

    size: None = dynamic batch, height and width; (h, w) = a graph for inputs of that height and
    width only, any batch (required for SRCNN and VDSR). opset: the ONNX opset (>= 13).
    fp16: export a float16 copy of the model (``model`` itself is left as it is): float16 weights,
    arithmetic, input and output.
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
    # PyTorch's own float16 model, traced: every op exports in float16 as PyTorch runs it
    net = copy.deepcopy(model).half() if fp16 else model
    example = torch.rand(1, 3, h, w, dtype=torch.float16 if fp16 else torch.float32)
    dynamic = {"lr": {0: "batch"}, "sr": {0: "batch"}} if size else \
        {"lr": {0: "batch", 2: "height", 3: "width"}, "sr": {0: "batch", 2: "out_height", 3: "out_width"}}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # SRCNN/VDSR's bicubic weight matrices become constants of the fixed-size graph, as intended
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # TorchScript-based exporter: traces every raysr generator with dynamic axes in seconds
        # (the torch.export one needs onnxscript and minutes for a 23-block RRDBNet)
        torch.onnx.export(net.eval(), (example,), buf, input_names=["lr"], output_names=["sr"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    meta = {"raysr_scale": model.scale, "raysr_multiple": multiple, "raysr_arch": generator_name(model),
            "raysr_precision": "fp16" if fp16 else "fp32"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto.SerializeToString()


@dataclass
class Verification:
    """What :func:`verify_onnx` measured."""

    max_diff: float  # max |onnxruntime - PyTorch float32| over every input, in [0, 1] units
    finite: bool  # onnxruntime's outputs had no inf or NaN
    provider: str  # the onnxruntime execution provider that ran the graph
    # Cast nodes onnxruntime added to run float16 nodes it has no float16 kernel for in float32
    # (its CPU provider does so for Conv): that provider then checked no float16 arithmetic
    casts_added: int
    # the module of PyTorch's float32 forward with the largest output magnitude: (name, max |value|)
    peak: tuple[str, float]


def verify_onnx(data: bytes, model: nn.Module, inputs: Sequence[torch.Tensor]) -> Verification:
    """Run the ONNX graph ``data`` with onnxruntime (CUDA when it sees a GPU, else the CPU) and
    ``model`` in float32 on each (N, 3, h, w) input in [0, 1]; compare the outputs."""
    session = _session(data)
    dtype = _input_dtype(session)
    worst, finite, peak = 0.0, True, ("", 0.0)
    for x in inputs:
        with torch.no_grad(), _PeakActivation(model) as activations:
            want = model(x).numpy()
        peak = max(peak, activations.peak, key=lambda p: p[1])
        got = session.run(None, {"lr": x.numpy().astype(dtype)})[0]
        if got.shape != want.shape:
            raise OnnxError(f"the ONNX graph turned input {tuple(x.shape)} into {got.shape}, PyTorch into {want.shape}")
        finite = finite and bool(np.isfinite(got).all())
        diff = np.abs(got.astype(np.float64) - want)
        worst = max(worst, float(diff[np.isfinite(diff)].max(initial=0.0)))
    return Verification(worst, finite, session.get_providers()[0], _casts_added(data, session.get_providers()), peak)


class _PeakActivation:
    """Forward hooks on every module of a model: ``peak`` = (name, max |output|) of the largest output seen."""

    def __init__(self, model: nn.Module):
        self.model, self.peak, self.handles = model, ("", 0.0), []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_hook(self._hook(name or "the output")))
        return self

    def _hook(self, name: str):
        def record(module, args, out):
            if torch.is_tensor(out) and out.numel():
                value = float(out.detach().abs().max())
                value = math.inf if math.isnan(value) else value
                if value > self.peak[1]:
                    self.peak = (f"{name} ({type(module).__name__})", value)
        return record

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _casts_added(data: bytes, providers: list[str]) -> int:
    """How many Cast nodes onnxruntime adds to a graph with float16 weights to run it on ``providers``
    (0 for a float32 graph, without asking onnxruntime)."""
    onnx, ort = _require_onnx()
    exported = onnx.load_from_string(data)
    if not any(t.data_type == onnx.TensorProto.FLOAT16 for t in exported.graph.initializer):
        return 0
    with tempfile.TemporaryDirectory(prefix="raysr_onnx_") as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # no fusions: the graph as the providers run it, with the Casts of missing float16 kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = os.path.join(folder, "as_run.onnx")
        ort.InferenceSession(data, options, providers=providers)
        as_run = onnx.load(options.optimized_model_filepath)

    def casts(graph) -> int:
        return sum(node.op_type == "Cast" for node in graph.node)

    return casts(as_run.graph) - casts(exported.graph)


def _session(data: bytes):
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(data, options, providers=providers)


def _input_dtype(session) -> type:
    """The numpy type of the graph's input: float16 or float32."""
    declared = session.get_inputs()[0].type
    if declared not in ("tensor(float)", "tensor(float16)"):
        raise OnnxError(f"the graph's input is {declared}; raysr runs graphs that take float32 or float16")
    return np.float16 if declared == "tensor(float16)" else np.float32


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
        self.precision = meta.get("raysr_precision", "fp32")
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # where upscale_tensor looks for the device
        self.session = _session(data)
        self.input_dtype = _input_dtype(self.session)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("session")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.session = _session(self.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> (N, 3, h*scale, w*scale) float32 on ``x``'s device, whichever of
        float32 and float16 the graph takes and returns."""
        lr = x.detach().float().cpu().numpy().astype(self.input_dtype)
        out = self.session.run(None, {"lr": lr})[0]
        return torch.from_numpy(out.astype(np.float32)).to(x.device)


def load_onnx_generator(source: str | os.PathLike) -> OnnxGenerator:
    """The :class:`OnnxGenerator` in the file at a local path or s3:// URI."""
    return OnnxGenerator(storage.read_bytes(str(source)), str(source))
