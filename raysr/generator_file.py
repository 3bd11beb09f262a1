"""Generator checkpoints: load the formats found in the wild, save our own, interpolate.

``load_generator`` reads, from a local path, an ``s3://`` URI or an already
loaded dict, and always with ``torch.load(weights_only=True)`` or safetensors (a
checkpoint never runs code). Each layout below may also come as a ``.safetensors``
file (a flat state dict; raysr's keeps its architecture in the metadata):

* raysr: ``{"format": "raysr", "version": 1, "arch": "rrdbnet", "kwargs": {...},
  "params": state_dict, "params_ema": state_dict (optional)}``; the network is
  rebuilt from ``arch`` + ``kwargs``.
* BasicSR / Real-ESRGAN: ``{"params": sd, "params_ema": sd}`` or a bare state
  dict with BasicSR names (RRDBNet, MSRResNet, SRVGGNetCompact's ``body.N``; also
  raysr's SRResNet-paper, SRCNN and VDSR names).
* ESRGAN repository, newer names: ``conv_first``, ``RRDB_trunk.N.RDB1.conv1``,
  ``trunk_conv``, ``upconv1/2``, ``HRconv``, ``conv_last``.
* ESRGAN 2018 release: ``model.0`` (conv_first), ``model.1.sub.N.RDBk.convj.0``,
  ``model.1.sub.{num_block}`` (trunk conv), ``model.3/6/8/10``.
* MMSR's MSRResNet: ``recon_trunk.N.conv1``, ``HRconv``.
* A run's ``state.pt`` (:mod:`raysr.run_checkpoint` owns its layout and reads the
  generator out of it: the EMA copy when the run had one).

``params_ema`` is preferred over ``params``; ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes are dropped. Architecture hyper-parameters are read
off the tensor shapes; keyword overrides win over what was inferred.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from raysr import run_checkpoint
from raysr.storage import read_bytes, write_bytes
from raysr.models import build_generator
from raysr.weights import (RAYSR_FORMAT_VERSION, check_compatible, format_kwargs, generator_payload, is_state_dict,
                           load_exact, sample_keys, strip_wrapper_prefixes, unwrap)

SAVE_FORMATS = ("basicsr", "raysr")
SUPPORTED = ("raysr {'format': 'raysr', 'arch', 'kwargs', 'params'[, 'params_ema']}; "
             "BasicSR {'params'[, 'params_ema']} or a bare state dict with BasicSR names "
             "(conv_first, body.N.rdb1.conv1 / body.N.conv1, conv_body, conv_up1, conv_hr, conv_last; "
             "Compact: body.N only); "
             "ESRGAN repo (RRDB_trunk.N.RDB1.conv1, trunk_conv, upconv1, HRconv); "
             "ESRGAN 2018 release (model.0, model.1.sub.N.RDB1.conv1.0, model.3/6/8/10); "
             "MMSR MSRResNet (recon_trunk.N.conv1, HRconv); "
             "raysr training state.pt {'step', 'config', 'g'[, 'g_ema'], ...}")

# Older key layouts -> BasicSR names, as (pattern, replacement) rules applied to
# whole keys; a key that no rule of its layout matches is an error.
_ESRGAN_2018_RULES = (
    (r"model\.0\.(weight|bias)", r"conv_first.\1"),
    (r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)", r"body.\1.rdb\2.conv\3.\4"),
    (r"model\.1\.sub\.\d+\.(weight|bias)", r"conv_body.\1"),
    (r"model\.3\.(weight|bias)", r"conv_up1.\1"),
    (r"model\.6\.(weight|bias)", r"conv_up2.\1"),
    (r"model\.8\.(weight|bias)", r"conv_hr.\1"),
    (r"model\.10\.(weight|bias)", r"conv_last.\1"),
)
_ESRGAN_NEW_RULES = (
    (r"RRDB_trunk\.(\d+)\.RDB([123])\.(conv[1-5]\.(?:weight|bias))", r"body.\1.rdb\2.\3"),
    (r"trunk_conv\.(weight|bias)", r"conv_body.\1"),
    (r"upconv([12])\.(weight|bias)", r"conv_up\1.\2"),
    (r"HRconv\.(weight|bias)", r"conv_hr.\1"),
    (r"(conv_first|conv_last)\.(weight|bias)", r"\1.\2"),
)
_MMSR_MSRRESNET_RULES = (
    (r"recon_trunk\.(\d+)\.(conv[12]\.(?:weight|bias))", r"body.\1.\2"),
    (r"HRconv\.(weight|bias)", r"conv_hr.\1"),
    (r"(conv_first|upconv[12]|conv_last)\.(weight|bias)", r"\1.\2"),
)
# layout name, marker prefix that identifies it, rules
_LEGACY_LAYOUTS = (
    ("ESRGAN 2018 release", "model.1.sub.", _ESRGAN_2018_RULES),
    ("ESRGAN repo", "RRDB_trunk.", _ESRGAN_NEW_RULES),
    ("MMSR MSRResNet", "recon_trunk.", _MMSR_MSRRESNET_RULES),
)


# --------------------------------------------------------------------------- loading


def load_generator(source: str | os.PathLike | Mapping, **overrides) -> nn.Module:
    """The generator stored in ``source``, on CPU, in eval mode.

    source: local path, ``s3://bucket/key`` URI, or a dict already loaded with
    ``torch.load``. overrides: constructor arguments that replace the inferred
    ones (e.g. ``scale=4`` for SRCNN/VDSR weights, whose shapes do not record
    the scale, or ``num_in_ch`` when RRDBNet's scale is ambiguous).

    Raises ValueError for an unrecognised layout (naming the keys found and the
    supported formats) or weights that do not fit the network (naming the
    missing / unexpected / mis-shaped parameters); raysr.storage.StorageError when
    the file cannot be read.
    """
    obj = _read(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise ValueError(f"a generator checkpoint is a dict, got {type(obj).__name__}; supported: {SUPPORTED}")

    if obj.get("format") == "raysr":
        version = obj.get("version")
        if version != RAYSR_FORMAT_VERSION:
            raise ValueError(f"raysr checkpoint version {version!r} is not supported (this raysr reads version "
                             f"{RAYSR_FORMAT_VERSION}); upgrade raysr")
        arch, kwargs = obj.get("arch"), dict(obj.get("kwargs") or {})
        state = strip_wrapper_prefixes(_pick_params(obj))
    elif run_checkpoint.is_training_state(obj):
        return run_checkpoint.generator_of(obj, **overrides)
    else:
        state = _to_basicsr_names(strip_wrapper_prefixes(_pick_params(obj)))
        arch, kwargs = _infer_arch(state, overrides)
    kwargs.update(overrides)
    model = build_generator(arch, **kwargs)
    load_exact(model, state, f"{arch}({format_kwargs(kwargs)})")
    return model.eval()


def _read(uri: str | os.PathLike) -> object:
    data = read_bytes(uri)
    if is_safetensors(data):
        return _from_safetensors(data, uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors come in many classes
        # torch's message is a page long and suggests weights_only=False; keep the reason only
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")),
                      lines[0] if lines else type(err).__name__)
        raise ValueError(f"{uri} is not a plain weights file: torch.load(weights_only=True) refused it ({reason}). "
                         "raysr never unpickles code; if the file holds a pickled nn.Module, load it once in "
                         "trusted code and re-save its state_dict()") from err


def _pick_params(obj: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict: params_ema, else params, else the dict itself."""
    for key in ("params_ema", "params"):
        if is_state_dict(obj.get(key)):
            return dict(obj[key])
    if is_state_dict(obj):
        return dict(obj)
    raise ValueError(f"unrecognised generator checkpoint: top-level keys {sample_keys(obj)} hold no state dict; "
                     f"supported: {SUPPORTED}")


def _to_basicsr_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ESRGAN / MMSR layout to BasicSR names; BasicSR-named dicts pass through."""
    for layout, marker, rules in _LEGACY_LAYOUTS:
        if not any(k.startswith(marker) for k in state):
            continue
        out = {}
        for key, value in state.items():
            new = next((re.sub(f"^{p}$", r, key) for p, r in rules if re.fullmatch(p, key)), None)
            if new is None:
                raise ValueError(f"{layout} checkpoint has an unexpected parameter {key!r}; "
                                 f"parameters found: {sample_keys(state)}")
            if new in out:
                raise ValueError(f"{layout} checkpoint maps two parameters to {new!r} "
                                 f"(the second is {key!r}); it is not a single {layout} network")
            out[new] = value
        return out
    return state


def _body_count(state: Mapping, pattern: str) -> int:
    """Number of trunk blocks: indices N of keys matching ``pattern`` (which captures N), checked 0..n-1."""
    indices = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"trunk block indices {sorted(indices)} are not contiguous from 0; "
                         "the checkpoint is truncated or not a generator")
    return len(indices)


def _has(state: Mapping, pattern: str) -> bool:
    return any(re.fullmatch(pattern, k) for k in state)


def _shape(state: Mapping, key: str) -> torch.Size:
    if key not in state:
        raise ValueError(f"checkpoint lacks {key!r}; parameters found: {sample_keys(state)}")
    return state[key].shape


def _infer_arch(state: dict[str, torch.Tensor], overrides: Mapping) -> tuple[str, dict]:
    """(arch name, constructor kwargs) read off BasicSR-named tensor shapes."""
    if _has(state, r"body\.\d+\.rdb1\.conv1\.weight"):
        return "rrdbnet", _infer_rrdbnet(state, overrides)
    if _has(state, r"body\.\d+\.conv1\.weight") and "upconv1.weight" in state:
        paper = _has(state, r"body\.\d+\.bn1\.weight")
        num_feat = _shape(state, "conv_first.weight")[0]
        up = _shape(state, "upconv1.weight")[0] // num_feat
        scale = {4: 4 if "upconv2.weight" in state else 2, 9: 3}.get(up)
        if scale is None:
            raise ValueError(f"upconv1 has {up}x num_feat output channels; SRResNet has 4x (x2, x4) or 9x (x3)")
        return "srresnet", dict(num_in_ch=_shape(state, "conv_first.weight")[1],
                                num_out_ch=_shape(state, "conv_last.weight")[0], num_feat=num_feat,
                                num_block=_body_count(state, r"body\.(\d+)\.conv1\.weight"), scale=scale,
                                variant="paper" if paper else "msrresnet")
    if set(state) == {f"conv{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}:
        w1, w2, w3 = (_shape(state, f"conv{i}.weight") for i in (1, 2, 3))
        return "srcnn", dict(num_in_ch=w1[1], num_out_ch=w3[0], num_feat=(w1[0], w2[0]),
                             kernel_sizes=(w1[-1], w2[-1], w3[-1]), scale=_required_scale("SRCNN", overrides))
    if all(re.fullmatch(r"body\.\d+\.(weight|bias)", k) for k in state):
        return "compact", _infer_compact(state, overrides)
    if "conv_first.weight" in state and "conv_last.weight" in state and all(
            re.fullmatch(r"(conv_first|conv_last|body\.\d+)\.(weight|bias)", k) for k in state):
        w = _shape(state, "conv_first.weight")
        return "vdsr", dict(num_in_ch=w[1], num_out_ch=_shape(state, "conv_last.weight")[0], num_feat=w[0],
                            num_layer=_body_count(state, r"body\.(\d+)\.weight") + 2,
                            scale=_required_scale("VDSR", overrides))
    raise ValueError(f"unrecognised generator checkpoint layout; parameters found: {sample_keys(state)}; "
                     f"supported: {SUPPORTED}")


def _infer_rrdbnet(state: dict[str, torch.Tensor], overrides: Mapping) -> dict:
    num_block = _body_count(state, r"body\.(\d+)\.rdb1\.conv1\.weight")
    num_feat, in_total = _shape(state, "conv_first.weight")[:2]
    num_out_ch = _shape(state, "conv_last.weight")[0]
    # x2 / x1 pixel-unshuffle the input by 2 / 4, so conv_first sees 4x / 16x the channels
    factor = {4: 1, 2: 4, 1: 16}
    if "scale" in overrides:
        ratio = factor.get(overrides["scale"], 1)
        num_in_ch, scale = in_total // ratio, overrides["scale"]
    else:
        # without a hint, assume as many input as output channels (RGB -> RGB)
        num_in_ch = overrides.get("num_in_ch", num_out_ch)
        ratio = in_total / num_in_ch
        scale = next((s for s, f in factor.items() if f == ratio), None)
        if scale is None:
            raise ValueError(f"cannot tell RRDBNet's scale: conv_first takes {in_total} channels, which is not "
                             f"1, 4 or 16 x num_in_ch={num_in_ch}; pass scale=... and/or num_in_ch=...")
    return dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat,
                num_block=num_block, num_grow_ch=_shape(state, "body.0.rdb1.conv1.weight")[0], scale=scale)


def _infer_compact(state: dict[str, torch.Tensor], overrides: Mapping) -> dict:
    """SRVGGNetCompact's arguments from ``body.N`` shapes: convs at even N (4-D weights), channel-wise
    PReLU slopes at odd N (1-D weights; ReLU / LeakyReLU have none, so their N skip the odd numbers)."""
    indices = sorted({int(k.split(".")[1]) for k in state})
    convs = [i for i in indices if state[f"body.{i}.weight"].ndim == 4] if all(
        f"body.{i}.weight" in state for i in indices) else []
    slopes = [i for i in indices if i not in convs]
    last = indices[-1]
    if (not convs or convs != list(range(0, last + 1, 2)) or len(convs) < 2
            or (slopes and slopes != list(range(1, last, 2)))
            or any(state[f"body.{i}.weight"].ndim != 1 for i in slopes)):
        raise ValueError(f"body.N parameters {sample_keys(state)} are not a Compact (SRVGGNetCompact) generator: it "
                         "has 3x3 convs at body.0, body.2, ... and, with PReLU, their slopes at body.1, body.3, ...")
    num_feat, num_in_ch = _shape(state, "body.0.weight")[:2]
    act_type = "prelu" if slopes else overrides.get("act_type")
    if act_type is None:
        raise ValueError("this Compact generator has no PReLU slopes, so its activation was relu or leakyrelu and "
                         "its weights do not record which; pass act_type='relu' or act_type='leakyrelu'")
    out = _shape(state, f"body.{last}.weight")[0]
    # the last conv makes num_out_ch * scale**2 channels and num_out_ch = num_in_ch (the input is added)
    scale = round((out / num_in_ch) ** 0.5)
    if scale * scale * num_in_ch != out:
        raise ValueError(f"the last conv body.{last} makes {out} channels, not num_in_ch ({num_in_ch}) x scale**2; "
                         "this is not a Compact generator raysr can run")
    return dict(num_in_ch=num_in_ch, num_out_ch=num_in_ch, num_feat=num_feat, num_conv=len(convs) - 2,
                scale=scale, act_type=act_type)


def _required_scale(arch: str, overrides: Mapping) -> int:
    if "scale" not in overrides:
        raise ValueError(f"{arch} works on the bicubic-upsampled image, so its weights do not record the scale; "
                         "pass scale=... (e.g. load_generator(path, scale=4))")
    return overrides["scale"]


# --------------------------------------------------------------------------- safetensors


def is_safetensors(data: bytes) -> bool:
    """Whether ``data`` is a safetensors file: an 8-byte little-endian header length, then that
    many bytes of JSON (``{...}``). torch files are zip or pickle archives and never start so."""
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _from_safetensors(data: bytes, uri) -> dict:
    """A safetensors generator as a dict :func:`load_generator` reads: raysr's format when the
    file's metadata records it (see :func:`save_generator`), else the bare state dict."""
    from safetensors.torch import load

    try:
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        state = load(data)
    except Exception as err:  # safetensors raises its own error classes for a damaged file
        raise ValueError(f"{uri} is not a readable safetensors file ({type(err).__name__}: {err})") from err
    meta = header.get("__metadata__") or {}
    if meta.get("format") != "raysr":
        return state
    try:
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["kwargs"]).items()}
        version = int(meta["version"])
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{uri}: raysr safetensors metadata is damaged ({meta}); re-export the generator") from err
    return {"format": "raysr", "version": version, "arch": meta.get("arch"), "kwargs": kwargs, "params": state}


def _to_safetensors(payload: dict) -> bytes:
    """One flat state dict plus string metadata: the EMA weights when the payload has them (what
    inference wants, and what chaiNNer / traiNNer-redux files hold), else ``params``."""
    from safetensors.torch import save

    which = "params_ema" if "params_ema" in payload else "params"
    meta = None
    if payload.get("format") == "raysr":
        meta = {"format": "raysr", "version": str(payload["version"]), "arch": payload["arch"],
                "kwargs": json.dumps(payload["kwargs"]), "weights": which}
    return save({k: v.contiguous() for k, v in payload[which].items()}, metadata=meta)


# --------------------------------------------------------------------------- saving


def save_generator(model: nn.Module, path: str | os.PathLike, fmt: str = "basicsr",
                   ema: nn.Module | Mapping | None = None) -> None:
    """Write ``model``'s weights to a local path or ``s3://`` URI (atomically).

    fmt ``"basicsr"``: ``{"params": sd}``, loadable by BasicSR / Real-ESRGAN too.
    fmt ``"raysr"``: adds ``format``, ``version``, ``arch`` and the constructor
    ``kwargs`` so ``load_generator`` rebuilds the network without guessing.
    ema: an EMA copy (module or state dict) stored as ``params_ema``, which
    ``load_generator`` prefers.

    A path ending in ``.safetensors`` writes a safetensors file instead: one state dict
    (the EMA weights if ``ema`` is given, else the model's), with fmt ``"raysr"`` the
    architecture in its metadata; fmt ``"basicsr"`` gives the bare state dict that
    chaiNNer and the community trainers exchange.
    """
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"fmt must be one of {list(SAVE_FORMATS)}, got {fmt!r}")
    payload = generator_payload(model, ema, fmt)
    if str(path).endswith(".safetensors"):
        write_bytes(path, _to_safetensors(payload))
        return
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- interpolation


def _as_generator(net) -> nn.Module:
    return unwrap(net) if isinstance(net, nn.Module) else load_generator(net)


def interpolate(a, b, alpha: float) -> nn.Module:
    """ESRGAN network interpolation: θ = (1 − alpha)·θ_a + alpha·θ_b, as a new module in eval mode.

    a, b: generators of one architecture (typically a = PSNR-trained, b = GAN-
    trained), each an nn.Module or anything ``load_generator`` reads.
    alpha: in [0, 1]; 0 gives a, 1 gives b. Floating-point buffers (BN running
    statistics) are mixed too; integer ones (BN batch counters) are taken from a.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (0 = first network, 1 = second), got {alpha!r}")
    net_a, net_b = _as_generator(a), _as_generator(b)
    sd_a, sd_b = net_a.state_dict(), net_b.state_dict()
    check_compatible(sd_a, sd_b, "a", "b")
    # equal shapes can still hide different networks (SRCNN x2 vs x4)
    if type(net_a) is not type(net_b):
        raise ValueError(f"cannot interpolate a {type(net_a).__name__} with a {type(net_b).__name__}")
    config_a, config_b = getattr(net_a, "config", None), getattr(net_b, "config", None)
    if config_a != config_b:
        raise ValueError(f"cannot interpolate networks built differently: {config_a} vs {config_b}")
    mixed = {k: torch.lerp(v, sd_b[k].to(v.dtype), float(alpha)) if v.is_floating_point() else v
             for k, v in sd_a.items()}
    out = copy.deepcopy(net_a)
    out.load_state_dict(mixed)
    return out.eval()
