"""Pieces every network file shares: BasicSR's weight init and argument checks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from raysr.util import check_int  # re-exported: the networks import it from here

__all__ = ["default_init_weights", "check_int", "check_choice", "check_image_batch"]


@torch.no_grad()
def default_init_weights(modules: nn.Module | Iterable[nn.Module], scale: float = 1.0,
                         bias_fill: float = 0.0) -> None:
    """BasicSR's init: Kaiming-normal conv/linear weights multiplied by ``scale``,
    biases filled with ``bias_fill``, BatchNorm weight 1.

    ``scale`` = 0.1 keeps deep residual stacks (MSRResNet, RRDB) near identity at
    the start of training, which is what lets them train without BN.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.fill_(bias_fill)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, bias_fill)


def check_choice(name: str, value, allowed: Iterable) -> None:
    """ValueError naming ``name`` and the allowed values unless ``value`` is one of them."""
    allowed = list(allowed)
    # bool is an int subclass: True must not pass as scale 1
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_image_batch(x: torch.Tensor, num_ch: int, who: str) -> None:
    """ValueError unless ``x`` is an (N, num_ch, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != num_ch:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects an (N, {num_ch}, H, W) tensor, got {shape}")
