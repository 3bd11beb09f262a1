"""Exact resume without Ray: a rank that saves its checkpoint (weights, optimizers, its RNGs, its data
position, its degradation state), is killed and rebuilt from it, ends with the same weights, bit for bit,
as the same rank run on uninterrupted — the worker loop of raysr.train, step by step, on one process."""

from __future__ import annotations

import io

import pytest
import torch

from raysr import run_checkpoint
from raysr.config import load_config
from raysr.data import DeviceBatches, make_train_loader
from raysr.data.make_shards import make_shards
from raysr.degradation import training_pairs
from raysr.engine import build_state, train_step
from test_data_common import write_images

CPU = torch.device("cpu")
# the Real-ESRGAN GAN phase, tiny: the U-Net D, the perceptual loss, the degradation chain and its pair pool
TINY_REALESRGAN = ["model.generator.num_feat=8", "model.generator.num_block=1", "model.generator.num_grow_ch=4",
                   "model.discriminator.num_feat=8", "data.gt_size=32", "data.batch_size=2",
                   "degradation.crop_pad_size=64", "degradation.resize_range=[0.2, 1.5]", "degradation.pool_size=3",
                   "loss.perceptual.allow_random_weights=true", "loss.perceptual.layers={conv2_2: 1.0}",
                   "data.num_workers=2", "run.seed=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_images(root / "in", [(96, 144), (96, 96), (48, 96)], seed=3)
    make_shards([str(root / "in")], str(root / "shards"), crop_size=48, step=48, min_size=16, shard_size_mb=0.03,
                workers=1, progress=False)
    return str(root / "shards")


def start(cfg, saved: dict | None):
    """What train_loop_per_worker does for rank 0 of 1: build, resume from ``saved`` (a state.pt), stream."""
    torch.manual_seed(cfg.run.seed)
    state = build_state(cfg, CPU)
    mine = run_checkpoint.restore(state, saved) if saved is not None else None
    if mine is None:
        torch.manual_seed(cfg.run.seed + state.step)
    mine = mine or {}
    loader = make_train_loader(cfg.data.train, gt_size=cfg.data.gt_size, scale=cfg.scale,
                               batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                               degradation=cfg.realesrgan, **mine.get("data", {"seed": cfg.run.seed}))
    return state, DeviceBatches(loader, CPU, cfg.scale, "loader",
                                training_pairs(cfg, CPU, 0, state.step, mine.get("degradation")))


def run_to(state, batches, step):
    while state.step < step:
        lr, hr, hr_usm = batches.next()
        train_step(state, lr, hr, hr_usm=hr_usm)


def checkpoint(state, batches) -> dict:
    """The state.pt a checkpoint holds, through torch.save and torch.load(weights_only=True) as a resume reads it."""
    state.ranks = run_checkpoint.gather_rank_states(CPU, batches.loader.position(), batches.degrade)
    buffer = io.BytesIO()
    torch.save(run_checkpoint.state_dict(state), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def weights(state) -> dict:
    return {"g": state.g_module.state_dict(), "d": state.d_module.state_dict(), "ema": state.ema.module.state_dict()}


@pytest.mark.slow  # two short GAN runs with DataLoader workers
def test_a_killed_and_restored_gan_rank_ends_with_the_uninterrupted_weights(shards):
    cfg = load_config("realesrgan_x4plus", overrides=[*TINY_REALESRGAN, f"data.train={shards}"])
    state, batches = start(cfg, None)
    run_to(state, batches, 2)
    saved = checkpoint(state, batches)
    run_to(state, batches, 4)
    uninterrupted = weights(state)
    batches.close()

    resumed, batches = start(cfg, saved)  # a new process would start here: every state comes from `saved`
    assert resumed.step == 2 and saved["ranks"][0]["data"]["consumed"] == 2
    run_to(resumed, batches, 4)
    batches.close()
    for part, tensors in weights(resumed).items():
        for key, value in tensors.items():
            assert torch.equal(value, uninterrupted[part][key]), f"{part}.{key}"


def test_each_rank_gets_its_own_rngs_back_and_a_resized_run_none():
    cfg = load_config("esrgan_psnr_x4", overrides=["model.generator.num_feat=8", "model.generator.num_block=1",
                                                   "model.generator.num_grow_ch=4"])
    state = build_state(cfg, CPU)
    ranks = []
    for rank in range(2):  # what gather_rank_states collects from two ranks with their own RNG streams
        torch.manual_seed(100 + rank)
        ranks.append(run_checkpoint.rank_state({"seed": 0, "consumed": 10 + rank}))
    state.ranks = ranks
    buffer = io.BytesIO()
    torch.save(run_checkpoint.state_dict(state), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    torch.manual_seed(0)
    mine = run_checkpoint.restore(build_state(cfg, CPU), saved, rank=1, world_size=2)
    assert mine["data"] == {"seed": 0, "consumed": 11}
    torch.manual_seed(101)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(101).get_state())
    expected = torch.rand(4)
    run_checkpoint.restore(build_state(cfg, CPU), saved, rank=1, world_size=2)
    assert torch.equal(torch.rand(4), expected)  # rank 1's stream, not rank 0's
    assert run_checkpoint.restore(build_state(cfg, CPU), saved, rank=0, world_size=3) is None  # resized
