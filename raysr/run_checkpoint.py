"""A training run's checkpoint: the folder ``<run>/checkpoint_NNNNNNNN/`` and what ``state.pt`` holds.

    state.pt        {"step", "config", "g", "opt_g", "sched_g", "ranks"[, "g_ema"][, "d", "opt_d", "sched_d"]}
                    ranks: one :func:`rank_state` per training rank (its RNGs and data position)
    generator.pth   raysr's generator file (BasicSR's params / params_ema + the architecture)
    metrics.json    the metrics reported at that step, with the newest validation finished by then
                    (psnr, ssim, ... of the weights at step ``val_step``; the last checkpoint's is its own)
    comparison.png  bicubic | SR | HR of the first validation image, from that validation

This module is the one place that knows this layout: it builds ``state.pt`` from the
training state it is given (:class:`raysr.engine.TrainState`, used by its attributes
only, so nothing here imports the engine), writes the folder, restores a training
state for resume, and reads the generator back out for ``raysr.generator_file.load_generator``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from raysr.config import Config, GeneratorConfig
from raysr.storage import exists, join, read_bytes, remove, write_bytes
from raysr.models import GENERATORS, build_generator, generator_from_config, generator_name
from raysr.weights import format_kwargs, generator_payload, is_state_dict, load_exact, sample_keys, \
    strip_wrapper_prefixes

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pth"
METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.png"
# beside the checkpoints: the metrics of the interval at which a run stopped diverging (train.max_nonfinite)
DIVERGED_FILE = "diverged.json"


# --------------------------------------------------------------------------- state.pt


def state_dict(state) -> dict:
    """What ``state.pt`` holds for a training state: step, the run's config, G (+ EMA) and its
    optimizer/schedule, D and its optimizer/schedule in the GAN phase, and each rank's
    :func:`rank_state` (``state.ranks``, gathered by the training; without them this process's RNGs)."""
    out = {"step": state.step, "config": state.cfg.to_dict(),
           "g": state.g_module.state_dict(), "opt_g": state.opt_g.state_dict(),
           "sched_g": state.sched_g.state_dict(), "ranks": state.ranks or [{"rng": rng_state()}]}
    if state.ema is not None:
        out["g_ema"] = state.ema.module.state_dict()
    if state.d_module is not None:
        out.update(d=state.d_module.state_dict(), opt_d=state.opt_d.state_dict(), sched_d=state.sched_d.state_dict())
    return out


def restore(state, saved: Mapping, rank: int = 0, world_size: int = 1) -> dict | None:
    """Load a ``state.pt`` dict into a freshly built training state (same config). When the checkpoint
    was written by ``world_size`` ranks, rank ``rank``'s RNGs are restored too and its :func:`rank_state`
    is returned (its data position: the caller continues from it); else (an elastic resize, a
    checkpoint older than per-rank states) None: the caller reseeds and restarts its data stream.

    Raises ValueError when a GAN-phase state is given a PSNR-phase checkpoint.
    """
    if state.d_module is not None and "d" not in saved:
        raise ValueError("the checkpoint has no discriminator (it is from a PSNR-phase run); "
                         "start the GAN run under a new run.name with train.init_from=<that checkpoint>")
    state.step = int(saved["step"])
    state.g_module.load_state_dict(saved["g"])
    state.opt_g.load_state_dict(saved["opt_g"])
    state.sched_g.load_state_dict(saved["sched_g"])
    if state.ema is not None:
        state.ema.module.load_state_dict(saved.get("g_ema", saved["g"]))
    if state.d_module is not None:
        state.d_module.load_state_dict(saved["d"])
        state.opt_d.load_state_dict(saved["opt_d"])
        state.sched_d.load_state_dict(saved["sched_d"])
    ranks = saved.get("ranks")
    if ranks is None or len(ranks) != world_size:
        return None
    set_rng_state(ranks[rank]["rng"])
    return ranks[rank]


def rank_state(data: dict | None = None, degradation=None) -> dict:
    """One training rank's part of a checkpoint: its RNGs (:func:`rng_state`), its data stream's
    position ``data`` (``raysr.data.TrainLoader.position()``: seed and batches consumed) and its
    ``degradation``'s state (:class:`raysr.degradation.TrainingPairs`: the chain's generators and the
    pair pool), when given."""
    out = {"rng": rng_state()}
    if data is not None:
        out["data"] = dict(data)
    if degradation is not None:
        out["degradation"] = degradation.state_dict()
    return out


def gather_rank_states(device: torch.device, data: dict | None = None, degradation=None) -> list[dict] | None:
    """Every rank's :func:`rank_state` (of ``data``, ``degradation``) on rank 0, in rank order (None on the
    others); a collective: every rank of the process group calls it. Without a process group, ``[mine]``."""
    mine = rank_state(data, degradation)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    if torch.device(device).type == "cuda":  # NCCL sends the pickled objects from the current device
        torch.cuda.set_device(device)
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(saved: Mapping) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in saved["python"]))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


# --------------------------------------------------------------------------- the folder


def write(directory: str, state, metrics: dict, comparison: bytes | None) -> None:
    """The files of one checkpoint into the local folder ``directory`` (Ray Train uploads it).

    Raises ValueError, writing nothing, if any tensor is NaN/inf: a checkpoint is always one to resume from.
    """
    saved = state_dict(state)
    bad = [key for key, t in _tensors(saved) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"refusing to write a checkpoint with non-finite tensors ({', '.join(bad[:4])}"
                         f"{', ...' if len(bad) > 4 else ''}) at step {state.step}")
    torch.save(saved, os.path.join(directory, STATE_FILE))
    ema = state.ema.module if state.ema is not None else None
    torch.save(generator_payload(state.g_module, ema, fmt="raysr"), os.path.join(directory, GENERATOR_FILE))
    with open(os.path.join(directory, METRICS_FILE), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    if comparison is not None:
        with open(os.path.join(directory, COMPARISON_FILE), "wb") as f:
            f.write(comparison)


def _tensors(obj, prefix: str = ""):
    """(dotted key, tensor) for every tensor inside nested dicts / lists of a state dict."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def write_divergence(run: str, metrics: dict) -> None:
    """Record in the run folder (local or s3://) that the run stopped diverging, with that interval's metrics."""
    write_bytes(join(run, DIVERGED_FILE), json.dumps(metrics, indent=2, sort_keys=True).encode())


def pop_divergence(run: str) -> dict | None:
    """The record :func:`write_divergence` left in the run folder, removed (a rerun starts clean); None if none."""
    uri = join(run, DIVERGED_FILE)
    if not exists(uri):
        return None
    record = json.loads(read_bytes(uri))
    remove(uri)
    return record


def divergence_message(cfg: Config, m: dict, checkpoint) -> str:
    """What to say when train.max_nonfinite steps in a row had a NaN/inf loss or gradient
    (``m``: the metrics of that interval; ``checkpoint``: the run's latest, or None): raysr.train prints it,
    raysr.tune shows it in its table."""
    losses = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d")
                       if k in m)
    last = f"the last checkpoint ({checkpoint.path})" if checkpoint is not None else \
        "no checkpoint was written yet, and"
    return (f"training diverged: {cfg.train.max_nonfinite} steps in a row had a NaN/inf loss or "
            f"gradient, up to step {m['diverged_at']} (interval means: {losses or 'none'}). Those steps updated "
            f"nothing and the run stopped, so {last} holds only finite weights: resume from it, or start a new "
            "run.name from its generator.pth (train.init_from). Try a lower learning rate (optim.g.lr, optim.d.lr), "
            "run.precision=fp32, or train.grad_clip")


def is_complete(directory: str) -> bool:
    """Whether a checkpoint folder (local or s3://) holds the files that resuming and exporting read:
    state.pt, generator.pth, metrics.json (comparison.png only comes with validation steps).

    Ray Train registers a checkpoint only after all of its files are uploaded, and resumes from
    registered ones only; a reader that finds a folder by its name must check this instead, since
    a worker killed mid-upload leaves the folder with some of its files.
    """
    return all(exists(join(directory, name)) for name in (STATE_FILE, GENERATOR_FILE, METRICS_FILE))


def folder_name(step: int) -> str:
    """The name of the checkpoint folder of ``step`` inside its run folder: ``checkpoint_NNNNNNNN``."""
    return f"checkpoint_{step:08d}"


def finished(run: str, total_steps: int) -> SimpleNamespace | None:
    """The run's complete checkpoint at ``total_steps`` (the run reached its last step) as Ray's Result
    shows one (``.metrics``: its metrics.json, ``.checkpoint.path``: the folder), else None.
    ``run``: the run folder, local or s3://."""
    last = join(run, folder_name(total_steps))
    if not is_complete(last):
        return None
    metrics = json.loads(read_bytes(join(last, METRICS_FILE)))
    return SimpleNamespace(metrics=metrics, checkpoint=SimpleNamespace(path=last))


def read_state(directory: str, map_location) -> dict:
    """The ``state.pt`` of a checkpoint folder, tensors on ``map_location`` (never unpickles code)."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------- the generator of a state.pt


def is_training_state(obj: Mapping) -> bool:
    """Whether a loaded dict is a ``state.pt``: the run's config plus generator weights under ``g``."""
    return isinstance(obj.get("config"), Mapping) and is_state_dict(obj.get("g"))


def generator_of(saved: Mapping, **overrides) -> nn.Module:
    """The generator of a ``state.pt`` dict (EMA weights when present, else G), rebuilt from the
    run's ``config["model"]["generator"]``; ``overrides`` replace constructor arguments. Eval mode."""
    model = _generator_for(saved["config"])
    if overrides:
        model = build_generator(generator_name(model), **{**model.config, **overrides})
    weights = strip_wrapper_prefixes(dict(saved["g_ema"] if is_state_dict(saved.get("g_ema")) else saved["g"]))
    load_exact(model, weights, f"{generator_name(model)}({format_kwargs(model.config)})")
    return model.eval()


def _generator_for(config: Mapping) -> nn.Module:
    """The generator a run's saved config (``Config.to_dict()``) names, built as raysr.train built it."""
    model_cfg = config.get("model")
    g = model_cfg.get("generator") if isinstance(model_cfg, Mapping) else None
    if not isinstance(g, Mapping):
        raise ValueError(f"training state's config has no model.generator section (config keys: "
                         f"{sample_keys(config)}); the state.pt is not from raysr.train")
    if g.get("name") not in GENERATORS:
        raise ValueError(f"training state's model.generator.name {g.get('name')!r} is not a raysr generator; "
                         f"known: {sorted(GENERATORS)}")
    unknown = sorted(set(g) - {f.name for f in dataclasses.fields(GeneratorConfig)})
    if unknown:
        raise ValueError(f"training state's model.generator {dict(g)} does not fit this raysr version: "
                         f"unknown keys {unknown}")
    return generator_from_config(GeneratorConfig(**g))
