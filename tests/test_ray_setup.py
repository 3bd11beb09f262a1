"""What raysr.ray_setup does to the session's local Ray that the training tests do not show on their own."""

from __future__ import annotations

import sys
import time
import uuid


def test_lines_of_rays_processes_reach_the_console_except_those_raysr_calls_noise(ray_local, capfd):
    """Ray prints its processes' lines on the driver's console (log_to_driver); raysr leaves out those
    that contain a fragment of NOISE_RAY_LINES, such as the warning Ray Train's controller logs about its
    PreemptionWatcher at every run (tests/conftest.py turns that actor off, so no run shows it here)."""
    from raysr.ray_setup import NOISE_RAY_LINES, drop_ray_log_lines

    drop_ray_log_lines(NOISE_RAY_LINES)  # as fit() does; once per process
    marker = uuid.uuid4().hex

    @ray_local.remote(num_cpus=0)
    def log_lines():
        for fragment in NOISE_RAY_LINES:  # as Ray's own line: the fragment inside a longer message
            print(f"[2026-12-07 12:00:00,000 W 1 1] {fragment} and ID {marker} noise", file=sys.stderr, flush=True)
        print(f"{marker} shown", file=sys.stderr, flush=True)  # the same file, so never printed first

    ray_local.get(log_lines.remote())
    printed = ""
    deadline = time.monotonic() + 60
    while f"{marker} shown" not in printed:  # Ray's log monitor forwards the lines a little later
        assert time.monotonic() < deadline, f"the task's lines never reached the console:\n{printed[-2000:]}"
        captured = capfd.readouterr()
        printed += captured.out + captured.err
        time.sleep(0.05)
    assert f"{marker} noise" not in printed, printed[-2000:]
