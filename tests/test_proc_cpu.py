"""bench/proc_cpu.py: the CPU of a command's processes, by kind, against a child that burns a known amount."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("proc_cpu", Path(__file__).resolve().parents[1] / "bench" / "proc_cpu.py")
proc_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(proc_cpu)

# A grandchild (as Ray's actors are no children of the command) that spends 0.6 CPU-s, then idles a
# second (so that a reading after the burn comes before its end, however busy the machine), then the
# command exits 3.
BURN = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "'import time\\nwhile time.process_time() < 0.6: pass\\ntime.sleep(1)']); sys.exit(3)")


def test_a_grandchilds_cpu_is_counted_under_its_kind_and_the_status_passes_through(capsys):
    assert proc_cpu.main(["--interval", "0.05", "--", sys.executable, "-c", BURN]) == 3
    rows = {line.split(None, 2)[2]: float(line.split()[0]) for line in capsys.readouterr().err.splitlines()[1:-1]}
    # the burning grandchild (named by its code's first line) and its parent (by the start of its code):
    # the 0.6 CPU-s burnt (a process's CPU counts up to its last reading; the grandchild's idle second
    # puts one after the burn), less /proc's 10 ms ticks, and not much more than two interpreters' start-up
    child, parent = rows["python -c import time"], rows["python -c import subprocess, sys; subprocess.run(["]
    assert 0.6 <= child + parent < 0.6 + 2 * 1.5 and child >= 0.58, rows


@pytest.mark.parametrize("cmdline, expected", [
    ("ray::TrainController.run", "ray::TrainController"),
    ("ray::RayTrainWorker", "ray::RayTrainWorker"),
    ("/usr/bin/python3.11 -u -m raysr.train --preset quickstart", "python -m raysr.train"),
    ("python -B /opt/ray/_private/log_monitor.py --x=1", "python log_monitor.py"),
    ("python -c import sys;exec(eval(sys.stdin.readline()))", "python -c import sys;exec(eval(sys.stdin.readline("),
    ("python -B -c from multiprocessing.forkserver import main; main(25)",
     "python -c from multiprocessing.forkserver import m"),
    ("python -c", "python -c"),
    ("/opt/ray/core/src/ray/raylet/raylet --node_id=12", "raylet"),
    ("", "(no command line: a kernel thread or an exited process)"),
])
def test_kinds(cmdline, expected):
    assert proc_cpu.kind(cmdline) == expected


def test_no_command_exits_2_saying_where_it_goes(capsys):
    with pytest.raises(SystemExit) as stop:
        proc_cpu.main([])
    assert stop.value.code == 2 and "no command: put it after --" in capsys.readouterr().err
