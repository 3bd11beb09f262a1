"""The plain-PyTorch training step (raysr.engine), without Ray: schedules, EMA, G/D updates, resume,
and what keeps a GPU busy (no host reads in a step, compile, fused Adam, TF32, where LR is made)."""

import copy
import math
import os

import pytest
import torch

from raysr import run_checkpoint
from raysr.config import ConfigError, ScheduleConfig, load_config
from raysr.data.loader import resolve_lr_on
from raysr.engine import EMA, build_state, configure_cuda, lr_factor, train_step
from raysr.runlog import Meter

TINY_PSNR = ["model.generator.num_feat=8", "model.generator.num_block=1", "data.gt_size=32",
             "data.batch_size=2", "optim.schedule.type=constant"]
TINY_GAN = ["model.generator.num_feat=8", "model.generator.num_block=1", "model.generator.num_grow_ch=4",
            "model.discriminator.num_feat=8", "data.gt_size=96",
            "loss.perceptual.allow_random_weights=true", "loss.perceptual.layers={conv2_2: 1.0}"]


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same initial weights, so none depends on a lucky draw."""
    torch.manual_seed(0)


def batch(seed, n=2, gt=32, scale=4):
    """A learnable (LR, HR) pair: smooth HR (bilinear of coarse noise), LR by area averaging."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, gt // 8, gt // 8, generator=g)
    hr = torch.nn.functional.interpolate(coarse, size=(gt, gt), mode="bilinear", align_corners=False)
    lr = torch.nn.functional.avg_pool2d(hr, scale)
    return lr, hr


def floats(out: dict) -> dict:
    """A step's scalars read to the host (the step returns 0-dim device tensors, and the lr)."""
    return {k: float(v) for k, v in out.items()}


def params(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("step,expected", [(0, 1.0), (49_999, 1.0), (50_000, 0.5), (100_000, 0.25),
                                           (250_000, 0.125), (399_999, 0.0625)])
def test_multistep_halves_at_esrgan_milestones(step, expected):
    s = ScheduleConfig(type="multistep", milestones=[50_000, 100_000, 200_000, 300_000], gamma=0.5)
    assert lr_factor(step, s, 1e-4) == pytest.approx(expected)


def test_cosine_restart_follows_half_cosine_and_restarts():
    base, eta_min = 2e-4, 1e-7
    s = ScheduleConfig(type="cosine_restart", periods=[100, 100], eta_min=eta_min)
    assert lr_factor(0, s, base) == pytest.approx(1.0)
    # halfway through a period: (base + eta_min) / 2
    assert lr_factor(50, s, base) * base == pytest.approx((base + eta_min) / 2)
    # a quarter: eta_min + (base - eta_min) * (1 + cos(pi/4)) / 2
    assert lr_factor(25, s, base) * base == pytest.approx(eta_min + (base - eta_min) * (1 + math.sqrt(0.5)) / 2)
    assert lr_factor(100, s, base) == pytest.approx(1.0)  # restart
    assert lr_factor(250, s, base) * base == pytest.approx(eta_min)  # after the last period


# --------------------------------------------------------------------------- EMA


def test_ema_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = params(ema.module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    expected = 0.9 * before + 0.1 * params(model)
    assert torch.allclose(params(ema.module), expected, atol=1e-7)
    assert not any(p.requires_grad for p in ema.module.parameters())


# --------------------------------------------------------------------------- steps


def test_psnr_phase_step_equals_a_hand_written_adam_step_on_the_pixel_loss():
    cfg = load_config("quickstart", overrides=TINY_PSNR + ["loss.pixel.type=mse", "loss.pixel.weight=2.0"])
    state = build_state(cfg, torch.device("cpu"))
    reference = copy.deepcopy(state.g_module)
    opt = torch.optim.Adam(reference.parameters(), lr=cfg.optim.g.lr, betas=tuple(cfg.optim.g.betas))
    for seed in range(3):
        lr, hr = batch(seed)
        out = floats(train_step(state, lr, hr))
        loss = 2.0 * ((reference(lr) - hr) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert out["loss_pix"] == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(params(state.g_module), params(reference), atol=1e-6)
    assert state.step == 3


def test_gan_step_updates_g_and_d_and_reports_finite_losses():
    cfg = load_config("esrgan_x4", overrides=TINY_GAN)
    state = build_state(cfg, torch.device("cpu"))
    g0, d0 = params(state.g_module), params(state.d_module)
    lr, hr = batch(1, gt=96)
    with torch.no_grad():
        l1_before = (copy.deepcopy(state.g_module)(lr) - hr).abs().mean().item()
    out = floats(train_step(state, lr, hr))
    for key in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d", "d_real", "d_fake", "lr"):
        assert math.isfinite(out[key]), key
    assert not torch.equal(params(state.g_module), g0)
    assert not torch.equal(params(state.d_module), d0)
    # the EMA generator moved only by (1 - decay) of G's change
    assert not torch.equal(params(state.ema.module), params(state.g_module))
    # η-weighted pixel loss: the reported value is η = 1e-2 × L1 of G's output before the update
    assert cfg.loss.pixel.weight == 1e-2
    assert out["loss_pix"] == pytest.approx(1e-2 * l1_before, rel=1e-5)


def test_d_init_steps_train_d_alone():
    cfg = load_config("esrgan_x4", overrides=TINY_GAN + ["train.d_init_steps=2"])
    state = build_state(cfg, torch.device("cpu"))
    g0, d0 = params(state.g_module), params(state.d_module)
    out = train_step(state, *batch(2, gt=96))
    assert "loss_g" not in out and "loss_d" in out
    assert torch.equal(params(state.g_module), g0)
    assert not torch.equal(params(state.d_module), d0)
    train_step(state, *batch(3, gt=96))
    out = train_step(state, *batch(4, gt=96))  # step 2: G joins
    assert "loss_g" in out and not torch.equal(params(state.g_module), g0)


def test_d_learns_to_separate_real_from_fake():
    cfg = load_config("esrgan_x4", overrides=TINY_GAN + ["loss.adversarial.type=vanilla", "optim.d.lr=1e-3",
                                                          "optim.g.lr=1e-9"])
    state = build_state(cfg, torch.device("cpu"))
    lr, hr = batch(5, gt=96)
    for _ in range(15):
        out = floats(train_step(state, lr, hr))
    assert out["d_real"] > out["d_fake"]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_adjustable_gradient_clipping_bounds_each_gradient_by_theta_over_lr():
    theta, lr_value = 1e-9, 1e-3  # bound 1e-6: far below any gradient of a random init
    cfg = load_config("vdsr_x4", overrides=["model.generator.num_feat=4", "model.generator.num_block=3",
                                            f"train.grad_clip={theta}", f"optim.g.lr={lr_value}"])
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    seen = []
    orig_step = state.opt_g.step

    def spy_step(*a, **kw):
        seen.append(max(p.grad.abs().max().item() for p in state.g_module.parameters()))
        return orig_step(*a, **kw)

    state.opt_g.step = spy_step
    train_step(state, *batch(6, gt=32))
    assert seen and seen[0] <= theta / lr_value * (1 + 1e-6)  # float32 rounding of the bound
    assert seen[0] == pytest.approx(theta / lr_value)  # and the largest gradient was clipped to it


def test_resume_from_state_dict_continues_exactly():
    cfg = load_config("esrgan_x4", overrides=TINY_GAN)
    torch.manual_seed(0)
    a = build_state(cfg, torch.device("cpu"))
    for i in range(2):
        train_step(a, *batch(10 + i, gt=96))
    saved = copy.deepcopy(run_checkpoint.state_dict(a))
    for i in range(2, 4):
        train_step(a, *batch(10 + i, gt=96))

    torch.manual_seed(123)  # different init: everything must come from the state dict
    b = build_state(cfg, torch.device("cpu"))
    run_checkpoint.restore(b, saved)
    assert b.step == 2
    for i in range(2, 4):
        train_step(b, *batch(10 + i, gt=96))
    assert torch.equal(params(a.g_module), params(b.g_module))
    assert torch.equal(params(a.d_module), params(b.d_module))
    assert torch.equal(params(a.ema.module), params(b.ema.module))
    assert a.opt_g.param_groups[0]["lr"] == b.opt_g.param_groups[0]["lr"]


def test_gan_state_refuses_a_psnr_checkpoint_with_advice():
    psnr_cfg = load_config("esrgan_psnr_x4", overrides=["model.generator.num_feat=8", "model.generator.num_block=1",
                                                        "model.generator.num_grow_ch=4"])
    psnr_state = run_checkpoint.state_dict(build_state(psnr_cfg, torch.device("cpu")))
    gan = build_state(load_config("esrgan_x4", overrides=TINY_GAN), torch.device("cpu"))
    with pytest.raises(ValueError, match="init_from"):
        run_checkpoint.restore(gan, psnr_state)


def test_bf16_channels_last_path_runs_on_cpu_and_tracks_fp32():
    """The CUDA default (bf16 autocast + channels_last) forced on CPU: same step, bf16-close losses."""
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = load_config("esrgan_x4", overrides=TINY_GAN + [f"run.precision={precision}"])
        state = build_state(cfg, torch.device("cpu"))
        if precision == "bf16":
            assert state.g_module.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
        losses[precision] = floats(train_step(state, *batch(20, gt=96)))
    # measured with torch 2.13 on CPU: relative differences 5e-5 (pix), 1.9e-3 (percep), 1.0e-3 (d);
    # 5% leaves room for other bf16 kernels (bf16 keeps 8 bits of mantissa: 2**-8 = 0.4% per rounding)
    for key in ("loss_pix", "loss_percep", "loss_d"):
        assert math.isfinite(losses["bf16"][key])
        assert losses["bf16"][key] == pytest.approx(losses["fp32"][key], rel=0.05), key


# --------------------------------------------------------------------------- speed: what keeps a GPU busy

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every way a tensor's value reaches Python (each one a GPU sync on CUDA)."""
    counts = {}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


@pytest.mark.parametrize("preset,overrides,gt", [
    ("vdsr_x4", ["model.generator.num_feat=4", "model.generator.num_block=3", "train.grad_clip=0.4"], 32),
    ("esrgan_x4", TINY_GAN + ["train.d_init_steps=2"], 96),  # RaGAN, perceptual, EMA, D warm-up
])
def test_steps_never_read_a_tensor_on_the_host_and_the_meter_reads_once_per_interval(preset, overrides, gt,
                                                                                       host_reads):
    state = build_state(load_config(preset, overrides=overrides), torch.device("cpu"))
    meter, batches = Meter(), [batch(30 + i, gt=gt) for i in range(4)]
    for interval in range(2):
        host_reads.clear()
        for lr, hr in batches:
            meter.add(train_step(state, lr, hr), batch=2, wait=0.0, total=0.1)
        assert host_reads == {}, f"train_step read tensors on the host: {host_reads}"
        summary = meter.summary()
        assert host_reads == {"tolist": 1}  # one device -> host copy per log interval
        meter.reset_interval()
    host_reads.clear()
    assert all(math.isfinite(v) for v in summary.values())
    float(summary["lr"] * torch.ones(()))  # the counter does see a read
    assert host_reads["__float__"] == 1


def test_meter_means_each_scalar_over_the_steps_that_reported_it():
    meter = Meter()
    meter.add({"loss_d": torch.tensor(1.0)}, batch=2, wait=0.0, total=1.0)  # D warm-up step: no loss_g
    meter.add({"loss_d": torch.tensor(3.0), "loss_g": torch.tensor(5.0)}, batch=2, wait=0.5, total=1.0)
    m = meter.summary()
    assert (m["loss_d"], m["loss_g"], m["crops_per_s"], m["data_wait_frac"]) == (2.0, 5.0, 2.0, 0.25)


@pytest.mark.slow  # inductor compiles G, D and VGG: about a minute
def test_compiled_gan_step_gives_the_eager_losses():
    """run.compile=default (G, D and the VGG loss compiled by inductor) vs eager, three GAN steps
    from the same weights: losses agree to 1e-4 relative, D's mean logits (near 0) to 1e-3
    absolute; the compiled kernels reorder float sums, and Adam carries the difference on."""
    small = ["model.generator.name=srresnet", "model.generator.num_feat=8", "model.generator.num_block=1",
             "model.discriminator.num_feat=8", "data.gt_size=96",
             "loss.perceptual.allow_random_weights=true", "loss.perceptual.layers={conv1_1: 1.0}",
             "loss.adversarial.type=vanilla", "train.ema_decay=0"]  # fewest graphs: compiling takes ~1 min here
    runs = {}
    # inductor's C++ kernels compiled in this process, one after the other: its default pool of compile
    # processes (one per core) starts by importing torch in each, for nothing on a machine as busy as the
    # test run keeps it; the kernels are the same
    import torch._inductor.config

    with torch._inductor.config.patch(compile_threads=1):
        for mode in ("off", "default"):
            torch.manual_seed(0)
            state = build_state(load_config("esrgan_x4", overrides=small + [f"run.compile={mode}"]), torch.device("cpu"))
            runs[mode] = [floats(train_step(state, *batch(40 + i, gt=96))) for i in range(3)]
    assert isinstance(state.g, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(state.d, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(state.perceptual_for_g, torch._dynamo.eval_frame.OptimizedModule)
    for eager, compiled in zip(runs["off"], runs["default"]):
        for key in ("loss_g", "loss_pix", "loss_percep", "loss_adv", "loss_d"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-7), key
        for key in ("d_real", "d_fake"):
            assert compiled[key] == pytest.approx(eager[key], abs=1e-3), key
    # checkpoints hold the bare networks' keys, loadable by an eager model
    saved = run_checkpoint.state_dict(state)
    assert not any("_orig_mod" in k for part in ("g", "d") for k in saved[part])
    assert set(saved["g"]) == set(state.g_module.state_dict())


def test_fast_path_switches_reach_the_optimizer_and_cuda():
    state = build_state(load_config("quickstart", overrides=TINY_PSNR), torch.device("cpu"))
    assert state.opt_g.defaults["fused"] is True  # the default: fused Adam, no host-side step counter
    state = build_state(load_config("quickstart", overrides=TINY_PSNR + ["optim.fused=false"]), torch.device("cpu"))
    assert not state.opt_g.defaults["fused"]
    # YAML reads an unquoted `off` as false; run.compile takes it as "off"
    assert load_config("quickstart", overrides=["run.compile=off"]).run.compile == "off"
    with pytest.raises(ConfigError, match=r"run\.compile: 'fast' is not allowed; choose one of"):
        load_config("quickstart", overrides=["run.compile=fast"])
    with pytest.raises(ConfigError, match=r"run\.tf32: expected true or false"):
        load_config("quickstart", overrides=["run.tf32=auto"])


@pytest.fixture
def cuda_settings_restored():
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved[:2]
    torch.backends.cudnn.benchmark = saved[2]


def test_configure_cuda_sets_tf32_and_cudnn_benchmark(cuda_settings_restored):
    configure_cuda(tf32=True, cudnn_benchmark=True)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark) == ("tf32", "tf32", True)
    configure_cuda(tf32=False, cudnn_benchmark=False)
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.benchmark) == ("ieee", "ieee", False)


def test_run_deterministic_asks_torch_for_deterministic_kernels(cuda_settings_restored, monkeypatch):
    """run.deterministic: torch's deterministic kernels (an error for an op without one), cuDNN's deterministic
    convolutions without its benchmark, cuBLAS's fixed workspace; and two fresh runs give the same weights."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = load_config("esrgan_psnr_x4", overrides=[*TINY_PSNR, "model.generator.num_grow_ch=4", "run.deterministic=true"])
    runs = []
    try:
        for _ in range(2):
            torch.manual_seed(0)
            state = build_state(cfg, torch.device("cpu"))
            assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
            assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            for i in range(2):
                train_step(state, *batch(i))
            runs.append(params(state.g_module))
        assert torch.equal(*runs)
    finally:
        build_state(load_config("esrgan_psnr_x4", overrides=TINY_PSNR), torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_lr_on_auto_makes_lr_in_the_loader_on_cpu_and_on_the_gpu_there():
    assert load_config("quickstart").data.lr_on == "auto"
    assert resolve_lr_on("auto", torch.device("cpu")) == "loader"
    assert resolve_lr_on("auto", torch.device("cuda", 1)) == "device"
    assert resolve_lr_on("loader", torch.device("cuda")) == "loader"
    with pytest.raises(ValueError, match="lr_on must be one of"):
        resolve_lr_on("gpu", torch.device("cpu"))


# --------------------------------------------------------------------------- divergence guard


def snapshot(state) -> dict[str, torch.Tensor]:
    """Every tensor a step may change: G, D, EMA (parameters and buffers) and both optimizers' states."""
    from raysr import run_checkpoint

    saved = run_checkpoint.state_dict(state)
    out = {}
    for part in ("g", "g_ema", "d"):  # a PSNR-phase state has no D
        out.update({f"{part}.{k}": v.clone() for k, v in saved.get(part, {}).items()})
    for part in ("opt_g", "opt_d"):
        for index, slots in saved.get(part, {"state": {}})["state"].items():
            out.update({f"{part}.{index}.{k}": v.clone() for k, v in slots.items()})
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_updates_nothing_and_is_counted(fused):
    cfg = load_config("esrgan_x4", overrides=TINY_GAN + ["train.ema_decay=0.5", f"optim.fused={str(fused).lower()}"])
    state = build_state(cfg, torch.device("cpu"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in state.d_module.modules())  # D's buffers are guarded too
    train_step(state, *batch(40, gt=96))
    before = snapshot(state)
    lr, hr = batch(41, gt=96)
    hr[0, 0, 5, 5] = float("nan")
    out = train_step(state, lr, hr)
    assert float(out["nonfinite_steps"]) == 1.0 and not math.isfinite(float(out["loss_g"]))
    after = snapshot(state)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"a skipped step changed {changed[:5]}"
    assert state.step == 2 and int(state.diverged_at) == -1
    out = train_step(state, *batch(42, gt=96))  # the next finite step trains again
    assert float(out["nonfinite_steps"]) == 0.0
    assert not torch.equal(snapshot(state)["g.conv_first.weight"], before["g.conv_first.weight"])


def test_an_overflowed_gradient_under_grad_clip_updates_nothing():
    """A finite loss whose backward overflows (one gradient +inf): clipping (VDSR's train.grad_clip)
    would turn the inf into the clip bound and apply the step; the check sees the gradient first."""
    cfg = load_config("quickstart", overrides=TINY_PSNR + ["train.grad_clip=0.4", "train.ema_decay=0.5"])
    state = build_state(cfg, torch.device("cpu"))
    train_step(state, *batch(60))
    before = snapshot(state)
    weight = state.g_module.conv_first.weight
    handle = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    out = train_step(state, *batch(61))
    handle.remove()
    assert math.isfinite(float(out["loss_g"])) and float(out["nonfinite_steps"]) == 1.0
    after = snapshot(state)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"an overflowed step changed {changed[:5]}"
    out = train_step(state, *batch(62))  # the next step trains (and is clipped) as usual
    assert float(out["nonfinite_steps"]) == 0.0
    assert not torch.equal(snapshot(state)["g.conv_first.weight"], before["g.conv_first.weight"])


def test_max_nonfinite_steps_in_a_row_mark_the_step_it_diverged_at():
    cfg = load_config("quickstart", overrides=TINY_PSNR + ["train.max_nonfinite=3"])
    state = build_state(cfg, torch.device("cpu"))
    lr, hr = batch(50)
    nan_hr = hr.clone().fill_(float("nan"))
    for step_hr in (nan_hr, nan_hr, hr, nan_hr, nan_hr):  # a finite step resets the run of non-finite ones
        train_step(state, lr, step_hr)
    assert int(state.diverged_at) == -1 and float(state.nonfinite_run) == 2
    train_step(state, lr, nan_hr)
    train_step(state, lr, nan_hr)
    assert int(state.diverged_at) == 6  # the third in a row was step 6; step 7 does not move it


# --------------------------------------------------------------------------- gradient accumulation


def without_batchnorm(module: torch.nn.Module) -> None:
    """Every BatchNorm of ``module`` replaced by the identity, in place."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            without_batchnorm(child)


@pytest.mark.parametrize("phase", ["psnr", "gan"])
@pytest.mark.parametrize("micro_batches", [2, 3])
def test_accumulating_micro_batches_gives_the_whole_batch_step(phase, micro_batches):
    """Three steps on batches of 6 crops, each step in ``micro_batches`` micro-batches (3 or 2 crops
    each; 3 micro-batches of 2), against one pass per batch: the same weights of G, D and the EMA.

    Equal in exact arithmetic because every loss is a mean over crops of per-crop terms and each
    micro-batch's loss is weighted by its crops. In the GAN phase that takes a discriminator
    without BatchNorm (BatchNorm normalises over the micro-batch, so D's outputs, and G's
    adversarial gradient through D, depend on how the batch is cut) and the vanilla GAN loss
    (RaGAN compares each logit with the batch mean of the other kind's). With BatchNorm and RaGAN
    a micro-batch computes what one DDP rank of a run with more workers computes on its batch.
    Tolerances: the last step's gradients to 1e-4 of their largest element (float32 sums in
    another order); the weights to 1e-6, 1 % of one GAN-phase Adam step (lr 1e-4; measured 0.15 %, in D): Adam
    divides each gradient by √v + 1e-8, which makes a 1e-9 difference of an element near 1e-8 visible."""
    overrides = (TINY_PSNR + ["loss.pixel.type=mse"] if phase == "psnr" else
                 TINY_GAN + ["loss.adversarial.type=vanilla", "model.generator.name=srresnet", "train.ema_decay=0.5"])
    gt = 32 if phase == "psnr" else 96
    runs = []
    for micro in (1, micro_batches):
        torch.manual_seed(0)
        state = build_state(load_config("quickstart" if phase == "psnr" else "esrgan_x4", overrides=overrides),
                            torch.device("cpu"))
        if state.d_module is not None:
            without_batchnorm(state.d_module)
        for i in range(3):
            out = floats(train_step(state, *batch(60 + i, n=6, gt=gt), micro_batches=micro))
        runs.append((state, out))
    (whole, whole_out), (accumulated, accumulated_out) = runs
    assert accumulated.step == whole.step == 3
    nets = ("g_module", "d_module", "ema") if phase == "gan" else ("g_module",)
    for what in nets:
        a, b = getattr(whole, what), getattr(accumulated, what)
        a, b = (a.module, b.module) if what == "ema" else (a, b)
        assert not torch.equal(params(a), params(b))  # really another float path
        torch.testing.assert_close(params(b), params(a), rtol=0, atol=1e-2 * 1e-4, msg=what)
        if what != "ema":
            grad_a, grad_b = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (a, b))
            torch.testing.assert_close(grad_b, grad_a, rtol=0, atol=1e-4 * grad_a.abs().max().item(), msg=what)
    for key, value in whole_out.items():  # the reported losses are the means over the whole batch
        assert accumulated_out[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_a_rank_weights_its_gradient_by_its_share_of_the_global_batch():
    """``global_batch``: a rank holding 2 of 8 crops scales its gradient by 2/8 (one rank here,
    so no DDP average); its reported loss stays the mean over its own crops."""
    runs = {}
    for global_batch in (None, 8):
        torch.manual_seed(0)
        state = build_state(load_config("quickstart", overrides=TINY_PSNR + ["loss.pixel.type=mse"]),
                            torch.device("cpu"))
        out = floats(train_step(state, *batch(70), global_batch=global_batch))
        runs[global_batch] = ([p.grad.clone() for p in state.g_module.parameters()], out)
    for full, quarter in zip(runs[None][0], runs[8][0]):
        torch.testing.assert_close(quarter, full * 0.25, rtol=1e-6, atol=0)
    assert runs[8][1]["loss_pix"] == runs[None][1]["loss_pix"]


def _ddp_rank(rank: int, port: int, result_path: str) -> None:
    """One of two gloo ranks of a run with max 3 workers: rank 0 plays ranks 0 and 2 (2 micro-batches),
    rank 1 plays rank 1; three steps; rank 0 saves G's weights."""
    import os
    import sys

    from raysr.engine import ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config("quickstart", overrides=TINY_PSNR + ["loss.pixel.type=mse"])
    state = build_state(cfg, torch.device("cpu"), lambda m, has_bn: ddp(m, has_bn, 2, torch.device("cpu"),
                                                                       static_graph=False))
    for step in range(3):
        lr, hr = batch(80 + step, n=6)  # the 6 crops of the global batch: max ranks 0, 1, 2 hold 2 each
        mine = [v for v in range(rank, 3, 2)]
        lr, hr = torch.cat([lr[2 * v:2 * v + 2] for v in mine]), torch.cat([hr[2 * v:2 * v + 2] for v in mine])
        train_step(state, lr, hr, micro_batches=len(mine), global_batch=6)
    if rank == 0:
        torch.save(params(state.g_module), result_path)
    # Both ranks done, each leaves without tearing gloo down: destroy_process_group while the other rank
    # closes its side aborted a rank once ("terminate called without an active exception", SIGABRT),
    # and the teardown is not what this test is about. spawn() reads the exit status, 0 here.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow  # two gloo processes
def test_two_ddp_ranks_with_uneven_micro_batches_give_the_one_process_step(tmp_path):
    """DDP over gloo, 2 ranks standing in for 3 (2 and 1 micro-batches, no_sync on all but the last):
    the weights of one process stepping on all 6 crops at once, to the tolerance above."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(port, str(tmp_path / "g.pt")), nprocs=2)
    torch.manual_seed(0)
    state = build_state(load_config("quickstart", overrides=TINY_PSNR + ["loss.pixel.type=mse"]), torch.device("cpu"))
    for step in range(3):
        train_step(state, *batch(80 + step, n=6))
    torch.testing.assert_close(torch.load(tmp_path / "g.pt"), params(state.g_module), rtol=0, atol=1e-6)
