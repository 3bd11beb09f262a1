"""Where the CPU of a command goes, by process: a table of CPU-seconds per kind of process (Ray names
each actor's process ``ray::ClassName``) that ran while the command did, the machine's total beside it.

Run it from the repository root on an otherwise idle machine, for instance around the tests of one file:

    python bench/proc_cpu.py -- python -m pytest -q -n 0 tests/test_train.py -k every_checkpoint

A Ray instance runs its actors as processes of its raylet, not of the command, so this reads every
process of the machine from /proc (Linux) every ``--interval`` seconds: a process that lives shorter than
that may be missed, and one's CPU counts up to its last reading. psutil and py-spy answer other
questions (one process's tree; where one process spends its time); none adds up a whole machine's
processes by their Ray title, which is what tells which Ray Train actor costs what.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
CODE_CHARS = 40  # of a ``python -c`` command's code, in its kind


def machine_busy_s() -> float:
    """CPU-seconds the machine has spent busy (all cores; /proc/stat less idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICK


def read_processes() -> dict[int, tuple[str, float]]:
    """{pid: (command line, CPU-seconds so far)} of every process readable now."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone between the listing and the read
            continue
        found[int(pid)] = (cmdline, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def kind(cmdline: str) -> str:
    """What a process is, for the table: its Ray title without the method (``ray::TrainController``), a
    Python process by its module or script (``python -c`` by the start of its code), anything else by its
    program's name."""
    if not cmdline:
        return "(no command line: a kernel thread or an exited process)"
    first, *rest = cmdline.split()
    if first.startswith("ray::"):
        return first.split(".")[0]
    if os.path.basename(first).startswith("python"):
        for i, arg in enumerate(rest):
            if arg == "-m":
                return f"python -m {rest[i + 1]}" if i + 1 < len(rest) else "python -m"
            if arg == "-c":  # by its code's first line, at most CODE_CHARS of it: pytest-xdist's workers
                # (execnet: "import sys;exec(eval(sys.stdin.readline()))"), multiprocessing's forkserver...
                code = cmdline.split(" -c ", 1)[1].splitlines()[0][:CODE_CHARS].strip() if " -c " in cmdline else ""
                return f"python -c {code}".strip()
            if not arg.startswith("-"):
                return f"python {os.path.basename(arg)}"
        return "python"
    return re.sub(r"\d+", "N", os.path.basename(first))


def sample(command: list[str], interval: float) -> tuple[int, float, float, dict[int, list]]:
    """Run ``command``, reading every process each ``interval`` s. Returns (exit status, seconds,
    machine CPU-seconds, {pid: [kind, CPU-s when first seen, CPU-s last seen]})."""
    seen: dict[int, list] = {}

    def read() -> None:
        for pid, (cmdline, cpu) in read_processes().items():
            entry = seen.setdefault(pid, [kind(cmdline), cpu, cpu])
            if cmdline:  # its latest title: a pooled Ray worker takes an actor's when it becomes one, and a
                entry[0] = kind(cmdline)  # process forked from a forkserver (Ray's dashboard modules) its own
            entry[2] = cpu

    read()
    for entry in seen.values():  # processes that ran before the command count from now on
        entry[1] = entry[2]
    start, busy = time.monotonic(), machine_busy_s()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        read()
        time.sleep(interval)
    read()
    return proc.returncode, time.monotonic() - start, machine_busy_s() - busy, seen


def table(seen: dict[int, list], top: int) -> list[tuple[str, int, float]]:
    """[(kind, processes, CPU-seconds)] of the processes that used CPU, most first."""
    cpu, count = collections.Counter(), collections.Counter()
    for name, first, last in seen.values():
        if last > first:
            cpu[name] += last - first
            count[name] += 1
    return [(name, count[name], seconds) for name, seconds in cpu.most_common(top)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="python bench/proc_cpu.py [--interval S] [--top N] -- COMMAND ...")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between readings (default 0.5)")
    parser.add_argument("--top", type=int, default=25, help="rows of the table (default 25)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: put it after --, e.g. python bench/proc_cpu.py -- python -m pytest -q")
    if args.interval <= 0:
        parser.error(f"--interval {args.interval}: must be > 0")
    if not os.path.exists("/proc/stat"):
        parser.error("this reads /proc, which only Linux has")
    status, wall, busy, seen = sample(command, args.interval)
    rows = table(seen, len(seen))
    counted = sum(cpu for _, _, cpu in rows)
    print(f"{'CPU-s':>8} {'procs':>5}  kind", file=sys.stderr)
    for name, procs, cpu in rows[:args.top]:
        print(f"{cpu:8.1f} {procs:5d}  {name}", file=sys.stderr)
    print(f"{counted:8.1f}        every process read; the machine was busy {busy:.1f} CPU-s in {wall:.1f} s "
          f"(exit status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
