"""The real-world presets train on the demo data: a few steps of each phase, tiny, in this process
(the worker loop's build -> stream -> step, as tests/test_resume.py runs it). The Ray path they
share with every preset is tests/test_train.py's (the realesrgan_x4plus GAN phase runs there on Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from raysr.config import load_config
from raysr.engine import train_step
from test_resume import start

TINY = ["data.gt_size=32", "data.batch_size=2", "data.num_workers=0", "degradation.crop_pad_size=64",
        "degradation.resize_range=[0.2, 1.5]", "degradation.pool_size=3", "model.discriminator.num_feat=8",
        "loss.perceptual.allow_random_weights=true", "loss.perceptual.layers={conv2_2: 1.0}", "run.seed=3"]
GENERATORS = {"realesrnet_x4plus": ["model.generator.num_feat=8", "model.generator.num_block=1",
                                    "model.generator.num_grow_ch=4"],
              "realesr_compact_x4": ["model.generator.num_feat=8", "model.generator.num_conv=2"]}
STEPS = 3


# realesrnet_x4plus is Real-ESRGAN's PSNR phase only: its GAN phase is realesrgan_x4plus (on Ray in test_train)
@pytest.mark.parametrize("preset, phase", [("realesrnet_x4plus", "psnr"), ("realesr_compact_x4", "psnr"),
                                           ("realesr_compact_x4", "gan")])
def test_each_phase_of_the_real_world_presets_trains_on_the_demo_data(demo_data, preset, phase):
    """``--preset P --set train.phase=PHASE`` on the demo shards: every loss of the phase is finite and
    positive at every step, and G's weights move (D's too in the GAN phase)."""
    cfg = load_config(preset, overrides=[*TINY, *GENERATORS[preset], f"train.phase={phase}",
                                         f"data.train={demo_data.train}"])
    assert cfg.data.degradation == "realesrgan" and cfg.train.phase == phase
    state, batches = start(cfg, None)
    g0 = {k: v.clone() for k, v in state.g_module.state_dict().items()}
    d0 = {k: v.clone() for k, v in state.d_module.state_dict().items()} if phase == "gan" else {}
    losses = ["loss_pix"] + (["loss_percep", "loss_adv", "loss_d"] if phase == "gan" else [])
    try:
        for _ in range(STEPS):
            lr, hr, hr_usm = batches.next()
            assert lr.shape[-1] * cfg.scale == hr.shape[-1] == cfg.data.gt_size
            scalars = train_step(state, lr, hr, hr_usm=hr_usm)
            for key in losses:
                value = float(scalars[key])
                assert math.isfinite(value) and value > 0, (key, value)
    finally:
        batches.close()
    assert state.step == STEPS
    assert any(not torch.equal(v, g0[k]) for k, v in state.g_module.state_dict().items()), "G never stepped"
    if phase == "gan":
        assert any(not torch.equal(v, d0[k]) for k, v in state.d_module.state_dict().items()), "D never stepped"
