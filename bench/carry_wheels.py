"""Build .whl/: the wheels that bring Ray and raysr's other missing dependencies to the lent GPU machines.

Those machines (H100/H200, Python 3.12, CUDA torch) have no Ray and no package registry; what travels
with a `run` call, the working tree and the carried paths together, is at most 64 MiB, and Ray's
cp312 wheel alone is 79 MB. So this script, run where pip reaches PyPI, writes to .whl/:

- Ray, the version installed here (the one raysr is tested with), its wheel for the target Python with
  the parts raysr never loads taken out (TRIMMED below: the Java jar is 30.7 MiB of it) and its RECORD
  rewritten, so pip installs it as it installs any wheel;
- every other wheel that raysr's dependencies (pyproject.toml, plus the ``data`` extra the loader rows
  measure) and Ray's ``train,tune,default`` extras need and the GPU image lacks (GPU_IMAGE), found by
  walking their Requires-Dist for the target Python, less NOT_CARRIED; a package installed here is
  taken at the version installed here. botocore is trimmed too: it keeps the models of S3 and of its
  credential chain's services, not those of 400 others (13 MiB).

It prints each wheel's size and the total with the files that travel beside them, and exits 1 when
that is over 64 MiB. Then, from the repository root (bench/gpu_matrix.sh installs .whl/ itself):

    python bench/carry_wheels.py                                   # .whl/ for the GPU image's cp312
    run(carry=[".whl"], command="bash bench/gpu_matrix.sh")        # the device tool's call
    python bench/carry_wheels.py --python-version 3.11 --out /tmp/whl311   # the same set for a
                                                                   # Python 3.11 here, to try it on CPU
"""

import argparse
import base64
import csv
import hashlib
import importlib.metadata
import io
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64  # the working tree that travels with a device `run` call, carried paths included

# The Python packages of the GPU machines' image ('cuda', as the device docs list them, read there on
# 2026-11-17). Their versions are the image's; this script never carries them.
GPU_IMAGE = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Declared by a carried package but never imported on raysr's path; each would cost more than it brings.
NOT_CARRIED = {
    "py-spy": "a 3 MB binary behind the dashboard's stack-dump and profiling buttons",
    "virtualenv": "used only by runtime_env pip/uv installs, which raysr never asks for (nor could: no registry)",
    # opencensus declares google-api-core, which brings google-auth and cryptography (5.5 MiB together);
    # the parts of opencensus that Ray imports (stats, metrics, tags, trace) need only google.rpc
    "google-api-core": "opencensus's Google Cloud exporters only; its google.rpc comes from EXTRA below",
}
# Carried although no walked Requires-Dist names them (what NOT_CARRIED's packages brought and is used).
EXTRA = ["googleapis-common-protos"]

# Parts of wheels that raysr never loads: {distribution: {path prefix inside the wheel: why}}, with
# KEPT's prefixes kept inside them. Ray keeps Core, Train (V2), Tune, Data (raysr.batch_inference) and the
# dashboard's backend, which include_dashboard=True starts and whose state API Train's controller polls.
TRIMMED = {
    "ray": {
        "ray/jars/": "Java workers",
        "ray/dashboard/client/build/": "the dashboard web UI's static build (a placeholder page stays)",
        "ray/rllib/": "reinforcement learning",
        "ray/serve/": "Ray Serve (the dashboard's serve routes import it lazily and answer 501 without it)",
        "ray/llm/": "Ray's LLM serving and batch inference",
    },
    "botocore": {"botocore/data/": "the API models of 400 AWS services raysr never calls"},
}
KEPT = {
    # S3 (raysr.storage), and the services of botocore's credential chain: assume-role and web identity
    # (sts), IAM Identity Center (sso, sso-oidc), `aws login` sessions (signin); the endpoint tables
    "botocore": tuple(f"botocore/data/{name}" for name in (
        "s3/", "sts/", "sso/", "sso-oidc/", "signin/",
        "_retry.json", "endpoints.json", "partitions.json", "sdk-default-configuration.json")),
}
# The dashboard refuses to start on Linux without its build folder and its static/ subfolder.
PLACEHOLDERS = {
    "ray": {
        "ray/dashboard/client/build/index.html":
            b"<!doctype html><title>Ray</title><p>This Ray install was trimmed by raysr's bench/carry_wheels.py:"
            b" the web UI is not here. The dashboard's HTTP API (/api/...) works.</p>\n",
        "ray/dashboard/client/build/static/README.txt":
            b"The dashboard UI's static files were left out by raysr's bench/carry_wheels.py.\n",
    },
}

PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]  # pip matches each tag exactly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the target Python (the GPU image's: 3.12)")
    parser.add_argument("--out", default=str(ROOT / ".whl"), help="the folder to fill (its *.whl are replaced)")
    parser.add_argument("--extras", default="data",
                        help="raysr extras to carry besides its dependencies, comma-separated ('' for none)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # two versions of one package would stop the install
        old.unlink()

    try:
        ray_version = importlib.metadata.version("ray")  # the Ray raysr is tested with, here
    except importlib.metadata.PackageNotFoundError:
        sys.exit("carry_wheels.py: no Ray installed here; it carries the Ray raysr's tests run with, so install"
                 " raysr's dependencies first")
    env = target_environment(args.python_version)
    roots = raysr_requirements([e for e in args.extras.split(",") if e]) + [Requirement(r) for r in EXTRA]
    with tempfile.TemporaryDirectory() as tmp:
        ray_wheel = download([f"ray=={ray_version}"], args.python_version, Path(tmp))["ray"]
        wheels, assumed = resolve(roots, {"ray": ray_wheel}, env, args.python_version, Path(tmp))
        for name, wheel in sorted(wheels.items()):
            if name in TRIMMED:
                dropped = trim_wheel(wheel, out / wheel.name, name)
                print(f"{name}: {dropped / 2**20:.1f} MiB (zipped) left out: {', '.join(TRIMMED[name])}"
                      + (f" (but {', '.join(KEPT[name])})" if name in KEPT else ""))
            else:
                wheel.rename(out / wheel.name)

    print("assumed on the GPU image (its versions are not checked here):")
    for name, specs in sorted(assumed.items()):
        print(f"  {name} {','.join(sorted(specs - {''})) or '(any)'}")
    print("not carried: " + "; ".join(f"{n} ({why})" for n, why in NOT_CARRIED.items()))
    total = 0
    for wheel in sorted(out.glob("*.whl"), key=lambda p: -p.stat().st_size):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    tree = travelling_tree_bytes()
    print(f"{total / 2**20:8.2f} MiB  {out} ({len(list(out.glob('*.whl')))} wheels)")
    print(f"{(total + tree) / 2**20:8.2f} MiB  with the working tree that travels ({tree / 2**20:.2f} MiB);"
          f" the limit is {LIMIT_MIB} MiB")
    if total + tree > LIMIT_MIB * 2**20:
        sys.exit(f"carry_wheels.py: FAILED: {(total + tree) / 2**20:.2f} MiB is over the {LIMIT_MIB} MiB"
                 " a device run carries; trim more (TRIMMED, NOT_CARRIED) or carry fewer extras")


def target_environment(python_version: str) -> dict:
    """The marker environment of the GPU image's CPython on x86-64 Linux, at ``python_version``."""
    env = default_environment()
    env.update(python_version=python_version, python_full_version=python_version + ".0",
               implementation_name="cpython", platform_python_implementation="CPython", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return env


def raysr_requirements(extras: list[str]) -> list[Requirement]:
    """pyproject.toml's dependencies plus those of ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    unknown = set(extras) - set(project["optional-dependencies"])
    if unknown:
        sys.exit(f"carry_wheels.py: no raysr extra {sorted(unknown)}; there are {sorted(project['optional-dependencies'])}")
    lines = project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]
    return [Requirement(line) for line in lines]


def resolve(roots: list[Requirement], wheels: dict[str, Path], env: dict, python_version: str, tmp: Path):
    """Walk Requires-Dist from ``roots`` down to the packages the GPU image has (not expanded: the image
    brings their dependencies), downloading what ``wheels`` (name: wheel) lacks.
    Returns ({name: wheel}, {name on the image: {specifiers asked}})."""
    wanted: dict[str, list[Requirement]] = {}  # name -> every requirement naming it
    wheels = dict(wheels)
    expanded: dict[str, set[str]] = {}  # name -> the extras its Requires-Dist was walked with
    assumed: dict[str, set[str]] = {}

    def want(requirements):
        for req in requirements:
            name = canonicalize_name(req.name)
            if name in GPU_IMAGE:
                assumed.setdefault(name, set()).add(str(req.specifier))
            elif name not in NOT_CARRIED:
                wanted.setdefault(name, []).append(req)

    want(roots)
    while True:
        missing = sorted(set(wanted) - set(wheels))
        if missing:
            wheels.update(download([pin(n, wanted[n]) for n in missing], python_version, tmp))
            continue
        todo = [(n, set().union(*(r.extras for r in reqs))) for n, reqs in wanted.items()]
        todo = [(n, extras) for n, extras in todo if n not in expanded or not extras <= expanded[n]]
        if not todo:
            break
        for name, extras in todo:
            expanded[name] = extras
            want(requires_dist(wheels[name], extras, env))
    for name, reqs in wanted.items():  # a version picked before a later requirement narrowed it
        version = parse_wheel_filename(wheels[name].name)[1]
        for req in reqs:
            if not req.specifier.contains(version, prereleases=True):
                sys.exit(f"carry_wheels.py: {name} {version} does not satisfy {req}; pin it in raysr_requirements")
    return wheels, assumed


def pin(name: str, reqs: list[Requirement]) -> str:
    """``name==V`` where the version installed here fits every requirement (the one tested with raysr),
    else ``name`` with the requirements' specifiers."""
    specifier = SpecifierSet(",".join(str(r.specifier) for r in reqs if str(r.specifier)))
    try:
        here = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        here = None
    return f"{name}=={here}" if here and specifier.contains(here, prereleases=True) else f"{name}{specifier}"


def download(pins: list[str], python_version: str, tmp: Path) -> dict[str, Path]:
    """pip-download ``pins`` (no dependencies) as wheels for the target; {name: wheel path}."""
    dest = Path(tempfile.mkdtemp(dir=tmp))
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    print("pip download " + " ".join(pins), flush=True)
    subprocess.run(command + pins, check=True)
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in dest.glob("*.whl")}


def requires_dist(wheel: Path, extras: set[str], env: dict) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the target with ``extras`` requested."""
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        lines = z.read(metadata).decode().split("\n\n")[0].splitlines()
    reqs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None
            or any(r.marker.evaluate({**env, "extra": e}) for e in extras | {""})]


def trim_wheel(source: Path, dest: Path, name: str) -> int:
    """Write ``source`` without TRIMMED[name]'s paths (but with KEPT[name]'s, plus PLACEHOLDERS[name]) to
    ``dest``, with a RECORD that lists what it holds. Returns the zipped bytes left out."""
    record_rows, dropped = [], 0
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1)
        for info in src.infolist():
            if info.filename == record_name or info.is_dir():
                continue
            if is_trimmed(name, info.filename):
                dropped += info.compress_size
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)  # keeps the mode bits
            record_rows.append(record_row(info.filename, data))
        for path, data in PLACEHOLDERS.get(name, {}).items():
            dst.writestr(zipfile.ZipInfo(path, (2026, 1, 1, 0, 0, 0)), data)
            record_rows.append(record_row(path, data))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(record_rows + [(record_name, "", "")])
        dst.writestr(record_name, text.getvalue())
    return dropped


def is_trimmed(name: str, path: str) -> bool:
    """Whether the trimmed wheel of distribution ``name`` leaves out ``path`` (a path inside the wheel)."""
    return path.startswith(tuple(TRIMMED.get(name, ()))) and not path.startswith(KEPT.get(name, ()))


def record_row(name: str, data: bytes) -> tuple[str, str, str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return name, f"sha256={digest}", str(len(data))


def travelling_tree_bytes() -> int:
    """The bytes of the files that travel with a device run besides carried paths: tracked files and
    untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    return sum(os.path.getsize(ROOT / n) for n in names if n and (ROOT / n).is_file())


if __name__ == "__main__":
    main()
