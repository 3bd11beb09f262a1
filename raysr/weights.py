"""State dicts of raysr networks: wrapper prefixes, strict loading, and the raysr generator file.

The raysr generator file (``generator.pth`` of a run, ``save_generator(fmt="raysr")``)::

    {"format": "raysr", "version": 1, "arch": "rrdbnet", "kwargs": {...constructor arguments},
     "params": state_dict, "params_ema": state_dict (optional)}

is BasicSR's ``{"params", "params_ema"}`` plus the architecture, so BasicSR reads it
and raysr rebuilds the network without guessing. Both ``raysr.generator_file`` (generator
files in every layout) and ``raysr.run_checkpoint`` (a run's checkpoint folder) build on
this module, which imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from raysr.models import generator_name

RAYSR_FORMAT_VERSION = 1
# Prefixes wrappers put on every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        problems = [f"{label} {sample_keys(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"weights do not fit {what}: " + "; ".join(problems)
                         + ". Check the architecture arguments (pass overrides such as num_block=... or scale=...)")
    model.load_state_dict(state, strict=True)


def sample_keys(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def format_kwargs(kwargs: Mapping) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def cpu_state_dict(net: nn.Module | Mapping) -> dict[str, torch.Tensor]:
    if isinstance(net, nn.Module):
        state = unwrap(net).state_dict()
    elif is_state_dict(net):
        state = strip_wrapper_prefixes(dict(net))
    else:
        raise ValueError(f"expected an nn.Module or a state dict of tensors, got {type(net).__name__} "
                         "(for an EMA helper, pass its averaged module)")
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def check_compatible(sd_a: Mapping, sd_b: Mapping, name_a: str, name_b: str) -> None:
    """ValueError naming the first parameter that ``sd_a`` and ``sd_b`` do not share with one shape."""
    for key in list(sd_a) + [k for k in sd_b if k not in sd_a]:
        if key not in sd_a or key not in sd_b:
            lacking = name_a if key not in sd_a else name_b
            raise ValueError(f"{name_a} and {name_b} are different architectures: {key!r} is missing from {lacking}")
        if sd_a[key].shape != sd_b[key].shape:
            raise ValueError(f"{name_a} and {name_b} differ in shape at {key!r}: "
                             f"{tuple(sd_a[key].shape)} vs {tuple(sd_b[key].shape)}")


def generator_payload(model: nn.Module, ema: nn.Module | Mapping | None = None, fmt: str = "raysr") -> dict:
    """What a generator file holds: ``{"params"[, "params_ema"]}`` (fmt ``basicsr``), plus
    ``format``/``version``/``arch``/``kwargs`` (fmt ``raysr``). Tensors are CPU copies."""
    net = unwrap(model)
    payload: dict = {"params": cpu_state_dict(net)}
    if ema is not None:
        payload["params_ema"] = cpu_state_dict(ema)
        check_compatible(payload["params"], payload["params_ema"], "model", "ema")
    if fmt == "raysr":
        payload = {"format": "raysr", "version": RAYSR_FORMAT_VERSION, "arch": generator_name(net),
                   "kwargs": dict(net.config), **payload}
    return payload
