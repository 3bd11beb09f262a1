"""The search-space language: a YAML file mapping dotted config keys to one distribution each,
checked against the config before Ray starts, and the config of one trial (base + sampled values).

    loss.adversarial.weight: {loguniform: [1.0e-4, 1.0e-2]}
    model.generator.num_block: {choice: [6, 12, 16, 23]}

Plain Python: only :meth:`Dimension.sampler` (building Tune's search-space objects) needs Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raysr.config import Config, ConfigError, config_from_dict, load_yaml, set_key
from raysr.storage import StorageError, is_s3, read_bytes

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SPACE_EXAMPLE = ("loss.adversarial.weight: {loguniform: [1.0e-4, 1.0e-2]}\n"
                 "model.generator.num_block: {choice: [6, 12, 16, 23]}")

# Set by the search for every trial; a space may not vary them.
MANAGED_KEYS = {"run.name": "each trial's run is named after its trial id",
                "run.storage": "trials run under <run.storage>/<search name>/runs",
                "run.num_workers": "every trial gets the same workers; set it with --set",
                "run.use_gpu": "every trial runs on the same devices; set it with --set"}
# Keys that change the generator's shape: train.init_from weights cannot fit all of their values.
SHAPE_KEYS = {f"model.generator.{k}" for k in ("name", "num_feat", "num_block", "num_grow_ch", "scale", "variant",
                                                       "num_conv", "act_type")}


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``dist`` in loguniform | uniform | randint | choice | grid.

    ``values`` is ``(low, high)`` for the ranges (randint: both inclusive) and the
    options for choice/grid. Options that are not scalars (e.g. a VGG layer map
    ``{conv2_2: 1.0}``) travel through Tune as their YAML flow text, which
    Optuna and the result tables can handle; :meth:`decode` turns them back.
    """

    key: str
    dist: str
    values: tuple

    def sampler(self):
        """The Tune search-space object for this key."""
        from ray import tune  # the space is parsed and checked without Ray; only Tune needs its samplers

        if self.dist == "loguniform":
            return tune.loguniform(*self.values)
        if self.dist == "uniform":
            return tune.uniform(*self.values)
        if self.dist == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        options = [self.encode(v) for v in self.values]
        return tune.choice(options) if self.dist == "choice" else tune.grid_search(options)

    def check_values(self) -> list:
        """Values that exercise every type the sampler can produce: bounds, an interior point, every option."""
        if self.dist == "loguniform":
            return [self.values[0], math.sqrt(self.values[0] * self.values[1]), self.values[1]]
        if self.dist == "uniform":
            return [self.values[0], (self.values[0] + self.values[1]) / 2, self.values[1]]
        return list(self.values)

    @staticmethod
    def encode(value):
        return label(value) if isinstance(value, (dict, list)) else value

    def decode(self, value):
        if self.dist in ("choice", "grid"):
            for option in self.values:
                if self.encode(option) == value:
                    return option
        return value

    def describe(self) -> str:
        return f"{self.key} ~ {self.dist} {label(list(self.values))}"


@dataclass(frozen=True)
class SearchSpace:
    dims: tuple[Dimension, ...]
    source: str  # where it was read from, for error messages
    raw: dict = field(compare=False)  # the mapping as written, saved with the search

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dims]

    @property
    def has_grid(self) -> bool:
        return any(d.dist == "grid" for d in self.dims)

    def param_space(self) -> dict:
        """Tune's ``param_space``: dotted config key -> sampler."""
        return {d.key: d.sampler() for d in self.dims}

    def decode(self, config: dict) -> dict:
        """A trial's Tune config -> {dotted key: config value}."""
        return {d.key: d.decode(config[d.key]) for d in self.dims}


def label(value) -> str:
    """Compact one-line YAML for a value: ``{conv2_2: 1.0}``, ``[6, 12]``, ``0.001``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def parse_space(text: str, source: str) -> SearchSpace:
    """A search space from YAML text mapping dotted config keys to one distribution each.

    Checks the structure (distribution names, bound order and types); whether
    the keys and values fit the config is :func:`check_space`'s job.
    Raises ConfigError naming ``source``, the key and the fix.
    """
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source} must map config keys to distributions, e.g.\n{SPACE_EXAMPLE}")
    dims = []
    for key, spec in raw.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not all(part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"{where}: not a dotted config key like loss.adversarial.weight")
        if key in MANAGED_KEYS:
            raise ConfigError(f"{where}: cannot be searched ({MANAGED_KEYS[key]})")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one distribution like {{loguniform: [1.0e-4, 1.0e-2]}}, "
                              f"got {spec!r}; distributions: {', '.join(DISTRIBUTIONS)}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        dims.append(Dimension(key, dist, _parse_args(where, dist, args)))
    return SearchSpace(tuple(dims), source, raw)


def _parse_args(where: str, dist: str, args) -> tuple:
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or len(args) < 2:
            raise ConfigError(f"{where}: {dist} needs a list of at least two values, got {args!r} "
                              "(a single value is a --set, not a search)")
        texts = [yaml.safe_dump(v) for v in args]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"{where}: {dist} lists a value twice: {args!r}")
        return tuple(args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: {dist} needs [low, high], got {args!r}")
    low, high = args
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: {dist} bounds must be numbers, got {args!r}")
    if dist == "randint" and not all(float(v).is_integer() for v in (low, high)):
        raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
    if not low < high:
        raise ConfigError(f"{where}: {dist} bounds must be increasing (low < high), got {args!r}")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform bounds must be > 0, got {args!r}; use uniform for ranges "
                          "that include 0")
    return (int(low), int(high)) if dist == "randint" else (float(low), float(high))


def load_space(path: str) -> SearchSpace:
    """Read and parse a space file (local path or s3:// URI). Raises ConfigError."""
    try:
        text = read_bytes(path if is_s3(path) else os.path.expanduser(path)).decode()
    except StorageError as err:
        shipped = sorted(p.name for p in Path("tune_spaces").glob("*.yaml"))
        hint = f"; spaces here: {', '.join('tune_spaces/' + n for n in shipped)}" if shipped else ""
        raise ConfigError(f"--space {path}: {err}{hint}") from err
    return parse_space(text, path)


def check_space(space: SearchSpace, base: dict) -> None:
    """Apply each dimension's bounds / interior point / options to the base config and validate.

    Catches unknown keys, values of the wrong type (a float range on an integer
    key) and values the config rejects (num_block 0). Raises ConfigError.
    """
    if base["train"].get("init_from"):
        shaped = [k for k in space.keys if k in SHAPE_KEYS]
        if shaped:
            raise ConfigError(
                f"{space.source}: {shaped[0]} changes the generator's shape, but train.init_from="
                f"{base['train']['init_from']} holds weights of one shape; unset it (--set train.init_from=null: "
                f"trials start from random weights) or remove {shaped[0]} from the space")
    for key in space.keys:
        reason = unused_reason(base, key, set(space.keys))
        if reason:
            raise ConfigError(f"{space.source}: {key} cannot change these trials: {reason}; remove it from the "
                              "space or change the base config")
    for dim in space.dims:
        if dim.dist in ("uniform", "loguniform") and _field_type(dim.key) is int:
            raise ConfigError(f"{space.source}: {dim.key} is an integer but {dim.dist} samples fractions; "
                              "use randint or choice")
        for value in dim.check_values():
            try:
                trial_config(base, {dim.key: value})
            except ConfigError as err:
                raise ConfigError(f"{space.source}: {dim.key}={label(value)} (from {dim.dist} "
                                  f"{label(list(dim.values))}) is not a valid config: {err}") from err


# (key prefix, governing key, the values of it that use the prefix, what to say otherwise)
_USED_WHEN = (
    ("loss.perceptual.", "train.phase", ("gan",), "the perceptual loss exists only in the GAN phase (train.phase=gan)"),
    ("loss.adversarial.", "train.phase", ("gan",), "the adversarial loss exists only in the GAN phase (train.phase=gan)"),
    ("model.discriminator.", "train.phase", ("gan",), "there is no discriminator without a GAN phase (train.phase=gan)"),
    ("optim.d.", "train.phase", ("gan",), "there is no discriminator without a GAN phase (train.phase=gan)"),
    ("train.d_init_steps", "train.phase", ("gan",), "D warm-up exists only in the GAN phase (train.phase=gan)"),
    ("model.generator.num_grow_ch", "model.generator.name", ("rrdbnet",), "only RRDBNet has a growth channel count"),
    ("model.generator.variant", "model.generator.name", ("srresnet",), "only SRResNet has variants"),
    ("model.generator.num_conv", "model.generator.name", ("compact",), "only Compact has num_conv"),
    ("model.generator.act_type", "model.generator.name", ("compact",), "only Compact chooses its activation"),
    ("model.discriminator.dense_feat", "model.discriminator.name", ("vgg",), "only the VGG discriminator has one"),
    ("model.discriminator.variant", "model.discriminator.name", ("vgg",), "only the VGG discriminator has variants"),
    ("optim.schedule.milestones", "optim.schedule.type", ("multistep",), "they apply to the multistep schedule only"),
    ("optim.schedule.gamma", "optim.schedule.type", ("multistep",), "it applies to the multistep schedule only"),
    ("optim.schedule.periods", "optim.schedule.type", ("cosine_restart",), "they apply to cosine_restart only"),
    ("optim.schedule.eta_min", "optim.schedule.type", ("cosine_restart",), "it applies to cosine_restart only"),
)


def unused_reason(base: dict, key: str, searched: set[str]) -> str | None:
    """Why ``key`` can have no effect on a run of the ``base`` config (a ``Config.to_dict()``), or None.

    A key whose governing key is itself searched may matter in some trials, so it passes.
    """
    def value(dotted):
        node = base
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    for prefix, governing, allowed, why in _USED_WHEN:
        if key.startswith(prefix) and governing not in searched and value(governing) not in allowed:
            return f"{why}, and the base config has {governing}={value(governing)}"
    perceptual = "loss.perceptual."
    if key.startswith(perceptual) and key != perceptual + "weight" and perceptual + "weight" not in searched \
            and value(perceptual + "weight") == 0:
        return "the perceptual loss is off in the base config (loss.perceptual.weight=0)"
    return None


def _field_type(key: str):
    """The annotation of a dotted config key (``int`` for model.generator.num_block), None if unknown."""
    tp = Config
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def trial_config(base: dict, params: dict, **run) -> Config:
    """The validated config of one trial: ``base`` (a ``Config.to_dict()``) with ``params``
    ({dotted key: value}) and ``run`` (fields of the run section) set."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_key(data, key, value)
    data["run"].update(run)
    return config_from_dict(data)
