"""raysr.config's YAML numbers and dotted keys, as ``--set`` and config files reach them."""

from __future__ import annotations

import re

import pytest
import yaml

from raysr.config import ConfigError, load_config


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("5E-5", 0.00005), ("+2e2", 200.0), ("1.0e0", 1.0),
                                        ("0.5", 0.5), ("3", 3.0)])
def test_set_reads_floats_as_typed(text, value):
    assert yaml.safe_load(text) in (value, text)  # YAML 1.1 alone leaves some of these as strings
    assert load_config(overrides=[f"loss.adversarial.weight={text}"]).loss.adversarial.weight == value


def test_set_reads_floats_inside_lists_and_mappings():
    cfg = load_config(overrides=["optim.g.betas=[0.5, 9e-1]", "loss.perceptual.layers={conv2_2: 1e-1}"])
    assert cfg.optim.g.betas == (0.5, 0.9) and cfg.loss.perceptual.layers == {"conv2_2": 0.1}


@pytest.mark.parametrize("text,name", [("a.b", "a.b"), ("1e", "1e"), ("e3", "e3"), ("'1e3'", "1e3")])
def test_set_keeps_strings_that_are_not_numbers_or_are_quoted(text, name):
    assert load_config(overrides=[f"run.name={text}"]).run.name == name


def test_config_file_reads_floats_as_typed(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("loss:\n  adversarial: {weight: 1e-3}\noptim:\n  g: {lr: 2E-4}\n")
    cfg = load_config(config_file=str(path))
    assert cfg.loss.adversarial.weight == 0.001 and cfg.optim.g.lr == 0.0002


def test_set_below_a_value_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.generator.num_block.depth=3"])
    assert str(err.value).startswith("unknown key model.generator.num_block.depth: "
                                     "model.generator.num_block is a value, not a section")


def test_set_never_silently_replaces_a_value_with_a_section():
    # an earlier --set made model.generator a value: the later key below it is refused, not merged into
    # a fresh section that would drop the preset's generator
    with pytest.raises(ConfigError, match="model.generator is a value, not a section"):
        load_config(overrides=["model.generator=3", "model.generator.num_block=2"])


# --------------------------------------------------------------------------- derived, not duplicated


@pytest.mark.parametrize("preset", ["quickstart", "srcnn_x4", "vdsr_x4", "srresnet_x4", "esrgan_psnr_x4",
                                    "srgan_x4", "esrgan_x4", "realesrnet_x4plus", "realesrgan_x4plus",
                                    "realesr_compact_x4"])
def test_every_preset_trains_a_gan_step_with_train_phase_gan(preset):
    """The discriminator is built for data.gt_size: no second key to keep equal by hand."""
    import torch

    from raysr.engine import build_state, train_step

    small = ["model.generator.num_feat=4", "model.generator.num_block=2", "model.generator.num_grow_ch=4",
             "model.generator.num_conv=2",
             "model.discriminator.num_feat=4", "data.batch_size=1", "loss.perceptual.layers={conv1_2: 1.0}"]
    cfg = load_config(preset, overrides=["train.phase=gan", "loss.perceptual.allow_random_weights=true", *small])
    if cfg.model.discriminator.name == "unet":  # it takes any crop size: a small one keeps this test fast
        cfg = load_config(preset, overrides=["train.phase=gan", "loss.perceptual.allow_random_weights=true", *small,
                                             "data.gt_size=64"])
    state = build_state(cfg, torch.device("cpu"))
    gt = cfg.data.gt_size
    out = train_step(state, torch.rand(1, 3, gt // cfg.scale, gt // cfg.scale), torch.rand(1, 3, gt, gt))
    assert {"loss_g", "loss_d"} <= set(out) and state.step == 1
    if cfg.model.discriminator.name == "vgg":
        assert state.d_module.input_size == gt


def test_allowed_values_come_from_the_model_files():
    from raysr.models import GENERATOR_SCALES, VGG_INPUT_SIZES
    from raysr.models.vgg import VGG19_LAYERS

    with pytest.raises(ConfigError, match=re.escape(f"not supported by rrdbnet; choose one of "
                                                    f"{list(GENERATOR_SCALES['rrdbnet'])}")):
        load_config(overrides=["model.generator.name=rrdbnet", "model.generator.scale=3", "data.gt_size=63"])
    sizes = ", ".join(map(str, VGG_INPUT_SIZES))
    with pytest.raises(ConfigError, match=f"takes {sizes} px, not 80"):
        load_config(overrides=["train.phase=gan", "data.gt_size=80", "loss.perceptual.allow_random_weights=true"])
    load_config(overrides=["train.phase=gan", "loss.perceptual.allow_random_weights=true",
                           f"loss.perceptual.layers={{{VGG19_LAYERS[-1]}: 1.0}}"])


def test_num_workers_takes_a_number_or_an_elastic_min_max_range(tmp_path):
    fixed = load_config(overrides=["run.num_workers=4"]).run
    assert (fixed.num_workers, fixed.elastic, fixed.min_workers, fixed.max_workers) == (4, False, 4, 4)
    elastic = load_config(overrides=["run.num_workers=[2, 8]", "run.resize_monitor_interval_s=5"]).run
    assert (elastic.elastic, elastic.min_workers, elastic.max_workers) == (True, 2, 8)
    assert elastic.resize_monitor_interval_s == 5.0
    assert load_config().run.resize_monitor_interval_s == 60.0  # Ray's own default
    path = tmp_path / "elastic.yaml"
    path.write_text("run:\n  num_workers: [1, 2]\n")
    assert load_config(config_file=str(path)).run.num_workers == [1, 2]


@pytest.mark.parametrize("overrides,message", [
    (["run.num_workers=[0, 2]"], "run.num_workers: [0, 2]: min must be >= 1"),
    (["run.num_workers=[4, 2]"], "run.num_workers: [4, 2]: min must be <= max; did you mean [2, 4]?"),
    (["run.num_workers=[1, 2, 3]"], "run.num_workers: [1, 2, 3] must be one number N or a list [min, max]"),
    (["run.num_workers=0"], "run.num_workers: 0 must be > 0"),
    (["run.num_workers=[1, 2]", "run.max_failures=0"], "run.num_workers: [1, 2] with run.max_failures=0"),
    (["run.num_workers=[1, 2]", "run.resize_monitor_interval_s=0"], "run.resize_monitor_interval_s: 0.0 must be > 0"),
])
def test_num_workers_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_degradation_defaults_are_real_esrgans_and_bicubic_stays_the_default():
    cfg = load_config()
    assert cfg.data.degradation == "bicubic"
    d = load_config(overrides=["data.degradation=realesrgan", "data.gt_size=256"]).degradation
    assert (d.crop_pad_size, d.kernel_range, d.sinc_prob, d.blur_sigma, d.betag_range, d.blur_sigma2) == \
        (400, (7, 21), 0.1, (0.2, 3.0), (0.5, 4.0), (0.2, 1.5))
    assert (d.resize_prob, d.resize_range, d.noise_range, d.poisson_scale_range, d.jpeg_range) == \
        ([0.2, 0.7, 0.1], (0.15, 1.5), (1.0, 30.0), (0.05, 3.0), (30.0, 95.0))
    assert (d.resize_prob2, d.resize_range2, d.noise_range2, d.poisson_scale_range2, d.second_blur_prob,
            d.final_sinc_prob, d.pool_size) == ([0.3, 0.4, 0.3], (0.3, 1.2), (1.0, 25.0), (0.05, 2.5), 0.8, 0.8, 180)
    assert (d.pixel_target, d.perceptual_target, d.adversarial_target) == ("usm", "usm", "gt")


@pytest.mark.parametrize("overrides,message", [
    (["degradation.sinc_prob=1.5"], "degradation.sinc_prob: 1.5 must be a probability in [0, 1]"),
    (["degradation.kernel_prob=[1, 0]"], "degradation.kernel_prob: [1.0, 0.0] must be 6 weights >= 0"),
    (["degradation.resize_prob2=[0, 0, 0]"], "degradation.resize_prob2: [0.0, 0.0, 0.0] must be 3 weights"),
    (["degradation.blur_sigma=[3, 1]"], "degradation.blur_sigma: [3.0, 1.0] must be [low, high]"),
    (["degradation.resize_range=[1.2, 1.5]"], "degradation.resize_range: [1.2, 1.5] must hold 1"),
    (["degradation.jpeg_range2=[30, 120]"], "degradation.jpeg_range2: [30.0, 120.0]: JPEG qualities go up to 100"),
    (["degradation.kernel_range=[8, 21]"], "degradation.kernel_range: [8, 21] must be odd sizes"),
    (["degradation.kernel_range=[7, 23]"], "degradation.kernel_range: [7, 23] must be odd sizes"),
    (["degradation.pool_size=-1"], "degradation.pool_size: -1 must be >= 0"),
    (["degradation.crop_pad_size=250"], "degradation.crop_pad_size: 250 must be a multiple of"),
    (["degradation.crop_pad_size=64", "data.gt_size=64"], "degradation.crop_pad_size: 64 is too small"),
    (["data.gt_size=24"], "data.gt_size: 24 is too small for data.degradation=realesrgan"),
    (["degradation.pixel_target=sharp"], "degradation.pixel_target: 'sharp' is not allowed; choose one of"),
])
def test_degradation_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=["data.degradation=realesrgan", *overrides])


def test_real_esrgan_presets_chain_their_phases_with_the_same_degradations():
    from raysr.train import psnr_phase_config

    gan = load_config("realesrgan_x4plus", overrides=["train.init_from=psnr", "degradation.pool_size=7",
                                                       "loss.perceptual.allow_random_weights=true"])
    assert gan.data.degradation == "realesrgan" and gan.model.discriminator.name == "unet"
    assert gan.loss.perceptual.layers == {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
    assert (gan.loss.adversarial.type, gan.loss.adversarial.weight, gan.train.ema_decay) == ("vanilla", 0.1, 0.999)
    psnr = psnr_phase_config(gan)
    assert (psnr.train.phase, psnr.run.name, psnr.optim.g.lr) == ("psnr", "realesrgan_x4plus_psnr", 2e-4)
    assert psnr.data.degradation == "realesrgan" and psnr.degradation.pool_size == 7
