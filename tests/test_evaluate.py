"""raysr.evaluate against float64 references written here: MATLAB bicubic, PSNR and SSIM."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import correlate2d

from raysr.generator_file import save_generator
from raysr.evaluate import main
from raysr.data.pairing import dataset_key
from raysr.lpips import load_lpips

sys.path.insert(0, str(Path(__file__).parent))
from test_upscale import save_png, tiny_generator  # noqa: E402

SIZES = ((48, 52), (43, 41), (40, 40))  # two are not multiples of 4: GTmod crops them


# ----------------------------------------------------------------- independent references


def keys_cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))


def matlab_resize_axis(img: np.ndarray, scale: float, axis: int) -> np.ndarray:
    """MATLAB imresize bicubic along one axis, one output pixel at a time."""
    n_in = img.shape[axis]
    n_out = math.ceil(n_in * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    rows = []
    for x in range(1, n_out + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        taps = np.arange(math.floor(u - width / 2), math.floor(u - width / 2) + math.ceil(width) + 2)
        weights = scale * keys_cubic(scale * (u - taps)) if scale < 1 else keys_cubic(u - taps)
        weights = weights / weights.sum()
        index = taps - 1  # 0-based, then mirror at both ends
        index = np.where(index < 0, -index - 1, index)
        index = np.where(index >= n_in, 2 * n_in - 1 - index, index)
        rows.append(np.tensordot(weights, np.take(img, index, axis=axis), axes=(0, axis)))
    return np.moveaxis(np.stack(rows), 0, axis)


def matlab_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    return matlab_resize_axis(matlab_resize_axis(img.astype(np.float64), scale, 0), scale, 1)


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def luma(img: np.ndarray) -> np.ndarray:
    return 16 + img.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255


def ref_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def ref_ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    f = lambda x: correlate2d(x, window, mode="valid")  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return float(np.mean((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))))


def ref_scores(sr: np.ndarray, hr: np.ndarray, border: int) -> dict[str, float]:
    sr = sr[border:-border, border:-border].astype(np.float64)
    hr = hr[border:-border, border:-border].astype(np.float64)
    return {"psnr_y": ref_psnr(luma(sr), luma(hr)), "ssim_y": ref_ssim_channel(luma(sr), luma(hr)),
            "psnr_rgb": ref_psnr(sr, hr),
            "ssim_rgb": float(np.mean([ref_ssim_channel(sr[..., c], hr[..., c]) for c in range(3)]))}


def assert_scores(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-6), key


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def gt_folder(tmp_path, make_image) -> tuple[Path, dict[str, np.ndarray]]:
    images = {f"img{i}.png": make_image(h, w, seed=30 + i) for i, (h, w) in enumerate(SIZES)}
    for name, image in images.items():
        save_png(tmp_path / "HR" / name, image)
    return tmp_path / "HR", images


def gtmod(image: np.ndarray, scale: int) -> np.ndarray:
    return image[:image.shape[0] // scale * scale, :image.shape[1] // scale * scale]


def run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


# ----------------------------------------------------------------- protocol


def test_bicubic_matches_independent_computation(tmp_path, gt_folder, capsys):
    hr_dir, images = gt_folder
    assert run(["--hr", hr_dir, "--scale", 4, "--model", "bicubic", "--json", tmp_path / "r.json",
                "--save-sr", tmp_path / "sr"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"] == "bicubic" and report["scale"] == 4 and report["crop_border"] == 4
    assert [r["name"] for r in report["images"]] == sorted(images)
    for row in report["images"]:
        hr = gtmod(images[row["name"]], 4)
        assert row["size"] == list(hr.shape[:2])
        # SR written by --save-sr = the float64 MATLAB pipeline here, up to rounding ties
        want = to_u8(matlab_imresize(to_u8(matlab_imresize(hr, 1 / 4)), 4))
        saved = np.asarray(Image.open(tmp_path / "sr" / row["name"]))
        assert np.abs(saved.astype(int) - want).max() <= 1 and (saved != want).mean() < 0.01
        assert_scores(row, ref_scores(saved, hr, 4))
        assert_scores(row["bicubic"], ref_scores(saved, hr, 4))
    for key in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        mean = np.mean([r[key] for r in report["images"]])
        assert report["mean"][key] == pytest.approx(mean) == report["bicubic"]["mean"][key]
    # bicubic x4 PSNR-Y on smooth synthetic images: well above 20 dB, below lossless
    assert 20 < report["mean"]["psnr_y"] < 60
    out = capsys.readouterr().out
    assert all(name in out for name in images) and "mean bicubic" in out


def test_model_scores_match_saved_sr_and_bicubic_row(tmp_path, gt_folder):
    hr_dir, images = gt_folder
    model = tiny_generator("srresnet", 4)
    save_generator(model, tmp_path / "g.pth", fmt="raysr")
    assert run(["--hr", hr_dir, "--scale", 4, "--model", tmp_path / "g.pth", "--json", tmp_path / "r.json",
                "--save-sr", tmp_path / "sr", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["arch"] == "srresnet" and report["lr_source"] == "bicubic"
    for row in report["images"]:
        hr = gtmod(images[row["name"]], 4)
        lr = to_u8(matlab_imresize(hr, 1 / 4))
        with torch.no_grad():
            sr = model(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255)
        want = to_u8(sr[0].clamp(0, 1).permute(1, 2, 0).double().numpy() * 255)
        saved = np.asarray(Image.open(tmp_path / "sr" / row["name"]))
        assert np.abs(saved.astype(int) - want).max() <= 1 and (saved != want).mean() < 0.01
        assert_scores(row, ref_scores(saved, hr, 4))
        bicubic = to_u8(matlab_imresize(lr, 4))
        for key, value in ref_scores(bicubic, hr, 4).items():
            assert row["bicubic"][key] == pytest.approx(value, abs=0.02)  # rounding ties move it a hair
    assert set(report["mean"]) >= {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "lpips"}


@pytest.mark.parametrize("pattern", ["{stem}.png", "{stem}x4.png", "{stem}_x4.png", "{stem}_LRBI_x4.png"])
def test_lr_folder_matched_by_stem(pattern, tmp_path, gt_folder):
    hr_dir, images = gt_folder
    for name, image in images.items():
        save_png(tmp_path / "LR" / pattern.format(stem=Path(name).stem), to_u8(matlab_imresize(gtmod(image, 4), 1 / 4)))
    (tmp_path / "LR" / "README.txt").write_text("not an image: ignored")
    assert run(["--hr", hr_dir, "--scale", 4, "--model", "bicubic", "--json", tmp_path / "files.json"]) == 0
    assert run(["--hr", hr_dir, "--lr", tmp_path / "LR", "--scale", 4, "--model", "bicubic",
                "--json", tmp_path / "given.json"]) == 0
    made = json.loads((tmp_path / "files.json").read_text())
    given = json.loads((tmp_path / "given.json").read_text())
    assert given["lr_source"] == "files"
    # the same LR (up to rounding ties) gives the same scores
    for key in ("psnr_y", "psnr_rgb"):
        assert given["mean"][key] == pytest.approx(made["mean"][key], abs=0.02)


def test_identical_images_give_json_null_not_infinity(tmp_path, capsys):
    """A flat image survives bicubic down/up exactly: PSNR is infinite, which JSON cannot hold."""
    save_png(tmp_path / "HR" / "flat.png", np.full((24, 28, 3), 77, np.uint8))
    save_png(tmp_path / "HR" / "ramp.png", np.tile(np.arange(0, 240, 10, dtype=np.uint8)[:, None, None], (1, 28, 3)))
    assert run(["--hr", tmp_path / "HR", "--scale", 2, "--model", "bicubic", "--json", tmp_path / "r.json"]) == 0
    text = (tmp_path / "r.json").read_text()

    def reject(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    report = json.loads(text, parse_constant=reject)
    flat, ramp = report["images"]
    assert flat["name"] == "flat.png" and flat["psnr_y"] is None and flat["psnr_rgb"] is None
    assert flat["ssim_y"] == pytest.approx(1.0) and flat["bicubic"]["psnr_y"] is None
    assert ramp["psnr_y"] > 20  # finite scores stay numbers
    assert report["mean"]["psnr_y"] is None and report["mean"]["ssim_y"] > 0.5  # a mean over inf is inf
    assert "inf" in capsys.readouterr().out  # the table shows it as it is


def test_images_too_small_for_ssim_are_all_listed_before_any_work(tmp_path, make_image, capsys):
    """x4: SSIM's 11x11 window after ignoring 4 px per edge needs GTmod sides >= 11 + 2*4 = 19, i.e. 20."""
    for name, (h, w) in {"ok.png": (20, 21), "short.png": (19, 40), "narrow.png": (40, 18)}.items():
        save_png(tmp_path / "HR" / name, make_image(h, w))
    argv = ["--hr", tmp_path / "HR", "--scale", 4, "--model", "bicubic", "--json", tmp_path / "r.json",
            "--save-sr", tmp_path / "sr"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "2 benchmark image(s)" in err and "short.png" in err and "narrow.png" in err and "ok.png" not in err
    assert "at least 20x20" in err  # the first multiple of 4 that is >= 19
    assert not (tmp_path / "sr").exists() and not (tmp_path / "r.json").exists()
    for name in ("short.png", "narrow.png"):
        (tmp_path / "HR" / name).unlink()
    assert run(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text())["images"][0]["size"] == [20, 20]


def test_scale_free_checkpoint_takes_the_scale_from_the_option(tmp_path, gt_folder, capsys):
    """SRCNN weights in BasicSR format do not record the scale: --scale supplies it, and says so."""
    hr_dir, images = gt_folder
    model = tiny_generator("srcnn", 3)
    save_generator(model, tmp_path / "srcnn.pth", fmt="basicsr")
    assert run(["--hr", hr_dir, "--scale", 3, "--model", tmp_path / "srcnn.pth", "--json", tmp_path / "r.json",
                "--save-sr", tmp_path / "sr", "--device", "cpu"]) == 0
    assert "taking it from --scale 3" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["arch"] == "srcnn"
    name = report["images"][0]["name"]
    lr = to_u8(matlab_imresize(gtmod(images[name], 3), 1 / 3))
    with torch.no_grad():
        sr = model(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255)
    want = to_u8(sr[0].clamp(0, 1).permute(1, 2, 0).double().numpy() * 255)
    saved = np.asarray(Image.open(tmp_path / "sr" / name))
    assert np.abs(saved.astype(int) - want).max() <= 1


def test_dataset_key_conventions():
    for stem in ("baby", "babyx4", "baby_x4", "baby-x4", "baby_LRBI_x4", "baby_HR_x4", "baby_GT", "baby_LR"):
        assert dataset_key(stem, 4) == "baby", stem
    assert dataset_key("0801x2", 2) == "0801"
    assert dataset_key("img_001_SRF_4_HR", 4) == dataset_key("img_001_SRF_4_LR", 4) == "img_001_SRF_4"
    assert dataset_key("babyx4", 2) == "babyx4"  # another scale's suffix is part of the name


# ----------------------------------------------------------------- LPIPS


def test_lpips_unavailable_is_reported_not_fatal(tmp_path, gt_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    fn, reason = load_lpips("alex")
    assert fn is None and "lpips" in reason
    hr_dir, _ = gt_folder
    assert run(["--hr", hr_dir, "--scale", 4, "--model", "bicubic", "--json", tmp_path / "r.json"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lpips"] is None and "lpips" in report["lpips_unavailable"]
    assert report["mean"]["lpips"] is None and report["images"][0]["lpips"] is None
    assert "LPIPS not computed" in capsys.readouterr().out


FAKE_LPIPS = '''
import torch
from torch import nn


class _Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.slice1 = nn.Sequential()
        self.slice1.add_module("0", nn.Conv2d(3, 4, 3, padding=1))
        self.slice1.add_module("1", nn.ReLU())


class LPIPS(nn.Module):
    """The package's interface and backbone layout (slices keep torchvision's indices), one layer deep."""

    def __init__(self, net="alex", version="0.1", pretrained=True, pnet_rand=False, verbose=True, **kw):
        super().__init__()
        if not pnet_rand:
            raise RuntimeError("would download the torchvision backbone")
        self.net = _Trunk()

    def forward(self, in0, in1, normalize=False):
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        return ((self.net.slice1(in0) - self.net.slice1(in1)) ** 2).mean(dim=(1, 2, 3), keepdim=True)
'''


def install_fake_lpips(tmp_path, monkeypatch) -> None:
    """Make ``import lpips`` find the stand-in above, with its calibration weights file."""
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LPIPS)
    (package / "weights" / "v0.1" / "alex.pth").write_bytes(b"calibration weights ship with the package")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)


def test_lpips_loads_backbone_from_a_local_file(tmp_path, gt_folder, monkeypatch):
    install_fake_lpips(tmp_path, monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    fn, reason = load_lpips("alex")
    assert fn is None and "alexnet-owt-7be5be79.pth" in reason  # nothing in the hub cache, no download

    weight = torch.linspace(-0.5, 0.5, 4 * 3 * 3 * 3).reshape(4, 3, 3, 3)
    bias = torch.tensor([0.1, -0.1, 0.0, 0.2])
    torch.save({"features.0.weight": weight, "features.0.bias": bias}, tmp_path / "alexnet.pth")
    fn, description = load_lpips("alex", backbone=tmp_path / "alexnet.pth")
    assert fn is not None and "alexnet.pth" in description
    a, b = torch.rand(2, 3, 8, 8, dtype=torch.float64).unbind(0)

    def features(x):  # the backbone conv + ReLU in float64, written out
        return torch.relu(torch.nn.functional.conv2d(2 * x[None] - 1, weight.double(), bias.double(), padding=1))

    assert fn(a[None].float(), b[None].float())[0] == pytest.approx(
        float(((features(a) - features(b)) ** 2).mean()), rel=1e-5)

    hr_dir, _ = gt_folder
    assert run(["--hr", hr_dir, "--scale", 4, "--model", "bicubic", "--json", tmp_path / "r.json",
                "--lpips-backbone", tmp_path / "alexnet.pth"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lpips_unavailable"] is None
    assert all(row["lpips"] > 0 for row in report["images"]) and report["mean"]["lpips"] > 0


# ----------------------------------------------------------------- bad inputs


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, gt_folder, make_image, capsys):
    hr_dir, _ = gt_folder
    x4 = tmp_path / "x4.pth"
    save_generator(tiny_generator("rrdbnet", 4), x4, fmt="basicsr")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 truncated zip")
    save_png(tmp_path / "LR" / "img0.png", make_image(12, 13))  # right size for img0 only
    save_png(tmp_path / "LRbad" / "img0x4.png", make_image(11, 13))
    for name in ("img1x4.png", "img2x4.png"):
        save_png(tmp_path / "LRbad" / name, make_image(10, 10))
    (tmp_path / "HRbad").mkdir()
    (tmp_path / "HRbad" / "a.png").write_bytes(b"not a png at all")
    out = ["--json", tmp_path / "r.json", "--save-sr", tmp_path / "sr"]
    cases = [
        (["--hr", hr_dir, "--scale", 2, "--model", x4], "x4"),
        (["--hr", hr_dir, "--scale", 4, "--model", tmp_path / "corrupt.pth"], "corrupt.pth"),
        (["--hr", hr_dir, "--scale", 4, "--model", tmp_path / "missing.pth"], "missing.pth"),
        (["--hr", hr_dir, "--scale", 4, "--model", tmp_path], "is a directory"),
        (["--hr", tmp_path / "nowhere", "--scale", 4, "--model", "bicubic"], "not a directory"),
        (["--hr", tmp_path / "HRbad", "--scale", 4, "--model", "bicubic"], "a.png"),
        (["--hr", hr_dir, "--lr", tmp_path / "LR", "--scale", 4, "--model", "bicubic"], "img1"),
        (["--hr", hr_dir, "--lr", tmp_path / "LRbad", "--scale", 4, "--model", "bicubic"], "should be 12x13"),
        (["--hr", hr_dir, "--scale", 0, "--model", "bicubic"], "--scale"),
    ]
    for argv, needle in cases:
        assert run(argv + out) == 2, argv
        assert needle in capsys.readouterr().err, argv
        assert not (tmp_path / "r.json").exists() and not (tmp_path / "sr").exists()


def test_an_image_failing_mid_folder_removes_the_sr_files_of_this_run(tmp_path, make_image, capsys):
    """The header of b.png reads fine (so the up-front checks pass) but its pixel data is cut off:
    evaluate stops at b.png, and the SR of a.png it had already saved is taken back."""
    hr_dir, sr_dir = tmp_path / "HR", tmp_path / "sr"
    save_png(hr_dir / "a.png", make_image(40, 44, 1))
    save_png(hr_dir / "b.png", make_image(40, 44, 2))
    data = (hr_dir / "b.png").read_bytes()
    (hr_dir / "b.png").write_bytes(data[:len(data) // 2])
    sr_dir.mkdir()
    (sr_dir / "earlier.png").write_bytes(b"an older result, not ours to delete")

    assert run(["--hr", hr_dir, "--scale", 4, "--model", "bicubic", "--save-sr", sr_dir,
                "--json", tmp_path / "r.json"]) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and "nothing saved" in err
    assert sorted(p.name for p in sr_dir.iterdir()) == ["earlier.png"]
    assert not (tmp_path / "r.json").exists()
