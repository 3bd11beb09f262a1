"""The one typed training config: dataclasses, preset/YAML loading, ``--set`` overrides, validation.

A config is built once, before Ray starts::

    cfg = load_config(preset="esrgan_x4", overrides=["data.train=s3://bucket/shards", "run.num_workers=8"])

Every key a user can set is a dataclass field below; the dotted names
(``loss.adversarial.weight``, ``run.storage`` …) are the documented contract.
Errors raise :class:`ConfigError` with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Optional, Union

import yaml

from raysr.models.vgg import TORCHVISION_VGG19_URL

DEFAULT_PRESET = "quickstart"
PSNR_PHASE = "psnr"  # train.init_from=psnr: run the PSNR phase first (raysr.train)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


# --------------------------------------------------------------------------- schema


@dataclass
class GeneratorConfig:
    name: Literal["srcnn", "vdsr", "srresnet", "rrdbnet", "compact"] = "rrdbnet"
    num_feat: int = 64
    num_block: int = 23  # srresnet: residual blocks; rrdbnet: RRDBs; vdsr: conv layers
    num_grow_ch: int = 32  # rrdbnet only
    scale: int = 4
    variant: Literal["msrresnet", "paper"] = "msrresnet"  # srresnet only
    num_conv: int = 32  # compact only: hidden convs (realesr-general-x4v3 32, animevideov3 16)
    act_type: Literal["prelu", "relu", "leakyrelu"] = "prelu"  # compact only


@dataclass
class DiscriminatorConfig:
    name: Literal["vgg", "unet"] = "vgg"
    num_feat: int = 64
    dense_feat: int = 100  # vgg only: 100 (ESRGAN/BasicSR) or 1024 (SRGAN paper)
    # vgg only: basicsr = BasicSR's VGGStyleDiscriminator (ESRGAN: 10 convs, 4x4 stride 2);
    # paper = SRGAN paper Fig. 4 (8 convs 3x3, stride 1/2 alternating, 64 -> 512 channels)
    variant: Literal["basicsr", "paper"] = "basicsr"


@dataclass
class ModelConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class DataConfig:
    # Shard URLs / brace patterns / a directory / a manifest.parquet, local or s3://.
    # Empty = the built-in demo shards made from sample photographs.
    train: list[str] = field(default_factory=list)
    val: Optional[str] = None  # folder (or shards) of full HR images; None = demo hold-out
    # folder of the LR images of data.val (real pairs), paired by name; None = LR by bicubic of data.val
    val_lr: Optional[str] = None
    gt_size: int = 128
    batch_size: int = 16  # per Ray worker
    num_workers: int = 4  # DataLoader processes per Ray worker
    crops_per_image: int = 1
    # Where LR = bicubic(HR) is made (paired: where both crops are flipped and made float): auto = on
    # the GPU when training on one (the loader processes then only decode and crop), in the loader
    # processes on CPU.
    lr_on: Literal["auto", "loader", "device"] = "auto"
    # How LR inputs are made: bicubic = exact MATLAB bicubic of the HR crop (SRGAN/ESRGAN);
    # realesrgan = Real-ESRGAN's second-order degradations, set by the degradation section;
    # paired = none: the shards hold each sample's own LR (KEY.lr.png + KEY.hr.png, make_shards --lr-input)
    degradation: Literal["bicubic", "realesrgan", "paired"] = "bicubic"


@dataclass
class DegradationConfig:
    """Real-ESRGAN's degradations (``data.degradation: realesrgan``), with the defaults of its
    train_realesrnet_x4plus.yml / train_realesrgan_x4plus.yml; read by raysr.degradation, see
    docs/real-world.md. Ranges are [low, high]; probabilities in [0, 1]."""
    # loader side, per sample: the GT region the chain degrades (reflect-padded when the image is
    # smaller; the crop to data.gt_size comes after), its left-right flip, the blur kernels
    crop_pad_size: int = 400
    hflip: bool = True
    kernel_range: tuple[int, int] = (7, 21)  # odd kernel sizes drawn from this range, padded to 21
    # first blur: kernel types iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso
    kernel_prob: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    # second blur (happens with second_blur_prob, drawn per sample)
    second_blur_prob: float = 0.8
    kernel_prob2: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    final_sinc_prob: float = 0.8
    # device side: first stage (resize_prob: up, down, keep; noise_range: sigma in 8-bit levels)
    resize_prob: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second stage
    resize_prob2: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # past training pairs per rank mixed into each batch (Real-ESRGAN's queue_size); 0 = none
    pool_size: int = 180
    # the target of each loss: the unsharp-masked GT (usm) or the plain GT (gt); Real-ESRGAN's
    # l1_gt_usm, percep_gt_usm, gan_gt_usm
    pixel_target: Literal["usm", "gt"] = "usm"
    perceptual_target: Literal["usm", "gt"] = "usm"
    adversarial_target: Literal["usm", "gt"] = "gt"


@dataclass
class TrainConfig:
    phase: Literal["psnr", "gan"] = "psnr"
    total_steps: int = 400_000
    # generator checkpoint (any load_generator format), or "psnr" (GAN phase): first run, or reuse
    # when finished, the matching PSNR-phase run <run.name>_psnr and start from its EMA generator
    init_from: Optional[str] = None
    psnr_preset: Optional[str] = None  # init_from=psnr: preset of that PSNR phase (None: this config, phase psnr)
    ema_decay: float = 0.999  # 0 disables the EMA generator
    grad_clip: float = 0.0  # VDSR adjustable clipping: |grad| <= grad_clip / lr; 0 = off
    d_init_steps: int = 0  # GAN phase: steps that update D only, before G joins
    # a step with a NaN/inf loss or gradient updates nothing; this many in a row stop the run
    max_nonfinite: int = 10


@dataclass
class PixelLossConfig:
    type: Literal["l1", "mse", "charbonnier"] = "l1"
    weight: float = 1.0  # ESRGAN's eta in the GAN phase (1e-2)


@dataclass
class PerceptualLossConfig:
    layers: dict[str, float] = field(default_factory=lambda: {"conv5_4": 1.0})
    before_relu: bool = True  # ESRGAN: True; SRGAN: False
    criterion: Literal["l1", "l2"] = "l1"
    weight: float = 1.0
    feature_scale: float = 1.0  # SRGAN rescales VGG features by 1/12.75
    # torchvision's VGG19 ImageNet file (downloaded once into the torch hub cache, hash-checked),
    # or any http(s) URL, local path or s3:// URI of a torchvision-layout vgg19 state dict
    weights_path: str = TORCHVISION_VGG19_URL
    allow_random_weights: bool = False  # tests only: a GAN with random VGG is meaningless


@dataclass
class AdversarialLossConfig:
    type: Literal["vanilla", "ragan", "lsgan", "hinge"] = "ragan"
    weight: float = 5e-3  # SRGAN 1e-3, ESRGAN lambda 5e-3


@dataclass
class LossConfig:
    pixel: PixelLossConfig = field(default_factory=PixelLossConfig)
    perceptual: PerceptualLossConfig = field(default_factory=PerceptualLossConfig)
    adversarial: AdversarialLossConfig = field(default_factory=AdversarialLossConfig)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0


@dataclass
class ScheduleConfig:
    type: Literal["constant", "multistep", "cosine_restart"] = "multistep"
    milestones: list[int] = field(default_factory=list)  # multistep: steps where lr *= gamma
    gamma: float = 0.5
    periods: list[int] = field(default_factory=list)  # cosine_restart: lengths of the cycles
    eta_min: float = 1e-7


@dataclass
class OptimConfig:
    g: OptimizerConfig = field(default_factory=OptimizerConfig)
    d: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    fused: bool = True  # fused Adam (one kernel per step, no host sync; CUDA and CPU); false = torch's foreach


@dataclass
class RunConfig:
    name: str = "raysr"
    storage: str = "~/raysr_runs"  # local directory or s3://bucket/prefix
    # Ray Train workers (one per GPU): N waits for N; [min, max] is elastic: starts with what is
    # there (up to max), goes on with fewer (at least min) when a node is lost, grows back to max
    num_workers: Union[int, list[int]] = 1
    # elastic runs: how often Ray looks for capacity to grow the worker group (Ray's
    # ScalingConfig.elastic_resize_monitor_interval_s); each resize restarts from the latest checkpoint
    resize_monitor_interval_s: float = 60.0
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    checkpoint_every: int = 5000
    val_every: int = 5000
    # async: a Ray actor of its own (run.validation_resources) scores a copy of the generator while
    # the training ranks go on; its results reach the report after they finish. inline: rank 0
    # validates and every rank waits for it (BasicSR's way).
    validation: Literal["async", "inline"] = "async"
    # Ray resources of that actor: {CPU: n} scores on n CPU threads, {GPU: 1} on a GPU of its own;
    # any Ray resource name (memory in bytes, custom resources) is passed on
    validation_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    # how long a due validation may wait for that actor to be placed (an autoscaler adding a node)
    # before rank 0 does it inline
    validation_wait_s: float = 300.0
    log_every: int = 100
    keep_checkpoints: int = 5
    max_failures: int = 3
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 + channels_last on CUDA, fp32 on CPU
    verbose: bool = False  # show the Ray / torch / boto messages raysr silences, and every worker's warnings
    # torch.compile G, D and the VGG loss network (minutes of start-up, then faster steps);
    # max-autotune-no-cudagraphs also benchmarks kernel choices while compiling.
    compile: Literal["off", "default", "max-autotune-no-cudagraphs"] = "off"
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions (the fp32 parts under bf16 too) in TF32
    cudnn_benchmark: bool = True  # CUDA: cuDNN times its algorithms per input shape, keeps the fastest
    # two fresh runs of one config give the same weights on GPU too: deterministic kernels only (slower; turns
    # cudnn_benchmark off). CPU runs already are (docs/fault-tolerance.md, Reproducibility)
    deterministic: bool = False
    # where the run's metrics, config and comparison images go (rank 0 logs; a rerun of run.name
    # continues the same tracker runs): tensorboard (<run>/tensorboard), mlflow, wandb (docs/training.md)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    # unset: MLFLOW_TRACKING_URI, else sqlite:///<run.storage>/mlflow.db (local run.storage only)
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment: Optional[str] = None  # unset: MLFLOW_EXPERIMENT_NAME, else raysr
    wandb_project: Optional[str] = None  # unset: WANDB_PROJECT, else raysr
    wandb_entity: Optional[str] = None  # unset: WANDB_ENTITY, else the API key's default entity
    wandb_mode: Optional[Literal["online", "offline"]] = None  # unset: WANDB_MODE, else online

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a ``[min, max]`` range."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers a run uses; the global batch is ``data.batch_size × max_workers`` at every size."""
        return self.num_workers[-1] if self.elastic else self.num_workers


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def scale(self) -> int:
        return self.model.generator.scale

    @property
    def realesrgan(self) -> Optional[DegradationConfig]:
        """The ``degradation`` section when ``data.degradation`` is realesrgan, else None."""
        return self.degradation if self.data.degradation == "realesrgan" else None

    @property
    def paired(self) -> bool:
        """Whether the training shards hold each sample's own LR (``data.degradation: paired``)."""
        return self.data.degradation == "paired"

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- building from data


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_field_names(tp)}, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if len(errors) == 1 else
                          f"{key}: {value!r} matches none of: " + "; ".join(errors))
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads an unquoted off as false
            value = "off"
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        one = args and (args[0] in (str, int) or typing.get_origin(args[0]) is Literal)
        if isinstance(value, (str, int, float)) and one:
            value = [value]  # `--set data.train=s3://…` gives a single URL, `--set run.trackers=mlflow` one tracker
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict) or not value:
            example = "{conv5_4: 1.0}" if key.endswith("layers") else "{CPU: 1}"
            raise ConfigError(f"{key}: expected a non-empty mapping like {example}, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")  # a bug in this file, not user input


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = _field_names(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys under "
                          f"{prefix or 'the top level'}: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """PyYAML's YAML 1.1, plus the floats YAML 1.1 reads as strings: an exponent without a dot or
    without a sign (``1e-3``, ``5E-5``, ``1.0e3``). People type them as numbers; quoted, they stay strings."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text (a config file, a ``--set`` value, a search space) with ``1e-3`` read as the float
    0.001 at any depth, where plain YAML 1.1 gives the string '1e-3'. Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` -> ("a.b.c", value parsed by :func:`load_yaml`: 1e-3, true, [1,2], {conv5_4: 1})."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set loss.adversarial.weight=1e-3")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err.problem})") from err
    return key.strip(), value


def set_key(data: dict, key: str, value: Any) -> None:
    """Set the dotted ``key`` (``loss.adversarial.weight``) in the nested mapping ``data`` (a config's
    ``to_dict()`` form), adding missing sections; whether the key exists is checked when the config is built.

    Raises ConfigError when a section on the way holds a value (``a.b.c`` where ``a.b`` is 3).
    """
    *sections, leaf = key.split(".")
    node = data
    for i, name in enumerate(sections):
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            section = ".".join(sections[:i + 1])
            raise ConfigError(f"unknown key {key}: {section} is a value, not a section (it holds {node!r}); "
                              "check the key's spelling")
    node[leaf] = value


def available_presets() -> list[str]:
    files = resources.files("raysr").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    path = resources.files("raysr").joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    return path.read_text()


def _read_yaml(text: str, origin: str) -> dict:
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of sections (model, data, train, …)")
    return data


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a config: defaults <- preset (or file) <- ``--set`` overrides, then validate."""
    if preset and config_file:
        raise ConfigError("give --preset or --config, not both")
    if config_file:
        path = os.path.expanduser(config_file)
        if not os.path.isfile(path):
            raise ConfigError(f"--config {config_file}: no such file")
        with open(path) as f:
            data = _read_yaml(f.read(), config_file)
    else:
        name = preset or DEFAULT_PRESET
        data = _read_yaml(preset_text(name), f"preset {name}")
    for text in overrides:
        set_key(data, *parse_override(text))
    cfg = _build(Config, data)
    check_config(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """A validated Config from its ``to_dict()`` form (used to restore a run's saved config)."""
    cfg = _build(Config, data)
    check_config(cfg)
    return cfg


# --------------------------------------------------------------------------- validation

def check_config(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError."""
    g, d, data, train, run = cfg.model.generator, cfg.model.discriminator, cfg.data, cfg.train, cfg.run
    from raysr.models import GENERATOR_SCALES, VGG_INPUT_SIZES
    from raysr.models.vgg import VGG19_LAYERS

    if g.scale not in GENERATOR_SCALES[g.name]:
        raise ConfigError(f"model.generator.scale: {g.scale} is not supported by {g.name}; "
                          f"choose one of {list(GENERATOR_SCALES[g.name])}")
    _positive(("model.generator.num_feat", g.num_feat), ("model.generator.num_block", g.num_block),
              ("model.generator.num_grow_ch", g.num_grow_ch), ("model.generator.num_conv", g.num_conv),
              ("data.gt_size", data.gt_size),
              ("data.batch_size", data.batch_size), ("data.crops_per_image", data.crops_per_image),
              ("train.total_steps", train.total_steps), ("train.max_nonfinite", train.max_nonfinite),
              ("run.checkpoint_every", run.checkpoint_every), ("run.val_every", run.val_every),
              ("run.log_every", run.log_every), ("run.keep_checkpoints", run.keep_checkpoints),
              ("optim.g.lr", cfg.optim.g.lr), ("optim.d.lr", cfg.optim.d.lr))
    _check_num_workers(run)
    _check_validation(run)
    if data.degradation == "realesrgan":
        _check_degradation(cfg.degradation, data.gt_size, g.scale)
    if data.degradation == "paired" and not data.train:
        raise ConfigError("data.degradation: paired trains on shards of LR/HR pairs and data.train is not set (the "
                          "demo shards hold HR images only); set data.train to shards made with python -m "
                          "raysr.data.make_shards --input HR_DIR --lr-input LR_DIR --scale S, or use "
                          "data.degradation=bicubic")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers: {data.num_workers} must be >= 0 (0 loads in the training process)")
    if run.max_failures < -1:
        raise ConfigError(f"run.max_failures: {run.max_failures} must be >= 0, or -1 for unlimited")
    if data.gt_size % g.scale:
        raise ConfigError(f"data.gt_size: {data.gt_size} is not divisible by model.generator.scale "
                          f"{g.scale}; use a multiple such as {data.gt_size - data.gt_size % g.scale or g.scale}")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: {train.ema_decay} must be in [0, 1) (0 disables EMA)")
    if train.grad_clip < 0:
        raise ConfigError(f"train.grad_clip: {train.grad_clip} must be >= 0 (0 disables clipping)")
    for side in ("g", "d"):
        betas = getattr(cfg.optim, side).betas
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"optim.{side}.betas: {list(betas)} must both be in [0, 1)")
    sched = cfg.optim.schedule
    if sched.type == "multistep" and sorted(sched.milestones) != sched.milestones:
        raise ConfigError(f"optim.schedule.milestones: {sched.milestones} must be increasing")
    if sched.type == "cosine_restart" and (not sched.periods or min(sched.periods) <= 0):
        raise ConfigError("optim.schedule.periods: cosine_restart needs positive cycle lengths, "
                          "e.g. [250000, 250000, 250000, 250000]")
    doubled = sorted({t for t in run.trackers if run.trackers.count(t) > 1})
    if doubled:
        raise ConfigError(f"run.trackers: {', '.join(doubled)} is listed more than once in {run.trackers}")
    if not run.name or "/" in run.name:
        raise ConfigError(f"run.name: {run.name!r} must be a non-empty name without '/'")
    if train.phase == "gan":
        if d.name == "vgg":
            if data.gt_size not in VGG_INPUT_SIZES:
                raise ConfigError(f"data.gt_size: the VGG discriminator (model.discriminator.name=vgg) is built for "
                                  f"the crop size and takes {', '.join(map(str, VGG_INPUT_SIZES))} px, not "
                                  f"{data.gt_size}; choose one of those or model.discriminator.name=unet (any size)")
        elif d.variant != "basicsr":
            raise ConfigError(f"model.discriminator.variant: {d.variant!r} applies to the vgg discriminator "
                              "only; remove it or set model.discriminator.name=vgg")
        perc = cfg.loss.perceptual
        for layer in perc.layers:
            if layer not in VGG19_LAYERS:
                raise ConfigError(f"loss.perceptual.layers: unknown VGG19 layer {layer!r}; "
                                  "use names like conv5_4, conv2_2, relu5_4")
    if train.init_from == PSNR_PHASE:
        if train.phase != "gan":
            raise ConfigError("train.init_from=psnr starts a GAN phase from its PSNR phase; with train.phase=psnr "
                              "give a generator checkpoint or nothing")
        if train.psnr_preset is not None and train.psnr_preset not in available_presets():
            raise ConfigError(f"train.psnr_preset: unknown preset {train.psnr_preset!r}; available: "
                              f"{', '.join(available_presets())}")
    if data.val_lr is not None and not data.val:
        raise ConfigError(f"data.val_lr: {data.val_lr} holds the LR images of data.val, which is not set; set "
                          "data.val to the folder of their HR images (the demo's hold-out has no LR folder)")
    for key, path in (("train.init_from", None if train.init_from == PSNR_PHASE else train.init_from),
                      ("loss.perceptual.weights_path", cfg.loss.perceptual.weights_path),
                      ("data.val_lr", data.val_lr)):
        if path and not path.startswith(("s3://", "http://", "https://")) and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"{key}: {path} does not exist")


def _check_num_workers(run: RunConfig) -> None:
    if not run.elastic:
        _positive(("run.num_workers", run.num_workers))
        return
    if len(run.num_workers) != 2:
        raise ConfigError(f"run.num_workers: {run.num_workers} must be one number N or a list [min, max], "
                          "e.g. [2, 8]")
    low, high = run.num_workers
    if low < 1:
        raise ConfigError(f"run.num_workers: [{low}, {high}]: min must be >= 1")
    if low > high:
        raise ConfigError(f"run.num_workers: [{low}, {high}]: min must be <= max; did you mean [{high}, {low}]?")
    if run.max_failures == 0:
        raise ConfigError(f"run.num_workers: [{low}, {high}] with run.max_failures=0: an elastic run goes on "
                          "with fewer workers by restarting after the lost node's failure; set run.max_failures "
                          "to 1 or more, or -1 for unlimited")
    if run.resize_monitor_interval_s <= 0:
        raise ConfigError(f"run.resize_monitor_interval_s: {run.resize_monitor_interval_s} must be > 0 (seconds)")


def _check_degradation(deg: DegradationConfig, gt_size: int, scale: int) -> None:
    from raysr.degradation.kernels import KERNEL_SIZE
    from raysr.degradation.pipeline import USM_SIZE

    for name in ("sinc_prob", "second_blur_prob", "sinc_prob2", "final_sinc_prob", "gaussian_noise_prob",
                 "gray_noise_prob", "gaussian_noise_prob2", "gray_noise_prob2"):
        if not 0.0 <= getattr(deg, name) <= 1.0:
            raise ConfigError(f"degradation.{name}: {getattr(deg, name)} must be a probability in [0, 1]")
    for name, count in (("kernel_prob", 6), ("kernel_prob2", 6), ("resize_prob", 3), ("resize_prob2", 3)):
        probs = getattr(deg, name)
        if len(probs) != count or min(probs) < 0 or sum(probs) <= 0:
            what = ("iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso" if count == 6
                    else "up, down, keep")
            raise ConfigError(f"degradation.{name}: {probs} must be {count} weights >= 0 ({what}), not all 0")
    for name, low_min in (("blur_sigma", 0.0), ("blur_sigma2", 0.0), ("betag_range", 0.0), ("betag_range2", 0.0),
                          ("betap_range", 0.0), ("betap_range2", 0.0), ("resize_range", 0.0),
                          ("resize_range2", 0.0), ("noise_range", -1.0), ("noise_range2", -1.0),
                          ("poisson_scale_range", -1.0), ("poisson_scale_range2", -1.0),
                          ("jpeg_range", 0.0), ("jpeg_range2", 0.0)):
        low, high = getattr(deg, name)
        if not low_min < low <= high:
            raise ConfigError(f"degradation.{name}: {[low, high]} must be [low, high] with "
                              f"{'0 <=' if low_min < 0 else '0 <'} low <= high")
    for name in ("betag_range", "betag_range2", "betap_range", "betap_range2"):
        low, high = getattr(deg, name)
        if not low <= 1.0 <= high:
            raise ConfigError(f"degradation.{name}: {[low, high]} must hold 1 (beta is drawn below and above 1)")
    for name in ("resize_range", "resize_range2"):
        low, high = getattr(deg, name)
        if not low <= 1.0 <= high:
            raise ConfigError(f"degradation.{name}: {[low, high]} must hold 1 (scales below 1 shrink, above 1 "
                              "enlarge)")
    for name in ("jpeg_range", "jpeg_range2"):
        if getattr(deg, name)[1] > 100:
            raise ConfigError(f"degradation.{name}: {list(getattr(deg, name))}: JPEG qualities go up to 100")
    low, high = deg.kernel_range
    if low % 2 == 0 or high % 2 == 0 or not 1 <= low <= high <= KERNEL_SIZE:
        raise ConfigError(f"degradation.kernel_range: {[low, high]} must be odd sizes with 1 <= low <= high "
                          f"<= {KERNEL_SIZE}")
    if deg.pool_size < 0:
        raise ConfigError(f"degradation.pool_size: {deg.pool_size} must be >= 0 (0: no pool)")
    size = deg.crop_pad_size
    if size % scale or size < gt_size:
        raise ConfigError(f"degradation.crop_pad_size: {size} must be a multiple of model.generator.scale "
                          f"{scale} and >= data.gt_size {gt_size}")
    # reflect padding needs more pixels than half a kernel: the blurs after the first resize, the final
    # sinc at LR size, the unsharp mask of the GT crop
    pad = KERNEL_SIZE // 2
    if int(size * deg.resize_range[0]) <= pad or size // scale <= pad:
        raise ConfigError(f"degradation.crop_pad_size: {size} is too small: the smallest first-stage resize "
                          f"(x{deg.resize_range[0]}) and the LR side (/{scale}) must stay above {pad} px")
    if gt_size <= USM_SIZE // 2:
        raise ConfigError(f"data.gt_size: {gt_size} is too small for data.degradation=realesrgan: the unsharp "
                          f"mask needs more than {USM_SIZE // 2} px")


def _check_validation(run: RunConfig) -> None:
    for name, amount in run.validation_resources.items():
        if amount < 0:
            raise ConfigError(f"run.validation_resources.{name}: {amount} must be >= 0")
        if name in ("cpu", "gpu", "num_cpus", "num_gpus"):
            raise ConfigError(f"run.validation_resources.{name}: Ray names this resource {name[-3:].upper()}; "
                              f"write {{{name[-3:].upper()}: {amount:g}}}")
    if run.validation_wait_s < 0:
        raise ConfigError(f"run.validation_wait_s: {run.validation_wait_s} must be >= 0 (seconds)")


def _positive(*pairs: tuple[str, float]) -> None:
    for key, value in pairs:
        if value <= 0:
            raise ConfigError(f"{key}: {value} must be > 0")
