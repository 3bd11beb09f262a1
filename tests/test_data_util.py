"""raysr.util: the shared check_int and the stderr Progress line (used by make_shards and upscale)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import raysr.util
from raysr.util import Progress, check_int


def test_check_int_accepts_python_and_numpy_integers_as_plain_int():
    assert check_int("scale", 4) == 4
    assert check_int("rank", 0, minimum=0) == 0
    got = check_int("batch_size", np.int64(16))
    assert got == 16 and type(got) is int
    assert type(check_int("seed", np.uint8(3), minimum=0)) is int


@pytest.mark.parametrize("value, minimum, message", [
    (0, 1, "scale must be an integer >= 1, got 0"),
    (-1, 0, "scale must be an integer >= 0, got -1"),
    (True, 1, "scale must be an integer >= 1, got True"),  # bool is an int subclass: not a scale
    (4.0, 1, r"scale must be an integer >= 1, got 4.0 \(a float; pass 4\)"),
    (np.float32(2), 1, r"got np\.float32\(2\.0\) \(a float32; pass 2\)"),
    (2.5, 1, r"scale must be an integer >= 1, got 2.5$"),
    ("4", 1, "scale must be an integer >= 1, got '4'"),
    (None, 1, "scale must be an integer >= 1, got None"),
])
def test_check_int_rejects_with_the_name_and_the_value(value, minimum, message):
    with pytest.raises(ValueError, match=message):
        check_int("scale", value, minimum)


def test_models_and_data_share_the_one_check_int():
    from raysr.data import loader, stream
    from raysr.models import common
    from raysr.validation import pairs

    assert common.check_int is stream.check_int is loader.check_int is pairs.check_int is check_int


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(raysr.util.time, "monotonic", fake)
    return fake


def test_a_line_per_step_off_a_terminal_with_rate_and_eta(clock):
    out = io.StringIO()
    progress = Progress(10, "upscale", unit="files", stream=out)
    for i in range(4):
        clock.now += 0.5
        progress.step(f"f{i}.png")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and progress.done == 4
    # 4 files in 2.0 s: 2.0 files/s, 6 left -> 3 s; 4/10 of 24 cells -> 9 filled
    assert lines[-1] == (f"upscale [{'#' * 9}{'.' * 15}] 4/10 files (40%) | 2.0 files/s | "
                         "2.0s elapsed, ~3s left | f3.png")
    assert lines[0].startswith("upscale [") and lines[0].endswith("1/10 files (10%) | 2.0 files/s | "
                                                                  "0.5s elapsed, ~4s left | f0.png")


def test_interval_limits_lines_but_the_last_item_and_finish_always_show(clock):
    out = io.StringIO()
    progress = Progress(5, "make_shards", unit="images", stream=out, interval=10.0)
    progress.info = "7 samples | 1 shards (0 reused) | 0.1 MiB"
    for done in range(1, 6):
        clock.now += 1.0
        progress.update(done=done)
    progress.finish()
    progress.finish()  # idempotent
    lines = out.getvalue().splitlines()
    # the first update and the one reaching 5/5; nothing in between (4 s < 10 s), and finish
    # adds no copy of a line already written
    assert [line.split("] ")[1].split(" |")[0] for line in lines] == ["1/5 images (20%)", "5/5 images (100%)"]
    assert lines[-1] == (f"make_shards [{'#' * 24}] 5/5 images (100%) | 7 samples | 1 shards (0 reused) | "
                         "0.1 MiB | 1.0 images/s | 5.0s elapsed")


def test_finish_rewrites_the_last_line_when_its_text_changed(clock):
    out = io.StringIO()
    progress = Progress(2, "make_shards", unit="images", stream=out)
    progress.update(done=2)
    progress.info = "3 shards"
    progress.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "3 shards" in lines[-1] and "3 shards" not in lines[0]


def test_a_terminal_line_is_rewritten_in_place_and_ended_once(clock):
    out = Terminal()
    with Progress(3, "upscale", unit="files", stream=out) as progress:
        for name in "abc":
            clock.now += 1.0
            progress.step(name)
    text = out.getvalue()
    assert text.count("\r") == 4 and text.count("\x1b[K") == 4  # 3 steps + the final line
    assert text.endswith("| c\x1b[K\n") and text.count("\n") == 1


def test_finish_runs_when_the_block_raises_and_disabled_writes_nothing(clock):
    out = Terminal()
    with pytest.raises(KeyError):
        with Progress(3, "upscale", stream=out) as progress:
            progress.step("a")
            raise KeyError("boom")
    assert out.getvalue().endswith("\n")  # the error message starts on a fresh line
    quiet = io.StringIO()
    with Progress(2, "x", stream=quiet, enabled=False) as progress:
        progress.step("a")
        progress.update(done=2, force=True)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="Progress total must be an integer >= 0"):
        Progress(-1, "x")
