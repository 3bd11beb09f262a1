"""bench/carry_wheels.py's trimmed wheels keep what raysr loads: every file of the installed Ray (and its
carried dependencies) that importing raysr's Ray-side modules and Ray's dashboard loads is outside the
trimmed paths, and none of it comes from a package the script does not carry. No wheel is built here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("carry_wheels", ROOT / "bench" / "carry_wheels.py")
carry_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry_wheels)

# What a raysr.train / raysr.tune / raysr.upscale run imports from Ray, and what Ray's own processes load:
# the dashboard (started by raysr.ray_setup; its optional_deps decide whether the API server runs and
# the state API Train's controller polls) with every module it walks, and Train V2's controller.
LOADED = """
import json, sys
import pkgutil, importlib
import raysr.train, raysr.tune, raysr.batch_inference, raysr.ray_setup
import ray.train.torch, ray.tune, ray.data, ray.util.state
import ray.dashboard.optional_deps, ray.dashboard.dashboard, ray.dashboard.agent
from ray.tune.integration.ray_train import TuneReportCallback
import ray.train.v2._internal.execution.controller
import ray.dashboard.modules
for m in pkgutil.walk_packages(ray.dashboard.modules.__path__, "ray.dashboard.modules."):
    importlib.import_module(m.name)
# the botocore models raysr.storage's S3 client reads (its calls, paginators and retry rules)
import boto3, botocore.loaders
models, load_file = [], botocore.loaders.JSONFileLoader.load_file
botocore.loaders.JSONFileLoader.load_file = lambda self, path: models.append(path) or load_file(self, path)
s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
s3.get_paginator("list_objects_v2")
files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
print(json.dumps({**files, **{f"model {i}": path for i, path in enumerate(models)}}))
"""


def loaded_modules() -> dict[str, str | None]:
    out = subprocess.run([sys.executable, "-c", LOADED], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trimmed_wheels_keep_every_file_raysr_and_the_dashboard_load():
    modules = loaded_modules()
    site = Path(modules["ray"]).parents[1]  # the installed Ray's site-packages
    for name, file in modules.items():
        if name.startswith("model "):  # botocore's loader names a model without .json/.json.gz, tries absent ones
            file = next((str(f) for ext in (".json", ".json.gz") if (f := Path(file + ext)).is_file()), None)
        if not file or not Path(file).is_relative_to(site):
            continue
        path = Path(file).relative_to(site).as_posix()
        for dist in carry_wheels.TRIMMED:
            assert not carry_wheels.is_trimmed(dist, path), f"{name} ({path}) is trimmed from the {dist} wheel"
    assert "ray.serve" not in modules and "ray.rllib" not in modules and "ray.llm" not in modules
    # google-api-core (NOT_CARRIED) and what only it brings stay unloaded; google.rpc (EXTRA) is loaded
    assert not [n for n in modules if n.startswith(("google.api_core", "google.auth", "virtualenv"))]
    assert "google.rpc" in modules
    assert any("/botocore/data/s3/" in str(f) for n, f in modules.items() if n.startswith("model "))


def test_trim_rules():
    is_trimmed = carry_wheels.is_trimmed
    assert is_trimmed("ray", "ray/jars/ray_dist.jar")
    assert is_trimmed("ray", "ray/dashboard/client/build/static/js/main.js")
    assert not is_trimmed("ray", "ray/dashboard/http_server_head.py")
    assert not is_trimmed("ray", "ray/core/src/ray/gcs/gcs_server")
    # S3 and the credential chain's services keep their models, other services lose theirs
    assert not is_trimmed("botocore", "botocore/data/s3/2006-03-01/service-2.json.gz")
    assert not is_trimmed("botocore", "botocore/data/sts/2011-06-15/service-2.json.gz")
    assert not is_trimmed("botocore", "botocore/data/endpoints.json")
    assert is_trimmed("botocore", "botocore/data/ec2/2016-11-15/service-2.json.gz")
    assert not is_trimmed("boto3", "boto3/data/ec2/2016-11-15/resources-1.json")
    # the dashboard refuses to start without its build folder and build/static
    placeholders = carry_wheels.PLACEHOLDERS["ray"]
    assert "ray/dashboard/client/build/index.html" in placeholders
    assert any(p.startswith("ray/dashboard/client/build/static/") for p in placeholders)
