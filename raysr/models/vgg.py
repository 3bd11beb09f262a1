"""Frozen VGG19 feature extractor for perceptual losses.

SRGAN (Ledig et al. 2017) compares VGG19 features φ5,4 taken after the ReLU;
ESRGAN (Wang et al. 2018, sec. 3.3) takes conv5_4 *before* its ReLU, where the
features are denser. Both use the ImageNet-trained VGG19 whose standard copy is
torchvision's ``vgg19-dcbb9e9d.pth`` (keys ``features.N.weight/bias``). It is
read from the torch hub cache where torchvision stores it, downloaded there once
and hash-checked when missing (:mod:`raysr.hub`, as torchvision does), or read
from any http(s) URL, local path or s3:// URI — torchvision itself is never
imported (it does not load against CPU-only torch).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from raysr.hub import WeightsUnavailable, fetch
from raysr.storage import StorageError, read_bytes

TORCHVISION_VGG19_FILE = "vgg19-dcbb9e9d.pth"
TORCHVISION_VGG19_URL = f"https://download.pytorch.org/models/{TORCHVISION_VGG19_FILE}"
# torchvision's ImageNet preprocessing; its VGG weights expect inputs normalised this way.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0

# VGG19 is configuration "E" of Simonyan & Zisserman (2015): per block
# (output channels, number of 3x3 convs), each block closed by a 2x2 max pool.
_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


def _layer_specs() -> tuple[tuple[str, str, int, int], ...]:
    """(name, kind, in_channels, out_channels) per layer, in torchvision's ``features`` order."""
    specs, in_ch = [], 3
    for block, (ch, num_conv) in enumerate(_BLOCKS, start=1):
        for i in range(1, num_conv + 1):
            specs.append((f"conv{block}_{i}", "conv", in_ch, ch))
            specs.append((f"relu{block}_{i}", "relu", ch, ch))
            in_ch = ch
        specs.append((f"pool{block}", "pool", ch, ch))
    return tuple(specs)


_SPECS = _layer_specs()
# VGG19_LAYERS[i] names torchvision's ``vgg19().features[i]`` (conv5_4 = 34, relu5_4 = 35).
VGG19_LAYERS: tuple[str, ...] = tuple(name for name, *_ in _SPECS)
# Every parameter of a torchvision vgg19 ``features`` state dict and its shape.
_PARAM_SHAPES: dict[str, tuple[int, ...]] = {
    f"features.{i}.{param}": (cout, cin, 3, 3) if param == "weight" else (cout,)
    for i, (_, kind, cin, cout) in enumerate(_SPECS) if kind == "conv"
    for param in ("weight", "bias")
}


def _how_to_provide() -> str:
    return (f"Copy torchvision's {TORCHVISION_VGG19_FILE} (from {TORCHVISION_VGG19_URL}, or from "
            "~/.cache/torch/hub/checkpoints/ of a machine where torchvision.models.vgg19(weights='IMAGENET1K_V1') "
            f"ran) into {Path(torch.hub.get_dir()) / 'checkpoints'}/, or pass a URL, local path or s3:// URI "
            "via loss.perceptual.weights_path.")


def _preview(keys: Iterable[str], limit: int = 6) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def cached_vgg19_path() -> Path:
    """Path of torchvision's VGG19 file in the torch hub cache (``$TORCH_HOME/hub/checkpoints``).

    Raises FileNotFoundError, saying where it looked and how to provide the file,
    when no ``vgg19-*.pth`` is there.
    """
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    preferred = ckpt_dir / TORCHVISION_VGG19_FILE
    if preferred.is_file():
        return preferred
    # Same weights under another hash suffix (e.g. re-saved); "vgg19-*" excludes vgg19_bn.
    found = sorted(ckpt_dir.glob("vgg19-*.pth"))
    if found:
        return found[0]
    raise FileNotFoundError(
        f"VGG19 ImageNet weights not found: no vgg19-*.pth in {ckpt_dir} (the torch hub cache; "
        f"TORCH_HOME moves it). {_how_to_provide()}")


def _check_state_dict(state: object, source: str) -> dict[str, Tensor]:
    """The ``features.N.weight/bias`` entries of a torchvision-layout VGG19 state dict.

    Unwraps a ``{"state_dict": ...}`` or ``{"params": ...}`` wrapper; ignores
    non-``features`` keys (torchvision's ``classifier.*``); raises ValueError
    naming missing, unexpected or wrongly shaped keys.
    """
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "params"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"VGG19 weights from {source} are a {type(state).__name__}, expected a state dict "
                         f"with torchvision's features.N.weight/bias keys. {_how_to_provide()}")
    features = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    missing = [k for k in _PARAM_SHAPES if k not in features]
    unexpected = [k for k in features if k not in _PARAM_SHAPES]
    if missing or unexpected:
        raise ValueError(
            f"{source} is not a torchvision VGG19 state dict: missing keys [{_preview(missing)}], "
            f"unexpected keys [{_preview(unexpected)}] (a vgg16 or vgg19_bn file?). {_how_to_provide()}")
    bad = [f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__} != {shape}"
           for k, shape in _PARAM_SHAPES.items()
           if not isinstance(v := features[k], Tensor) or tuple(v.shape) != shape]
    if bad:
        raise ValueError(f"{source} has VGG19 tensors of the wrong shape: {_preview(bad)}. {_how_to_provide()}")
    return {k: features[k] for k in _PARAM_SHAPES}


def load_vgg19_weights(source: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Torchvision-layout VGG19 ``features`` weights (32 tensors, ``features.N.weight/bias``) on CPU.

    ``source`` is an http(s) URL (downloaded once into the torch hub cache, hash-checked),
    a local path or ``s3://bucket/key``; None or torchvision's URL first looks for any
    ``vgg19-*.pth`` in the hub cache (:func:`cached_vgg19_path`), then downloads
    torchvision's file. ``classifier.*`` entries are dropped. Raises FileNotFoundError
    (not cached and not downloadable here: offline), StorageError (unreadable source) or
    ValueError (hash mismatch, not a VGG19 state dict), each saying how to provide the file.
    """
    source = resolve_vgg19_source(source)
    try:
        data = read_bytes(source)
    except StorageError as err:
        raise StorageError(f"cannot read VGG19 weights: {err}. {_how_to_provide()}") from err
    try:
        # weights_only: a weights file from a bucket must not be able to run code.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many classes
        raise ValueError(f"{source} is not a loadable PyTorch state dict ({err}). {_how_to_provide()}") from err
    return _check_state_dict(state, str(source))


def resolve_vgg19_source(source: str | os.PathLike | None = None) -> str:
    """Where to read VGG19 weights ``source`` from (see :func:`load_vgg19_weights`), downloading
    an http(s) file into the hub cache first. Raises FileNotFoundError (with how to provide the
    file) or :class:`raysr.hub.WeightsHashError`."""
    if source is None or str(source) == TORCHVISION_VGG19_URL:
        try:
            return str(cached_vgg19_path())
        except FileNotFoundError:
            source = TORCHVISION_VGG19_URL
    try:
        return fetch(source, "VGG19 ImageNet weights")
    except WeightsUnavailable as err:
        raise WeightsUnavailable(f"VGG19 ImageNet weights not found: {err} with loss.perceptual.weights_path") from err


def _make_layer(kind: str, in_ch: int, out_ch: int) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
    if kind == "relu":
        # Not inplace: an in-place ReLU would overwrite the conv output that
        # ESRGAN's before-ReLU perceptual loss reads.
        return nn.ReLU(inplace=False)
    return nn.MaxPool2d(kernel_size=2, stride=2)


class VGGFeatureExtractor(nn.Module):
    """Frozen VGG19 returning the activations of the requested layers.

    Args:
        layer_names: names from :data:`VGG19_LAYERS` (e.g. ``"conv5_4"`` before
            ReLU, ``"relu5_4"`` after); the network is built only up to the deepest.
        weights: a torchvision-layout state dict, a local path / s3:// URI of one,
            or None for the torch hub cache (:func:`load_vgg19_weights`).
        allow_random_weights: when ``weights`` is None and nothing is cached, warn
            and use a deterministic random init (seed ``RANDOM_INIT_SEED``)
            instead of raising — for tests only; the loss is meaningless then.
        use_input_norm: normalise inputs with the ImageNet mean/std the weights expect.
        range_norm: inputs are in [-1, 1]; map them to [0, 1] first.

    ``random_weights`` tells whether the random init is in use. The module stays
    in eval mode and its parameters never require grad.
    """

    def __init__(self, layer_names: str | Iterable[str],
                 weights: Mapping[str, Tensor] | str | os.PathLike | None = None,
                 allow_random_weights: bool = False, use_input_norm: bool = True, range_norm: bool = False):
        super().__init__()
        names = [layer_names] if isinstance(layer_names, str) else list(layer_names)
        if not names:
            raise ValueError(f"layer_names is empty; give at least one of: {', '.join(VGG19_LAYERS)}")
        unknown = [n for n in names if n not in VGG19_LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG19 layer(s) {unknown}; valid names: {', '.join(VGG19_LAYERS)}")
        self.layer_names = tuple(dict.fromkeys(names))  # drop repeats, keep order
        self.use_input_norm = use_input_norm
        self.range_norm = range_norm
        state = self._resolve_weights(weights, allow_random_weights)  # fail before building anything

        depth = max(VGG19_LAYERS.index(n) for n in self.layer_names) + 1
        self.features = nn.Sequential(*(_make_layer(kind, cin, cout) for _, kind, cin, cout in _SPECS[:depth]))
        # Each max pool halves H and W; smaller inputs would reach a zero-sized map.
        self.min_size = 2 ** sum(kind == "pool" for _, kind, _, _ in _SPECS[:depth])
        self.deepest_layer = VGG19_LAYERS[depth - 1]
        # Non-persistent: the state dict stays exactly torchvision's layout.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.random_weights = state is None
        if state is None:
            self._random_init()
        else:
            self.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[1]) < depth})
        self.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _resolve_weights(weights, allow_random_weights: bool) -> dict[str, Tensor] | None:
        if isinstance(weights, Mapping):
            return _check_state_dict(weights, "the given state dict")
        if weights is not None and str(weights) != TORCHVISION_VGG19_URL:
            return load_vgg19_weights(weights)
        try:
            return load_vgg19_weights(None)
        except FileNotFoundError as err:
            if not allow_random_weights:
                raise
            warnings.warn(f"{err} Using randomly initialised VGG19 weights because allow_random_weights=True; "
                          "perceptual losses computed with them are meaningless outside tests.", stacklevel=3)
            return None

    @torch.no_grad()
    def _random_init(self) -> None:
        # torchvision's VGG init (Kaiming normal, fan_out, zero bias) drawn from a
        # private generator: reproducible, and the global RNG is left untouched.
        # Layers are drawn in order, so a shallower extractor equals a prefix of a deeper one.
        gen = torch.Generator().manual_seed(RANDOM_INIT_SEED)
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                fan_out = layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * math.sqrt(2.0 / fan_out))
                layer.bias.zero_()

    def train(self, mode: bool = True) -> VGGFeatureExtractor:
        """Always eval: the extractor is frozen, whatever the enclosing model's mode."""
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(N,3,H,W) float in [0,1] ([-1,1] with range_norm), H and W >= ``min_size``
        -> {layer name: (N,C,H/2^p,W/2^p) activation} for each requested layer."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19 expects (N,3,H,W) RGB images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than {self.min_size}x{self.min_size}, "
                             f"the least that reaches {self.deepest_layer} through the max pools; use larger crops")
        if self.range_norm:
            x = (x + 1) / 2
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        wanted = set(self.layer_names)
        out = {}
        for name, layer in zip(VGG19_LAYERS, self.features):
            x = layer(x)
            if name in wanted:
                out[name] = x
        return out
