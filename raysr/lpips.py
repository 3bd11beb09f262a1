"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", 2018), whenever its package is installed.

LPIPS needs three things: the ``lpips`` package (which imports torchvision), its
linear calibration weights (shipped inside the package) and the ImageNet backbone
(torchvision's AlexNet / VGG16 / SqueezeNet file). :func:`load_lpips` builds the network
with a random backbone (so torchvision downloads nothing itself) and loads the backbone
file from a path you give, or from the torch hub cache, where :mod:`raysr.hub` downloads
torchvision's file once, hash-checked, as torchvision would. When any piece is missing it returns
``None`` and the reason, and callers (``raysr.evaluate``, ``raysr.tune``) leave the
LPIPS column out.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from raysr import storage
from raysr.hub import WeightsHashError, WeightsUnavailable, cache_path, fetch

# torchvision's ImageNet files for the backbones LPIPS supports (names as torchvision saves them)
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
LPIPS_VERSION = "0.1"
TORCHVISION_MODELS = "https://download.pytorch.org/models"

LpipsFn = Callable[[torch.Tensor, torch.Tensor], np.ndarray]


def default_backbone_path(net: str) -> Path:
    """Where torchvision caches ``net``'s ImageNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return cache_path(backbone_url(net))


def backbone_url(net: str) -> str:
    """torchvision's published ImageNet file of ``net``, which LPIPS' backbone is."""
    return f"{TORCHVISION_MODELS}/{BACKBONE_FILES[net]}"


def _backbone_state(model: torch.nn.Module, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``features.I.*`` keys -> lpips' ``sliceK.I.*`` (its slices keep torchvision's indices)."""
    state = {}
    for name in model.state_dict():
        _, index, rest = name.split(".", 2)
        key = f"features.{index}.{rest}"
        if key not in features:
            raise KeyError(f"backbone file lacks {key!r} (has {sorted(features)[:4]}...)")
        state[name] = features[key]
    return state


def load_lpips(net: str = "alex", backbone: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> tuple[LpipsFn | None, str]:
    """``(fn, description)`` if LPIPS can run offline, else ``(None, reason)``.

    net: ``alex`` (the LPIPS default), ``vgg`` or ``squeeze``. backbone: torchvision
    ImageNet weights for that net (URL, local path or s3:// URI); default: torchvision's
    published file, from the torch hub cache or downloaded there once and hash-checked
    (:mod:`raysr.hub`; not with ``RAYSR_OFFLINE=1``).

    ``fn(sr, hr)``: two (N, 3, H, W) float tensors in [0, 1] -> (N,) float64 numpy
    distances (0 = identical, larger = perceptually further apart).
    """
    if net not in BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    try:
        import lpips
    except Exception as err:  # ImportError, or torchvision failing to load against this torch
        return None, (f"the lpips package is not importable ({type(err).__name__}: {err}); "
                      "pip install lpips (it needs a working torchvision)")
    linear = Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"
    if not linear.is_file():
        return None, f"lpips' calibration weights {linear} are missing; reinstall the lpips package"
    try:
        source = fetch(backbone if backbone is not None else backbone_url(net), f"LPIPS-{net} backbone weights")
    except (WeightsUnavailable, WeightsHashError) as err:
        return None, str(err)
    if not storage.exists(source):
        return None, f"no {net} backbone weights at {source}; pass the path of torchvision's {BACKBONE_FILES[net]}"
    try:
        features = torch.load(io.BytesIO(storage.read_bytes(source)), map_location="cpu", weights_only=True)
        # pnet_rand: build the backbone without torchvision's pretrained download
        model = lpips.LPIPS(net=net, version=LPIPS_VERSION, pretrained=True, pnet_rand=True, verbose=False)
        model.net.load_state_dict(_backbone_state(model.net, features), strict=True)
    except Exception as err:  # a wrong or corrupt file shows up as many error classes
        return None, f"could not build LPIPS-{net} from {source} ({type(err).__name__}: {err})"
    model = model.to(device).eval()

    def fn(sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            dist = model(sr.to(device, torch.float32), hr.to(device, torch.float32), normalize=True)
        return dist.reshape(-1).double().cpu().numpy()

    return fn, f"LPIPS v{LPIPS_VERSION} ({net}, backbone {source})"
