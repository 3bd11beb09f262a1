"""Shared fixtures: a real S3 endpoint (moto's HTTP server on loopback) and test images."""

from __future__ import annotations

import os
import shutil
import socket
import uuid

import numpy as np
import pytest

from faults import FaultProxy


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test networks are tiny: intra-op threads only add overhead on a 2-core machine."""
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 endpoint is fixed when the test session starts, before anything can start
# Ray: Ray's worker processes inherit these variables, so training runs inside
# tests reach the moto server too, and no test can ever reach real AWS. Clients reach
# moto through a fault-injecting proxy (tests/faults.py), which passes everything
# through until a test arms faults (the ``s3_faults`` fixture): that is the only way to
# put faults into the S3 traffic of Ray's worker processes without restarting Ray.
S3_PORT = _free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
S3_PROXY = FaultProxy(S3_ENDPOINT)
os.environ.update(AWS_ENDPOINT_URL=S3_PROXY.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
# Keep every local Ray of the test session on 127.0.0.1 (Ray reads this when first imported).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# moto knows AWS-managed IAM policies (the cluster guide attaches AmazonEC2FullAccess) only when
# this is set before its IAM backend first loads, whichever test touches moto first.
os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
# Ray Train's controller polls its workers every 2 s by default, and a worker's next ray.train.report
# waits until the last one was polled (a queue of one): each report, restart and the end of every test
# run would wait up to that long. Tests take the same code path at a 0.1 s poll (a poll that takes
# longer is awaited at the next one; only RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S marks a worker dead).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Train starts a PreemptionWatcher actor with every worker group: a process of its own (about 2
# CPU-seconds to start) that only logs when a node drains, which raysr does not act on. Only the
# node-loss scenarios (tests/chaos_run.py) keep it; test_ray_setup.py checks the line raysr hides from it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor (one per Ray instance; it forwards worker processes' lines to their drivers) lists its
# log folder for new files on every 0.1-s poll while it tracks fewer than this many files, and every
# LOG_NAME_UPDATE_INTERVAL_S (0.5 s) once it tracks more. A session's Ray sees hundreds of short-lived
# workers (two files each): listing them ten times a second was about 50 CPU-s of a full run (bench/proc_cpu.py,
# docs/testing.md). With this, a new worker's first lines reach its driver up to 0.5 s later; none is lost.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "1")
# No test may download weights from outside: raysr.hub fetches nothing unless a test (serving
# files on loopback) lifts this itself. Ray's workers inherit it too.
os.environ["RAYSR_OFFLINE"] = "1"


@pytest.fixture
def file_server(tmp_path):
    """A loopback HTTP server for the files in its ``root`` folder; ``requests`` lists the paths asked for."""
    import functools
    import http.server
    import threading
    from types import SimpleNamespace

    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{server.server_address[1]}", requests=requests)
    server.shutdown()
    server.server_close()
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (its URL; AWS_ENDPOINT_URL, set for the whole session, is the proxy before it)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    import raysr.storage
    raysr.storage._clients.clear()
    yield S3_ENDPOINT
    server.stop()
    raysr.storage._clients.clear()


@pytest.fixture
def s3_faults(s3_endpoint):
    """The proxy every S3 client of the session goes through (AWS_ENDPOINT_URL), with no fault
    armed and an empty request log; whatever the test arms is disarmed after it."""
    S3_PROXY.clear()
    yield S3_PROXY
    S3_PROXY.clear()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import raysr.storage
    name = f"raysr-test-{uuid.uuid4().hex[:12]}"
    raysr.storage.s3_client().create_bucket(Bucket=name)
    return name


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image (H, W, 3): smooth gradients, edges and texture.

    Pure noise would make every SR comparison degenerate; this has structure at
    several scales, like a natural image, and is fully determined by the seed.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.zeros((height, width, 3))
    for c in range(3):
        fx, fy = rng.uniform(0.5, 4.0, 2) * 2 * np.pi / max(height, width)
        img[..., c] = 0.5 + 0.25 * np.sin(fx * x + rng.uniform(0, 6)) * np.cos(fy * y + rng.uniform(0, 6))
    for _ in range(6):  # a few hard-edged shapes
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.3) * min(height, width)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
        img[mask] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)  # fine texture
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture
def make_image():
    return synthetic_image


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Demo shards (``.train``) and a validation folder (``.val``), built once per test run: under
    pytest-xdist the first worker to ask builds them in the run's shared temporary folder while the
    other waits on a file lock, then both use them (nothing writes to them).

    ``.val`` holds the centres of the demo's two validation photos, in their formats, at sizes that
    are not multiples of 4 (so GTmod still crops), the first wider than the 256 px of a comparison
    PNG: validation is the same code on a tenth of the pixels. Every tiny run validates, and the full
    photos through the perceptual metric's VGG took about 6 CPU-s a validation, minutes of the suite.
    ``.photos`` is the demo's own folder, for a test that needs a validation long enough to catch.
    """
    from types import SimpleNamespace

    from filelock import FileLock
    from PIL import Image

    from raysr.demo import VAL_PHOTOS, build_demo_data

    # the xdist workers' base folders (popen-gw0, ...) share a parent; without xdist, this run's own folder
    shared = tmp_path_factory.getbasetemp()
    root = (shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared) / "demo_data"
    with FileLock(f"{root}.lock"):
        train, photos = build_demo_data(str(root))  # reuses what is there
        val = root / "val_centres"
        if not val.is_dir():
            building = root / "val_centres.partial"
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
            for name, (h, w) in zip(VAL_PHOTOS, [(90, 301), (102, 97)]):
                with Image.open(os.path.join(photos, name)) as photo:
                    top, left = (photo.height - h) // 2, (photo.width - w) // 2
                    photo.crop((left, top, left + w, top + h)).save(building / name, quality=95)
            building.rename(val)
    return SimpleNamespace(train=train, val=str(val), photos=photos)


def without_placement_group_cleaner(create_default_callbacks):
    """Ray Train's ``_create_default_callbacks`` less its PlacementGroupCleanerCallback: the callback starts
    a detached PlacementGroupCleaner actor with every run, which asks Ray's state API every second whether
    the run's controller is still alive, to remove the run's placement group should the controller die
    without doing so itself. No test kills a controller (a driver's exit takes its job's placement
    groups with it), and the actor is a process of its own: about 4 CPU-s of every run
    (``python bench/proc_cpu.py -- python -m pytest -q -n 0 tests/test_validation.py``, with and without
    it, docs/testing.md). Ray has no switch for it; the node-loss scenarios keep it."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    def create(trainer):
        return [c for c in create_default_callbacks(trainer) if not isinstance(c, PlacementGroupCleanerCallback)]

    return create


@pytest.fixture(scope="session")
def ray_default_callbacks():
    """Ray Train's own ``DataParallelTrainer._create_default_callbacks``, which the session's runs (``ray_local``)
    use less the placement-group cleaner (:func:`without_placement_group_cleaner`)."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer.__dict__["_create_default_callbacks"]


@pytest.fixture(scope="session")
def ray_local(ray_default_callbacks):
    """One local Ray instance on 127.0.0.1 for the whole test session (started on first use). The Ray
    Train runs this process starts on it run without Ray's placement-group cleaner actor
    (:func:`without_placement_group_cleaner`)."""
    import ray
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raysr.ray_setup import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    DataParallelTrainer._create_default_callbacks = without_placement_group_cleaner(ray_default_callbacks)
    init_ray()
    yield ray
    ray.shutdown()
    DataParallelTrainer._create_default_callbacks = ray_default_callbacks


# --------------------------------------------------------------------------- the fast lane

# Fixtures that start Ray Train runs, Tune searches or clusters: a test that uses one is ``slow``,
# and ``python -m pytest -m "not slow"`` (docs/testing.md) runs everything else.
SLOW_FIXTURES = {"ray_local"}


# Under pytest-xdist (``-n 2 --dist loadgroup --no-loadscope-reorder``, pyproject.toml's addopts) the
# tests on a session's local Ray run in two groups, one per worker process, each group one test after
# the other on that process's own Ray (of two CPUs, as without xdist). The second group also holds the
# tests marked ``own_ray``, which start a Ray cluster of their own (one such cluster at a time), first:
# the longest of them then runs beside the first group rather than after it. SECOND_RAY_FILES are picked
# so that both groups take about as long (docs/testing.md). A file's Ray tests stay in one group, where
# they share its module fixtures (one run, many tests). Every other file is a group of its own (its
# module fixtures built once, not once in each process), which a worker takes once its group is done:
# xdist hands out groups in the order of the collection (no reordering), so the two Ray groups go first.
RAY_GROUP, SECOND_RAY_GROUP = "ray", "ray_b"
SECOND_RAY_FILES = {"test_bench_upscale.py", "test_chaos_storage.py", "test_tune.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    order = {}
    for item in items:
        on_session_ray = bool(SLOW_FIXTURES & set(item.fixturenames))
        own_ray = item.get_closest_marker("own_ray") is not None
        if on_session_ray:
            item.add_marker(pytest.mark.slow)
        if own_ray or (on_session_ray and item.path.name in SECOND_RAY_FILES):
            item.add_marker(pytest.mark.xdist_group(SECOND_RAY_GROUP))
            order[item.nodeid] = 0 if own_ray else 1
        elif on_session_ray:
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
            order[item.nodeid] = 2
        else:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
            order[item.nodeid] = 3
    items.sort(key=lambda item: order[item.nodeid])  # stable: files keep their order within each part
