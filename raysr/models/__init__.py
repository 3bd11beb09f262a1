"""Generators, discriminators and the VGG19 feature extractor, plus builders by name.

Generators map LR ``(N, C, h, w)`` float in [0, 1] to SR ``(N, C, h*scale, w*scale)``
and carry ``.scale`` and ``.config`` (the constructor arguments, which
``raysr.generator_file`` stores so a checkpoint rebuilds its own network).
"""

from __future__ import annotations

import inspect

from torch import nn

from raysr.models import compact, rrdbnet, srcnn, srresnet, vdsr
from raysr.models.compact import SRVGGNetCompact
from raysr.models.discriminators import VGG_INPUT_SIZES, UNetDiscriminatorSN, VGGDiscriminator
from raysr.models.rrdbnet import RRDBNet
from raysr.models.srcnn import SRCNN
from raysr.models.srresnet import SRResNet
from raysr.models.vdsr import VDSR
from raysr.models.vgg import VGGFeatureExtractor

GENERATORS: dict[str, type[nn.Module]] = {
    "srcnn": SRCNN,
    "vdsr": VDSR,
    "srresnet": SRResNet,
    "rrdbnet": RRDBNet,
    "compact": SRVGGNetCompact,
}
# upscaling factors each generator supports: the one table the config checks against
GENERATOR_SCALES: dict[str, tuple[int, ...]] = {"srcnn": srcnn.SCALES, "vdsr": vdsr.SCALES,
                                                "srresnet": srresnet.SCALES, "rrdbnet": rrdbnet.SCALES,
                                                "compact": compact.SCALES}
DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "vgg": VGGDiscriminator,
    "unet": UNetDiscriminatorSN,
}


def _build(kind: str, registry: dict[str, type[nn.Module]], name: str, kwargs: dict) -> nn.Module:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    cls = registry[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{kind} {name!r} does not take {unknown}; it accepts {accepted}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"{kind} {name!r}: {err}") from err


def build_generator(name: str, **kwargs) -> nn.Module:
    """A generator by name (``srcnn``, ``vdsr``, ``srresnet``, ``rrdbnet``, ``compact``) with its constructor kwargs.

    Raises ValueError for an unknown name (listing the known ones), an argument
    the network does not take (listing the ones it does) or a bad value.
    """
    return _build("generator", GENERATORS, name, kwargs)


def build_discriminator(name: str, **kwargs) -> nn.Module:
    """A discriminator by name (``vgg``, ``unet``) with its constructor kwargs; errors as build_generator."""
    return _build("discriminator", DISCRIMINATORS, name, kwargs)


def generator_from_config(g) -> nn.Module:
    """The generator a ``model.generator`` config section names (``raysr.config.GeneratorConfig``
    or anything with its fields), built with the arguments that network takes."""
    kwargs = {"srcnn": dict(scale=g.scale),
              "vdsr": dict(num_feat=g.num_feat, num_layer=g.num_block, scale=g.scale),
              "srresnet": dict(num_feat=g.num_feat, num_block=g.num_block, scale=g.scale, variant=g.variant),
              "rrdbnet": dict(num_feat=g.num_feat, num_block=g.num_block, num_grow_ch=g.num_grow_ch,
                              scale=g.scale),
              "compact": dict(num_feat=g.num_feat, num_conv=g.num_conv, scale=g.scale, act_type=g.act_type)}[g.name]
    return build_generator(g.name, **kwargs)


def discriminator_from_config(d, gt_size: int) -> nn.Module:
    """The discriminator a ``model.discriminator`` config section names (``DiscriminatorConfig``),
    for HR crops of ``gt_size`` px (the VGG one's input size)."""
    if d.name == "vgg":
        return build_discriminator("vgg", num_feat=d.num_feat, input_size=gt_size, dense_feat=d.dense_feat,
                                   variant=d.variant)
    return build_discriminator("unet", num_feat=d.num_feat)


def generator_name(model: nn.Module) -> str:
    """The registry name of a generator instance (``rrdbnet`` for an RRDBNet)."""
    for name, cls in GENERATORS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a raysr generator; known: "
                     f"{ {n: c.__name__ for n, c in GENERATORS.items()} }")


__all__ = ["GENERATORS", "GENERATOR_SCALES", "DISCRIMINATORS", "VGG_INPUT_SIZES", "build_generator", "build_discriminator", "generator_from_config",
           "discriminator_from_config", "generator_name",
           "SRCNN", "VDSR", "SRResNet", "RRDBNet", "SRVGGNetCompact", "VGGDiscriminator", "UNetDiscriminatorSN",
           "VGGFeatureExtractor"]
