"""Generator checkpoints: every key layout in the wild loads to the same network,
params_ema wins, overrides resolve ambiguity, errors say what is wrong, s3:// works,
and network interpolation mixes weights as ESRGAN defines it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import raysr.storage
from raysr.generator_file import interpolate, load_generator, save_generator
from raysr.config import load_config
from raysr import run_checkpoint
from raysr.engine import build_state
from raysr.models import SRCNN, VDSR, RRDBNet, SRResNet, build_generator

RRDB_KW = dict(num_feat=6, num_block=2, num_grow_ch=3)



def randomized(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every float tensor (weights, BN statistics) redrawn, so two seeds differ everywhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                scale = 1.0 / t[0].numel() ** 0.5 if t.ndim > 1 else 0.2
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=gen) * scale)
    return model.eval()


def rrdbnet(seed: int = 0, **kw) -> RRDBNet:
    return randomized(RRDBNet(**{**RRDB_KW, **kw}), seed)


def same_network(loaded: nn.Module, original: nn.Module, in_ch: int = 3, size=(8, 8)) -> None:
    assert type(loaded) is type(original)
    assert loaded.config == original.config
    assert not loaded.training
    x = torch.rand(2, in_ch, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))


def save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


# --------------------------------------------------------------------------- independent key mappings


def to_esrgan_repo_names(sd: dict) -> dict:
    """BasicSR RRDBNet keys -> the ESRGAN repository's RRDBNet_arch names."""
    top = {"conv_first": "conv_first", "conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2",
           "conv_hr": "HRconv", "conv_last": "conv_last"}
    out = {}
    for key, value in sd.items():
        head, rest = key.split(".", 1)
        if head == "body":  # body.3.rdb2.conv5.bias -> RRDB_trunk.3.RDB2.conv5.bias
            block, rdb, tail = rest.split(".", 2)
            out[f"RRDB_trunk.{block}.RDB{rdb[3]}.{tail}"] = value
        else:
            out[f"{top[head]}.{rest}"] = value
    return out


def to_esrgan_2018_names(sd: dict, num_block: int) -> dict:
    """BasicSR RRDBNet keys -> the 2018 ESRGAN release's sequential ``model.N`` names."""
    top = {"conv_first": "model.0", "conv_body": f"model.1.sub.{num_block}", "conv_up1": "model.3",
           "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    out = {}
    for key, value in sd.items():
        head, rest = key.split(".", 1)
        if head == "body":  # body.3.rdb2.conv5.bias -> model.1.sub.3.RDB2.conv5.0.bias
            block, rdb, conv, param = rest.split(".")
            out[f"model.1.sub.{block}.RDB{rdb[3]}.{conv}.0.{param}"] = value
        else:
            out[f"{top[head]}.{rest}"] = value
    return out


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("layout", ["basicsr_params", "basicsr_bare", "esrgan_repo", "esrgan_2018",
                                    "ddp_prefix", "ddp_compile_prefix", "raysr"])
def test_rrdbnet_loads_from_every_layout(layout, tmp_path):
    g = rrdbnet()
    sd = g.state_dict()
    path = tmp_path / "g.pth"
    if layout == "raysr":
        save_generator(g, path, fmt="raysr")
    else:
        obj = {"basicsr_params": lambda: {"params": sd},
               "basicsr_bare": lambda: sd,
               "esrgan_repo": lambda: to_esrgan_repo_names(sd),
               "esrgan_2018": lambda: to_esrgan_2018_names(sd, RRDB_KW["num_block"]),
               "ddp_prefix": lambda: {"params": {f"module.{k}": v for k, v in sd.items()}},
               "ddp_compile_prefix": lambda: {f"module._orig_mod.{k}": v for k, v in sd.items()}}[layout]()
        save(obj, path)
    same_network(load_generator(path), g)
    same_network(load_generator(str(path)), g)


def test_2018_layout_maps_each_position():
    sd = to_esrgan_2018_names(rrdbnet().state_dict(), 2)
    assert "model.1.sub.0.RDB1.conv1.0.weight" in sd and "model.1.sub.2.weight" in sd  # the layout we emulate
    g = load_generator(sd)
    assert torch.equal(g.conv_up2.weight, sd["model.6.weight"])
    assert torch.equal(g.conv_body.bias, sd["model.1.sub.2.bias"])
    assert torch.equal(g.body[1].rdb3.conv5.weight, sd["model.1.sub.1.RDB3.conv5.0.weight"])


@pytest.mark.parametrize("scale,size", [(2, (8, 6)), (1, (8, 12))])
def test_rrdbnet_scale_inferred_from_conv_first_channels(scale, size):
    g = rrdbnet(scale=scale)
    loaded = load_generator({"params": g.state_dict()})
    assert loaded.scale == scale
    same_network(loaded, g, size=size)


def test_params_ema_preferred_over_params(tmp_path):
    raw, ema = rrdbnet(seed=1), rrdbnet(seed=2)
    same_network(load_generator({"params": raw.state_dict(), "params_ema": ema.state_dict()}), ema)
    for fmt in ("basicsr", "raysr"):
        save_generator(raw, tmp_path / f"{fmt}.pth", fmt=fmt, ema=ema)
        same_network(load_generator(tmp_path / f"{fmt}.pth"), ema)
        save_generator(raw, tmp_path / f"{fmt}_noema.pth", fmt=fmt)
        same_network(load_generator(tmp_path / f"{fmt}_noema.pth"), raw)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("variant", ["msrresnet", "paper"])
def test_srresnet_arch_inferred(scale, variant):
    g = randomized(SRResNet(num_feat=5, num_block=3, scale=scale, variant=variant), seed=scale)
    same_network(load_generator(g.state_dict()), g)


def test_mmsr_msrresnet_names():
    g = randomized(SRResNet(num_feat=5, num_block=2, scale=4), seed=0)
    renamed = {k.replace("body.", "recon_trunk.").replace("conv_hr.", "HRconv."): v
               for k, v in g.state_dict().items()}
    assert "recon_trunk.1.conv2.weight" in renamed and "HRconv.bias" in renamed
    same_network(load_generator(renamed), g)


@pytest.mark.parametrize("model", [SRCNN(num_feat=(6, 4), kernel_sizes=(5, 3, 3), scale=3),
                                   VDSR(num_feat=5, num_layer=4, scale=2)], ids=["srcnn", "vdsr"])
def test_scale_free_archs_need_a_scale_override(model):
    g = randomized(model, seed=0)
    with pytest.raises(ValueError, match=r"do not record the scale; pass scale="):
        load_generator(g.state_dict())
    same_network(load_generator(g.state_dict(), scale=g.scale), g)


def test_overrides_resolve_ambiguous_rrdbnet():
    # 12 input channels at x4 looks exactly like RGB at x2 (pixel-unshuffled to 12 channels)
    g = rrdbnet(num_in_ch=12, scale=4)
    assert load_generator(g.state_dict()).config["scale"] == 2  # the RGB -> RGB assumption
    same_network(load_generator(g.state_dict(), scale=4), g, in_ch=12)
    same_network(load_generator(g.state_dict(), num_in_ch=12), g, in_ch=12)

    gray_to_rgb = rrdbnet(num_in_ch=1, scale=4)
    with pytest.raises(ValueError, match=r"cannot tell RRDBNet's scale: conv_first takes 1 channels.*num_in_ch="):
        load_generator(gray_to_rgb.state_dict())
    same_network(load_generator(gray_to_rgb.state_dict(), num_in_ch=1), gray_to_rgb, in_ch=1)


def test_overrides_that_do_not_fit_name_the_parameters():
    sd = rrdbnet().state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch \['body.0.rdb1.conv1.weight: checkpoint \(3, 6, 3, 3\) "
                                         r"vs network \(4, 6, 3, 3\)'"):
        load_generator(sd, num_grow_ch=4)
    with pytest.raises(ValueError, match=r"unexpected \['body.1.rdb1.conv1.weight'"):
        load_generator(sd, num_block=1)
    with pytest.raises(ValueError, match=r"does not take \['nb'\]; it accepts"):
        load_generator(sd, nb=2)


def test_unrecognised_checkpoints_say_what_was_found(tmp_path):
    t = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unrecognised generator checkpoint layout; parameters found: "
                                         r"\['encoder.weight', 'encoder.bias'\]; supported: raysr"):
        load_generator({"encoder.weight": t, "encoder.bias": t})
    with pytest.raises(ValueError, match=r"top-level keys \['epoch', 'optimizer'\] hold no state dict"):
        load_generator({"epoch": 3, "optimizer": {"lr": 1.0}})
    bad_2018 = {**to_esrgan_2018_names(rrdbnet().state_dict(), 2), "model.12.weight": t}
    with pytest.raises(ValueError, match=r"ESRGAN 2018 release checkpoint has an unexpected parameter "
                                         r"'model.12.weight'"):
        load_generator(bad_2018)
    truncated = {k: v for k, v in rrdbnet().state_dict().items() if not k.startswith("body.0.")}
    with pytest.raises(ValueError, match=r"indices \[1\] are not contiguous"):
        load_generator(truncated)
    with pytest.raises(ValueError, match=r"not a plain weights file: torch.load\(weights_only=True\) refused it "
                                         r"\(WeightsUnpickler error: Unsupported global: GLOBAL "
                                         r"torch.nn.modules.conv.Conv2d.*re-save its state_dict\(\)$"):
        load_generator(save(nn.Conv2d(3, 3, 3), tmp_path / "pickled_module.pth"))
    with pytest.raises(ValueError, match="a generator checkpoint is a dict, got Tensor"):
        load_generator(save(t, tmp_path / "tensor.pth"))
    with pytest.raises(ValueError, match=r"raysr checkpoint version 2 is not supported"):
        load_generator({"format": "raysr", "version": 2, "arch": "rrdbnet", "kwargs": {}, "params": {"a": t}})
    with pytest.raises(raysr.storage.StorageError, match="does not exist"):
        load_generator(tmp_path / "missing.pth")


# one small network of each family, at scales the other tests do not use
EACH_GENERATOR = [SRCNN(num_feat=(6, 4), scale=2), VDSR(num_feat=5, num_layer=3, scale=3),
                  SRResNet(num_feat=5, num_block=2, scale=3, variant="paper"),
                  RRDBNet(num_feat=5, num_block=1, num_grow_ch=2, scale=1),
                  RRDBNet(num_feat=5, num_block=1, num_grow_ch=2, scale=2),
                  build_generator("compact", num_feat=5, num_conv=2, scale=3, act_type="relu")]
EACH_GENERATOR_IDS = ["srcnn", "vdsr", "srresnet-paper", "rrdbnet-x1", "rrdbnet-x2", "compact-relu-x3"]


@pytest.mark.parametrize("model", EACH_GENERATOR, ids=EACH_GENERATOR_IDS)
def test_raysr_format_rebuilds_each_generator(model, tmp_path):
    g = randomized(model, seed=3)
    save_generator(nn.DataParallel(g), tmp_path / "g.pth", fmt="raysr")  # the wrapper is unwrapped
    stored = torch.load(tmp_path / "g.pth", weights_only=True)
    assert set(stored) == {"format", "version", "arch", "kwargs", "params"}
    assert (stored["format"], stored["version"]) == ("raysr", 1)
    assert build_generator(stored["arch"], **stored["kwargs"]).config == g.config
    assert set(stored["params"]) == set(g.state_dict())  # no "module." prefix
    same_network(load_generator(tmp_path / "g.pth"), g, size=(8, 8))


def test_save_errors(tmp_path):
    g = rrdbnet()
    with pytest.raises(ValueError, match=r"fmt must be one of \['basicsr', 'raysr'\], got 'onnx'"):
        save_generator(g, tmp_path / "g.pth", fmt="onnx")
    with pytest.raises(ValueError, match=r"'body.1.rdb1.conv1.weight' is missing from ema"):
        save_generator(g, tmp_path / "g.pth", ema=rrdbnet(num_block=1))
    with pytest.raises(ValueError, match="expected an nn.Module or a state dict of tensors, got list"):
        save_generator(g, tmp_path / "g.pth", ema=[1, 2])
    with pytest.raises(ValueError, match="Conv2d is not a raysr generator"):
        save_generator(nn.Conv2d(3, 3, 3), tmp_path / "g.pth", fmt="raysr")
    assert not (tmp_path / "g.pth").exists()


def test_s3_save_and_load(s3_bucket):
    raw, ema = rrdbnet(seed=4), rrdbnet(seed=5)
    uri = f"s3://{s3_bucket}/runs/esrgan/g.pth"
    save_generator(raw, uri, fmt="raysr", ema=ema)
    assert raysr.storage.exists(uri)
    same_network(load_generator(uri), ema)
    save_generator(raw, uri.replace("g.pth", "basicsr.pth"))
    same_network(load_generator(uri.replace("g.pth", "basicsr.pth")), raw)
    with pytest.raises(raysr.storage.StorageError, match="does not exist"):
        load_generator(f"s3://{s3_bucket}/runs/none.pth")


# --------------------------------------------------------------------------- training states


TRAINING_GENERATORS = {
    "rrdbnet": (["model.generator.name=rrdbnet", "model.generator.num_feat=6", "model.generator.num_block=2",
                 "model.generator.num_grow_ch=3"], lambda: RRDBNet(**RRDB_KW)),
    "srresnet-paper": (["model.generator.name=srresnet", "model.generator.variant=paper",
                        "model.generator.num_feat=5", "model.generator.num_block=2", "model.generator.scale=3",
                        "data.gt_size=36"], lambda: SRResNet(num_feat=5, num_block=2, scale=3, variant="paper")),
}


def training_state(tmp_path, arch: str, ema_decay: float) -> tuple[str, dict]:
    """A run's state.pt as raysr.engine writes it, with G (seed 1) and its EMA (seed 2) set apart."""
    cfg = load_config("quickstart", overrides=TRAINING_GENERATORS[arch][0] + [f"train.ema_decay={ema_decay}"])
    state = build_state(cfg, torch.device("cpu"))
    randomized(state.g_module, seed=1)
    if state.ema is not None:
        randomized(state.ema.module, seed=2)
    sd = run_checkpoint.state_dict(state)
    return save(sd, tmp_path / "state.pt"), sd


@pytest.mark.parametrize("arch", sorted(TRAINING_GENERATORS))
def test_training_state_loads_the_ema_generator(arch, tmp_path):
    path, sd = training_state(tmp_path, arch, ema_decay=0.9)
    assert {"step", "config", "g", "g_ema", "opt_g", "sched_g", "ranks"} <= set(sd)
    build = TRAINING_GENERATORS[arch][1]
    same_network(load_generator(path), randomized(build(), seed=2), size=(6, 7))
    same_network(load_generator(sd), randomized(build(), seed=2), size=(6, 7))  # an already-loaded dict


def test_training_state_without_ema_loads_g(tmp_path):
    path, sd = training_state(tmp_path, "rrdbnet", ema_decay=0.0)
    assert "g_ema" not in sd
    same_network(load_generator(path), rrdbnet(seed=1))


def test_training_state_errors(tmp_path):
    _, sd = training_state(tmp_path, "rrdbnet", ema_decay=0.0)
    with pytest.raises(ValueError, match=r"weights do not fit rrdbnet\(.*num_block=1.*unexpected \['body.1."):
        load_generator(sd, num_block=1)  # overrides replace the run's config
    with pytest.raises(ValueError, match=r"config has no model.generator section \(config keys: \['data'\]\)"):
        load_generator({**sd, "config": {"data": {}}})
    renamed = {**sd["config"], "model": {"generator": {**sd["config"]["model"]["generator"], "name": "edsr"}}}
    with pytest.raises(ValueError, match=r"model.generator.name 'edsr' is not a raysr generator; known: \['compact', 'rrdbnet'"):
        load_generator({**sd, "config": renamed})
    extra = {**sd["config"], "model": {"generator": {**sd["config"]["model"]["generator"], "depth": 3}}}
    with pytest.raises(ValueError, match=r"does not fit this raysr version: .*'depth'"):
        load_generator({**sd, "config": extra})


# --------------------------------------------------------------------------- interpolation


def test_interpolate_mixes_every_weight(tmp_path):
    psnr, gan = rrdbnet(seed=1), rrdbnet(seed=2)
    sd_a, sd_b = psnr.state_dict(), gan.state_dict()
    for alpha in (0.0, 1.0, 0.5, 0.8):
        mixed = interpolate(psnr, gan, alpha).state_dict()
        assert mixed.keys() == sd_a.keys()
        worst = max((mixed[k].double() - ((1 - alpha) * sd_a[k].double() + alpha * sd_b[k].double())).abs().max()
                    for k in sd_a)
        assert worst < 1e-7
    assert all(torch.equal(interpolate(psnr, gan, 0).state_dict()[k], sd_a[k]) for k in sd_a)
    assert all(torch.equal(interpolate(psnr, gan, 1).state_dict()[k], sd_b[k]) for k in sd_b)
    # inputs may be checkpoints; the inputs themselves are left unchanged
    save_generator(gan, tmp_path / "gan.pth")
    from_file = interpolate(psnr, tmp_path / "gan.pth", 0.5)
    same_network(from_file, interpolate(psnr, gan, 0.5))
    assert all(torch.equal(psnr.state_dict()[k], v) for k, v in sd_a.items())


def test_interpolate_mixes_bn_statistics_and_keeps_counters():
    a = randomized(SRResNet(num_feat=4, num_block=1, scale=2, variant="paper"), seed=1)
    b = randomized(SRResNet(num_feat=4, num_block=1, scale=2, variant="paper"), seed=2)
    b.body[0].bn1.num_batches_tracked.fill_(9)
    out = interpolate(a, b, 0.25)
    want = 0.75 * a.body[0].bn1.running_var.double() + 0.25 * b.body[0].bn1.running_var.double()
    torch.testing.assert_close(out.body[0].bn1.running_var.double(), want, atol=1e-7, rtol=0)
    assert out.body[0].bn1.num_batches_tracked.item() == 0


@pytest.mark.parametrize("b,alpha,message", [
    (lambda: rrdbnet(), -0.1, r"alpha must be a number in \[0, 1\]"),
    (lambda: rrdbnet(), 1.5, r"alpha must be a number in \[0, 1\]"),
    (lambda: rrdbnet(), "0.5", r"alpha must be a number in \[0, 1\]"),
    (lambda: rrdbnet(num_block=1), 0.5, r"'body.1.rdb1.conv1.weight' is missing from b"),
    (lambda: rrdbnet(num_feat=8), 0.5, r"differ in shape at 'conv_first.weight': \(6, 3, 3, 3\) vs \(8, 3, 3, 3\)"),
    (lambda: SRResNet(num_feat=6, num_block=2), 0.5, r"'body.0.rdb1.conv1.weight' is missing from b"),
])
def test_interpolate_errors(b, alpha, message):
    with pytest.raises(ValueError, match=message):
        interpolate(rrdbnet(), b(), alpha)


def test_interpolate_refuses_same_shapes_different_scale():
    with pytest.raises(ValueError, match="built differently"):
        interpolate(SRCNN(scale=2), SRCNN(scale=4), 0.5)


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("model", EACH_GENERATOR, ids=EACH_GENERATOR_IDS)
def test_safetensors_raysr_format_round_trips_each_generator(model, tmp_path):
    from safetensors import safe_open

    g, ema = randomized(model, seed=3), randomized(copy_of(model), seed=4)
    path = tmp_path / "g.safetensors"
    save_generator(g, path, fmt="raysr", ema=ema)
    with safe_open(str(path), framework="pt") as f:  # an ordinary safetensors file: the EMA weights, bare names
        assert set(f.keys()) == set(ema.state_dict())
        arch = {"SRVGGNetCompact": "compact"}.get(type(g).__name__, type(g).__name__.lower())
        assert f.metadata()["arch"] == arch and f.metadata()["weights"] == "params_ema"
        assert all(torch.equal(f.get_tensor(k), v) for k, v in ema.state_dict().items())
    same_network(load_generator(path), ema)


def copy_of(model: nn.Module) -> nn.Module:
    return type(model)(**model.config)


def test_safetensors_from_other_tools_load_like_their_pth(tmp_path):
    """A bare state dict written by safetensors itself (as chaiNNer / traiNNer-redux ship
    RRDBNet and ESRGAN-named weights) loads like the same dict in a .pth."""
    from safetensors.torch import save_file

    g = rrdbnet(seed=6)
    save_file(to_esrgan_repo_names(g.state_dict()), str(tmp_path / "esrgan.safetensors"))
    same_network(load_generator(tmp_path / "esrgan.safetensors"), g)
    save_generator(g, tmp_path / "basicsr.safetensors", fmt="basicsr")  # no metadata: inferred from shapes
    same_network(load_generator(tmp_path / "basicsr.safetensors"), g)
    # the extension is not what decides: content does
    (tmp_path / "renamed.pth").write_bytes((tmp_path / "basicsr.safetensors").read_bytes())
    same_network(load_generator(tmp_path / "renamed.pth"), g)


def test_damaged_safetensors_is_a_clear_error(tmp_path):
    save_generator(rrdbnet(), tmp_path / "g.safetensors", fmt="raysr")
    data = (tmp_path / "g.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable safetensors file"):
        load_generator(tmp_path / "cut.safetensors")


def test_init_from_reads_a_safetensors_generator(tmp_path):
    cfg_keys = ["model.generator.name=rrdbnet", "model.generator.num_feat=6", "model.generator.num_block=2",
                "model.generator.num_grow_ch=3", "data.gt_size=32"]
    source = rrdbnet(seed=8)
    save_generator(source, tmp_path / "psnr.safetensors", fmt="raysr")
    cfg = load_config("quickstart", overrides=cfg_keys + [f"train.init_from={tmp_path / 'psnr.safetensors'}"])
    state = build_state(cfg, torch.device("cpu"))
    same_network(state.g_module.eval(), source)
