"""Generator checkpoints: load the formats found in the wild, save our own, interpolate.

``load_generator`` reads, from a local path, an ``s3://`` URI or an already
loaded dict, and always with ``torch.load(weights_only=True)`` (a checkpoint
never runs code):

* raysr: ``{"format": "raysr", "version": 1, "arch": "rrdbnet", "kwargs": {...},
  "params": state_dict, "params_ema": state_dict (optional)}``; the network is
  rebuilt from ``arch`` + ``kwargs``.
* BasicSR / Real-ESRGAN: ``{"params": sd, "params_ema": sd}`` or a bare state
  dict with BasicSR names (RRDBNet, MSRResNet; also raysr's SRResNet-paper,
  SRCNN and VDSR names).
* ESRGAN repository, newer names: ``conv_first``, ``RRDB_trunk.N.RDB1.conv1``,
  ``trunk_conv``, ``upconv1/2``, ``HRconv``, ``conv_last``.
* ESRGAN 2018 release: ``model.0`` (conv_first), ``model.1.sub.N.RDBk.convj.0``,
  ``model.1.sub.{num_block}`` (trunk conv), ``model.3/6/8/10``.
* MMSR's MSRResNet: ``recon_trunk.N.conv1``, ``HRconv``.
* A raysr training state (``state.pt`` of a run: ``step``, ``config``, ``g``,
  ``opt_g``, … and ``g_ema`` when EMA is on): the generator is rebuilt from the
  run's ``config["model"]["generator"]`` and loaded with ``g_ema``, else ``g``.

``params_ema`` is preferred over ``params``; ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes are dropped. Architecture hyper-parameters are read
off the tensor shapes; keyword overrides win over what was inferred.
"""

from __future__ import annotations

import copy
import io
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from raysr.config import GeneratorConfig
from raysr.engine import generator_from_config
from raysr.io import read_bytes, write_bytes
from raysr.models import GENERATORS, build_generator, generator_name

RAYSR_FORMAT_VERSION = 1
SAVE_FORMATS = ("basicsr", "raysr")
SUPPORTED = ("raysr {'format': 'raysr', 'arch', 'kwargs', 'params'[, 'params_ema']}; "
             "BasicSR {'params'[, 'params_ema']} or a bare state dict with BasicSR names "
             "(conv_first, body.N.rdb1.conv1 / body.N.conv1, conv_body, conv_up1, conv_hr, conv_last); "
             "ESRGAN repo (RRDB_trunk.N.RDB1.conv1, trunk_conv, upconv1, HRconv); "
             "ESRGAN 2018 release (model.0, model.1.sub.N.RDB1.conv1.0, model.3/6/8/10); "
             "MMSR MSRResNet (recon_trunk.N.conv1, HRconv); "
             "raysr training state.pt {'step', 'config', 'g'[, 'g_ema'], ...}")
# Prefixes wrappers put on every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

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
    missing / unexpected / mis-shaped parameters); raysr.io.StorageError when
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
        state = _strip_wrapper_prefixes(_pick_params(obj))
    elif _is_training_state(obj):
        model = _training_state_generator(obj["config"])
        if overrides:
            model = build_generator(generator_name(model), **{**model.config, **overrides})
        state = _strip_wrapper_prefixes(dict(obj["g_ema"] if _is_state_dict(obj.get("g_ema")) else obj["g"]))
        load_exact(model, state, f"{generator_name(model)}({_format_kwargs(model.config)})")
        return model.eval()
    else:
        state = _to_basicsr_names(_strip_wrapper_prefixes(_pick_params(obj)))
        arch, kwargs = _infer_arch(state, overrides)
    kwargs.update(overrides)
    model = build_generator(arch, **kwargs)
    load_exact(model, state, f"{arch}({_format_kwargs(kwargs)})")
    return model.eval()


def _read(uri: str | os.PathLike) -> object:
    data = read_bytes(uri)
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


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_training_state(obj: Mapping) -> bool:
    """A raysr.engine.TrainState.state_dict(): the run's config plus generator weights under ``g``."""
    return isinstance(obj.get("config"), Mapping) and _is_state_dict(obj.get("g"))


def _training_state_generator(config: Mapping) -> nn.Module:
    """The generator a run's saved config (``Config.to_dict()``) names, built as raysr.train built it."""
    model_cfg = config.get("model")
    g = model_cfg.get("generator") if isinstance(model_cfg, Mapping) else None
    if not isinstance(g, Mapping):
        raise ValueError(f"training state's config has no model.generator section (config keys: "
                         f"{_sample(config)}); the state.pt is not from raysr.train")
    if g.get("name") not in GENERATORS:
        raise ValueError(f"training state's model.generator.name {g.get('name')!r} is not a raysr generator; "
                         f"known: {sorted(GENERATORS)}")
    try:
        g_cfg = GeneratorConfig(**g)
    except TypeError as err:  # a key this raysr's GeneratorConfig does not have
        raise ValueError(f"training state's model.generator {dict(g)} does not fit this raysr version: {err}") from err
    return generator_from_config(g_cfg)


def _pick_params(obj: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict: params_ema, else params, else the dict itself."""
    for key in ("params_ema", "params"):
        if _is_state_dict(obj.get(key)):
            return dict(obj[key])
    if _is_state_dict(obj):
        return dict(obj)
    raise ValueError(f"unrecognised generator checkpoint: top-level keys {_sample(obj)} hold no state dict; "
                     f"supported: {SUPPORTED}")


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


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
                                 f"parameters found: {_sample(state)}")
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
        raise ValueError(f"checkpoint lacks {key!r}; parameters found: {_sample(state)}")
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
    if "conv_first.weight" in state and "conv_last.weight" in state and all(
            re.fullmatch(r"(conv_first|conv_last|body\.\d+)\.(weight|bias)", k) for k in state):
        w = _shape(state, "conv_first.weight")
        return "vdsr", dict(num_in_ch=w[1], num_out_ch=_shape(state, "conv_last.weight")[0], num_feat=w[0],
                            num_layer=_body_count(state, r"body\.(\d+)\.weight") + 2,
                            scale=_required_scale("VDSR", overrides))
    raise ValueError(f"unrecognised generator checkpoint layout; parameters found: {_sample(state)}; "
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


def _required_scale(arch: str, overrides: Mapping) -> int:
    if "scale" not in overrides:
        raise ValueError(f"{arch} works on the bicubic-upsampled image, so its weights do not record the scale; "
                         "pass scale=... (e.g. load_generator(path, scale=4))")
    return overrides["scale"]


def load_exact(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)`` with every key and shape required to match.

    Raises ValueError listing (a sample of) the missing, unexpected and
    mis-shaped parameters, so a wrong ``num_block`` or ``scale`` is obvious.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = [f"{label} {_sample(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"weights do not fit {what}: " + "; ".join(problems)
                         + ". Check the architecture arguments (pass overrides such as num_block=... or scale=...)")
    model.load_state_dict(state, strict=True)


def _sample(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def _format_kwargs(kwargs: Mapping) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# --------------------------------------------------------------------------- saving


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _cpu_state_dict(net: nn.Module | Mapping) -> dict[str, torch.Tensor]:
    if isinstance(net, nn.Module):
        state = unwrap(net).state_dict()
    elif _is_state_dict(net):
        state = _strip_wrapper_prefixes(dict(net))
    else:
        raise ValueError(f"expected an nn.Module or a state dict of tensors, got {type(net).__name__} "
                         "(for an EMA helper, pass its averaged module)")
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def save_generator(model: nn.Module, path: str | os.PathLike, fmt: str = "basicsr",
                   ema: nn.Module | Mapping | None = None) -> None:
    """Write ``model``'s weights to a local path or ``s3://`` URI (atomically).

    fmt ``"basicsr"``: ``{"params": sd}``, loadable by BasicSR / Real-ESRGAN too.
    fmt ``"raysr"``: adds ``format``, ``version``, ``arch`` and the constructor
    ``kwargs`` so ``load_generator`` rebuilds the network without guessing.
    ema: an EMA copy (module or state dict) stored as ``params_ema``, which
    ``load_generator`` prefers.
    """
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"fmt must be one of {list(SAVE_FORMATS)}, got {fmt!r}")
    net = unwrap(model)
    payload: dict = {"params": _cpu_state_dict(net)}
    if ema is not None:
        payload["params_ema"] = _cpu_state_dict(ema)
        check_compatible(payload["params"], payload["params_ema"], "model", "ema")
    if fmt == "raysr":
        payload = {"format": "raysr", "version": RAYSR_FORMAT_VERSION, "arch": generator_name(net),
                   "kwargs": dict(net.config), **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- interpolation


def check_compatible(sd_a: Mapping, sd_b: Mapping, name_a: str, name_b: str) -> None:
    """ValueError naming the first parameter that ``sd_a`` and ``sd_b`` do not share with one shape."""
    for key in list(sd_a) + [k for k in sd_b if k not in sd_a]:
        if key not in sd_a or key not in sd_b:
            lacking = name_a if key not in sd_a else name_b
            raise ValueError(f"{name_a} and {name_b} are different architectures: {key!r} is missing from {lacking}")
        if sd_a[key].shape != sd_b[key].shape:
            raise ValueError(f"{name_a} and {name_b} differ in shape at {key!r}: "
                             f"{tuple(sd_a[key].shape)} vs {tuple(sd_b[key].shape)}")


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
