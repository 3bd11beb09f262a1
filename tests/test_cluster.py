"""The cluster files and the docs' scale-out guide, checked by the tools that will read them.

* ``cluster/aws-gpu.yaml`` validates against ``ray/autoscaler/ray-schema.json`` of the installed
  Ray and passes Ray's own config preparation; after the docs' ``aws iam`` commands ran against
  a moto AWS on loopback, Ray's AWS bootstrap and node provider launch every node type with it.
* Every command line in ``cluster/*.yaml``, ``README.md`` and ``docs/*.md`` parses with its tool's own parser:
  raysr tools through ``build_parser()``, ``python -m raysr.train`` through ``main([... --dry-run])``
  (config resolution and data checks, against shards the documented ``make_shards`` commands wrote
  to the documented S3 URIs), ``ray …`` through Ray's click CLI, runtime envs through Ray's
  ``RuntimeEnv`` and working-dir packaging.
* ``cluster/rayjob.yaml`` has the fields KubeRay requires.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

import ray

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LAUNCHER_YAML = CLUSTER / "aws-gpu.yaml"
RAYJOB_YAML = CLUSTER / "rayjob.yaml"
RUNTIME_ENV_YAML = CLUSTER / "runtime_env.yaml"

# GPUs per EC2 instance type (AWS instance-type docs); 0 = CPU only.
INSTANCE_GPUS = {
    "m5.xlarge": 0, "m5.2xlarge": 0, "m5.4xlarge": 0, "m6i.2xlarge": 0, "c5.2xlarge": 0,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.12xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6e.xlarge": 1, "g6.48xlarge": 8,
    "p4d.24xlarge": 8, "p5.48xlarge": 8,
}
IMAGE_TAG = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py3\d+-(?P<platform>cpu|gpu|cu\d+)$")
COMMAND_WORDS = ("python", "python3", "ray", "aws", "kubectl")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
# Keys whose documented value is a path the dry-run checks; local ones are swapped for test files.
PATH_KEYS = ("data.train", "data.val", "data.val_lr", "train.init_from", "loss.perceptual.weights_path")


# --------------------------------------------------------------------------- command lines in docs


def split_commands(text: str) -> list[list[str]]:
    """Shell text -> one token list per command.

    ``\\`` continuations are joined and quoted strings may span lines (the guide's IAM policies);
    ``#`` comments are dropped; ``a && b``, ``a; b`` and pipes give separate commands.
    """
    commands, buffer = [], ""
    for line in text.splitlines():
        if not line.strip() and buffer:  # a blank line ends an unbalanced quote: not a command
            buffer = ""
            continue
        buffer += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        lexer = shlex.shlex(buffer.replace("\\\n", " "), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # the quoted string goes on on the next line
            continue
        buffer = ""
        current: list[str] = []
        for token in tokens + [";"]:
            if token in SHELL_OPERATORS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def markdown_shell_blocks(text: str) -> list[str]:
    """The bodies of fenced code blocks tagged bash/sh/shell/console or untagged."""
    blocks = re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [re.sub(r"^\$ ", "", body, flags=re.MULTILINE) for lang, body in blocks
            if lang in ("", "bash", "sh", "shell", "console")]


def yaml_comment_commands(text: str) -> list[list[str]]:
    """Commands written in ``#`` comments: lines starting with a command word, plus their continuations."""
    lines = [m.group(1) for m in re.finditer(r"^\s*#\s?(.*)$", text, flags=re.MULTILINE)]
    chunks, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if line.split(" ", 1)[0] not in COMMAND_WORDS:
            continue
        chunk = [line]
        while chunk[-1].endswith("\\") and i < len(lines):
            chunk.append(lines[i].strip())
            i += 1
        chunks.append("\n".join(chunk))
    return [cmd for chunk in chunks for cmd in split_commands(chunk)]


def yaml_string_commands(node) -> list[list[str]]:
    """Commands in YAML string values (a RayJob entrypoint, setup_commands)."""
    if isinstance(node, dict):
        return [c for v in node.values() for c in yaml_string_commands(v)]
    if isinstance(node, list):
        return [c for v in node for c in yaml_string_commands(v)]
    if isinstance(node, str) and "python -m raysr." in node:
        return split_commands(node)
    return []


def doc_pages() -> list[Path]:
    """README.md and the pages of docs/, where the documented commands live."""
    assert README.exists(), "README.md is missing"
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages: the guides (scale-out included) live there"
    return [README, *pages]


def documented_commands() -> dict[str, list[list[str]]]:
    """Every command line of cluster/*.yaml, README.md and docs/*.md, by file (relative path)."""
    found = {}
    for page in doc_pages():
        text = page.read_text()
        found[str(page.relative_to(ROOT))] = [c for block in markdown_shell_blocks(text) for c in split_commands(block)]
    for path in sorted(CLUSTER.glob("*.yaml")):
        text = path.read_text()
        found[f"cluster/{path.name}"] = yaml_comment_commands(text) + yaml_string_commands(yaml.safe_load(text))
    return found


def doc_names(docs: dict[str, list[list[str]]]) -> list[str]:
    """The markdown pages among the documented files: README.md and docs/*.md."""
    return [where for where in docs if where.endswith(".md")]


@dataclass
class RaysrCommand:
    where: str
    module: str  # raysr.train, raysr.data.make_shards, …
    argv: list[str]
    on_cluster: bool  # the entrypoint of `ray job submit` or of the RayJob


def raysr_command(tokens: list[str], where: str, on_cluster: bool) -> RaysrCommand | None:
    for i in range(len(tokens) - 2):
        if tokens[i] in ("python", "python3") and tokens[i + 1] == "-m" and tokens[i + 2].startswith("raysr"):
            return RaysrCommand(where, tokens[i + 2], tokens[i + 3:], on_cluster)
    return None


def raysr_commands(docs: dict[str, list[list[str]]]) -> list[RaysrCommand]:
    out = []
    for where, commands in docs.items():
        for tokens in commands:
            if tokens[0] == "ray":
                continue  # `ray job submit -- python -m raysr…` is collected with its ray command
            cmd = raysr_command(tokens, where, on_cluster=where == "cluster/rayjob.yaml")
            if cmd is not None:
                out.append(cmd)
    for where, tokens, ctx in ray_commands(docs):
        if ctx.command.name == "submit":
            cmd = raysr_command(list(ctx.params["entrypoint"]), where, on_cluster=True)
            if cmd is not None:
                out.append(cmd)
    return out


def parse_ray_cli(tokens: list[str]):
    """Parse ``ray …`` with Ray's own click CLI (no command runs); returns the leaf command's context."""
    import click
    from ray.scripts.scripts import cli

    command, args, name = cli, tokens[1:], "ray"
    while isinstance(command, click.Group):
        assert args, f"{' '.join(tokens)}: missing subcommand"
        sub = command.get_command(None, args[0])
        assert sub is not None, f"{' '.join(tokens)}: ray has no command {name} {args[0]}"
        name, command, args = f"{name} {args[0]}", sub, args[1:]
    return command.make_context(name, list(args))


def ray_commands(docs: dict[str, list[list[str]]]):
    return [(where, tokens, parse_ray_cli(tokens)) for where, commands in docs.items()
            for tokens in commands if tokens[0] == "ray"]


def parser_for(module_name: str):
    """A raysr tool's argparse parser: ``build_parser()`` of the module (or of its ``__main__``)."""
    module = importlib.import_module(module_name)
    if not hasattr(module, "build_parser") and hasattr(module, "__path__"):
        module = importlib.import_module(module_name + ".__main__")
    assert hasattr(module, "build_parser"), (
        f"{module_name} has no build_parser(); the docs' command lines cannot be checked without it")
    return module.build_parser()


def parse_or_fail(parser, argv: list[str], what: str):
    try:
        return parser.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{what}: argparse rejected the documented arguments (exit {err.code})")


def documented_value(raw: str):
    """A ``--set`` value as a user means it: YAML, with the float spellings YAML 1.1 leaves as strings."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def same(expected, actual) -> bool:
    if isinstance(actual, list) and not isinstance(expected, list):
        expected = [expected]  # `--set data.train=s3://…` is a one-element list
    if isinstance(expected, float) or isinstance(actual, float):
        return abs(float(expected) - float(actual)) <= 1e-12 * max(1.0, abs(float(expected)))
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(same(e, a) for e, a in zip(expected, actual))
    return expected == actual


# --------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def docs():
    return documented_commands()


@pytest.fixture
def photo_dir(tmp_path, make_image):
    """Two small photos, stand-ins for the documented --input folders."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(2):
        Image.fromarray(make_image(160, 200, seed)).save(folder / f"{seed:04d}.png")
    return folder


def ensure_bucket(uri: str) -> None:
    import raysr.storage

    bucket, _ = raysr.storage.split_s3(uri)
    client = raysr.storage.s3_client()
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)


# --------------------------------------------------------------------------- the helper itself


def test_split_commands_joins_continuations_quotes_and_splits_operators():
    text = ("ray job submit --address http://127.0.0.1:8265 \\\n  -- python -m raysr.train --set a=1  # note\n"
            "aws iam put-role-policy --policy-document '{\"a\": [\n  1]}' && echo done\n"
            "# only a comment\n")
    assert split_commands(text) == [
        ["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--", "python", "-m", "raysr.train",
         "--set", "a=1"],
        ["aws", "iam", "put-role-policy", "--policy-document", '{"a": [\n  1]}'],
        ["echo", "done"],
    ]
    yaml_text = ("# Use it:\n#   ray up cluster/x.yaml   # head\n#   python -m raysr.train \\\n"
                 "#     --preset esrgan_x4\n# Ray starts the head, don't worry\nkey: 1\n")
    assert yaml_comment_commands(yaml_text) == [["ray", "up", "cluster/x.yaml"],
                                                ["python", "-m", "raysr.train", "--preset", "esrgan_x4"]]


# --------------------------------------------------------------------------- aws-gpu.yaml


def launcher_config() -> dict:
    return yaml.safe_load(LAUNCHER_YAML.read_text())


def test_launcher_yaml_validates_against_the_schema_shipped_with_ray():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = launcher_config()
    jsonschema.validate(config, schema)  # the file as written …
    validate_config(prepare_config(config))  # … and after Ray merges its AWS defaults, as `ray up` does


def test_launcher_yaml_is_a_cpu_head_with_gpu_workers_that_scale_from_zero():
    config = launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}

    assert INSTANCE_GPUS[head["node_config"]["InstanceType"]] == 0, "the head must be a CPU instance"
    assert head["resources"].get("GPU", 0) == 0
    gpus = {name: INSTANCE_GPUS[t["node_config"]["InstanceType"]] for name, t in workers.items()}
    assert all(n > 0 for n in gpus.values()), f"every worker type must have GPUs: {gpus}"
    assert 1 in gpus.values() and 8 in gpus.values(), f"want a 1-GPU and an 8-GPU type, got {gpus}"
    spot = [name for name, t in workers.items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert len(spot) == 1 and gpus[spot[0]] == 1, f"want one 1-GPU spot type, got {spot}"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert 0 < t["max_workers"] <= config["max_workers"]
        assert "--gpus all" in t.get("docker", {}).get("worker_run_options", []), f"{name} lacks --gpus all"
    for name, t in types.items():  # workers read S3 too: every node needs an instance profile
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), f"{name}: {arn}"
    assert 0 < config["idle_timeout_minutes"] <= 60


def test_launcher_images_match_the_installed_ray_and_install_raysr_with_the_cluster_extra():
    config = launcher_config()
    docker = config["docker"]
    images = {"worker": docker["image"], "head": docker.get("head_image", docker["image"])}
    for role, image in images.items():
        m = IMAGE_TAG.match(image)
        assert m, f"{role} image {image!r} is not rayproject/ray:<version>-py3X-<cpu|gpu|cuXX>"
        assert m["version"] == ray.__version__, f"{role} image has Ray {m['version']}, raysr runs {ray.__version__}"
    assert IMAGE_TAG.match(images["worker"])["platform"] != "cpu", "GPU workers need a CUDA image"
    assert not any("ray-ml" in image for image in images.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "[cluster]" in setup
    for remote, local in config.get("file_mounts", {}).items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist in the repository"
        assert remote in setup, f"setup_commands do not install from the mounted checkout {remote}"


def test_every_node_type_launches_after_the_documented_iam_setup(s3_endpoint, tmp_path, monkeypatch, docs):
    """The docs' `aws iam` commands, replayed on moto, are what `ray up` and the autoscaler need."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the generated SSH key to ~/.ssh
    # moto knows AWS-managed policies (AmazonEC2FullAccess) only when asked, before its first IAM call
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    iam_commands = [t for where in doc_names(docs) for t in docs[where] if t[:2] == ["aws", "iam"]]
    assert iam_commands, "README.md and docs/*.md document no `aws iam` setup"
    for tokens in iam_commands:
        replay_aws_cli(tokens)

    config = bootstrap_aws(prepare_config(launcher_config()))
    region = config["provider"]["region"]
    zones = config["provider"]["availability_zone"].split(",")
    provider = AWSNodeProvider(config["provider"], config["cluster_name"])
    for name, node_type in config["available_node_types"].items():
        provider.create_node(dict(node_type["node_config"]),
                             {TAG_RAY_NODE_KIND: "worker", TAG_RAY_USER_NODE_TYPE: name, TAG_RAY_NODE_NAME: name}, 1)

    ec2 = boto3.client("ec2", region_name=region)
    launched = {}
    for reservation in ec2.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            launched[tags[TAG_RAY_USER_NODE_TYPE]] = instance
    assert set(launched) == set(config["available_node_types"])
    for name, instance in launched.items():
        node_config = config["available_node_types"][name]["node_config"]
        assert instance["InstanceType"] == node_config["InstanceType"]
        assert instance["IamInstanceProfile"]["Arn"] == node_config["IamInstanceProfile"]["Arn"]
        assert instance["Placement"]["AvailabilityZone"] in zones
        is_spot = node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        assert (instance.get("InstanceLifecycle") == "spot") == is_spot


def replay_aws_cli(tokens: list[str]):
    """Run ``aws <service> <operation> --option value …`` through boto3, as the AWS CLI maps it.

    Operation and option names are the botocore model's names in kebab case (``put-role-policy``,
    ``--policy-document``); output options (``--query``, ``--output``) are dropped.
    """
    import boto3
    from botocore import xform_name

    service, operation, args = tokens[1], tokens[2], tokens[3:]
    client = boto3.client(service, region_name="us-east-1")
    model = client.meta.service_model
    names = [o for o in model.operation_names if xform_name(o, "-") == operation]
    assert names, f"{' '.join(tokens[:3])}: no such operation"
    members = model.operation_model(names[0]).input_shape.members
    params, i = {}, 0
    while i < len(args):
        flag = args[i]
        assert flag.startswith("--") and i + 1 < len(args), f"{' '.join(tokens[:3])}: cannot read {args[i:]}"
        option, value = flag[2:], args[i + 1]
        i += 2
        if option in ("query", "output", "region", "profile"):
            continue
        member = next((m for m in members if xform_name(m, "-") == option), None)
        assert member is not None, f"{' '.join(tokens[:3])}: unknown option --{option}"
        if option.endswith("policy-document"):
            json.loads(value)  # the CLI sends it as is; a typo would only show up in AWS
        params[member] = value
    return getattr(client, xform_name(names[0]))(**params)


# --------------------------------------------------------------------------- documented command lines


def test_docs_cover_the_scale_out_steps(docs):
    ray_lines = [" ".join(t[:3]) for commands in docs.values() for t in commands if t[0] == "ray"]
    pages = doc_names(docs)
    guide = [" ".join(t[:3]) for where in pages for t in docs[where] if t[0] == "ray"]
    for needed in ("ray up cluster/aws-gpu.yaml", "ray job submit", "ray down cluster/aws-gpu.yaml",
                   "ray dashboard cluster/aws-gpu.yaml"):
        assert any(line.startswith(needed) for line in guide), f"README.md and docs/*.md lack `{needed}`"
    assert ray_lines
    modules = {(c.where, c.module) for c in raysr_commands(docs)}
    documented = {module for where, module in modules if where in pages}
    assert "raysr.data.make_shards" in documented
    assert "raysr.train" in documented
    assert "raysr.tune" in documented
    assert ("cluster/rayjob.yaml", "raysr.train") in modules
    assert ("cluster/aws-gpu.yaml", "raysr.train") in modules


def test_ray_and_kubectl_command_lines_parse_and_name_files_that_exist(docs, monkeypatch):
    """`ray up/dashboard/exec/monitor/down`, `ray job submit/logs/status/stop` as Ray's CLI parses them."""
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    monkeypatch.chdir(ROOT)
    for where, commands in docs.items():
        for tokens in commands:
            if tokens[:2] in (["kubectl", "apply"], ["kubectl", "create"]) and "-f" in tokens:
                path = tokens[tokens.index("-f") + 1]
                assert Path(path).is_file(), f"{where}: {' '.join(tokens)}: no file {path}"
    submits = 0
    for where, tokens, ctx in ray_commands(docs):
        params = ctx.params
        if "cluster_config_file" in params:
            assert Path(params["cluster_config_file"]).is_file(), f"{where}: {' '.join(tokens)}"
        if ctx.command.name == "submit":
            submits += 1
            assert params["entrypoint"], f"{where}: ray job submit without an entrypoint"
            env = parse_runtime_env_args(runtime_env=params["runtime_env"], working_dir=params["working_dir"])
            check_runtime_env(env, where)
    assert submits >= 2


def check_runtime_env(env: dict, where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"{where}: runtime_env keys Ray does not know: {sorted(unknown)}"
    RuntimeEnv(**env)  # Ray's own type checks (env_vars str -> str, excludes list, pip list …)


def test_runtime_env_ships_the_checkout_under_rays_size_limit(tmp_path, monkeypatch):
    """What `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir .` zips and uploads."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    monkeypatch.chdir(ROOT)
    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV_YAML), working_dir=".")
    check_runtime_env(env, "cluster/runtime_env.yaml")
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    package = tmp_path / "working_dir.zip"

    def upload(working_dir, excludes, is_file=False):
        create_package(working_dir, package, include_gitignore=True, excludes=excludes)

    upload_working_dir_if_needed(dict(env), include_gitignore=True, upload_fn=upload)
    names = zipfile.ZipFile(package).namelist()
    assert "raysr/train.py" in names and "raysr/presets/esrgan_x4.yaml" in names
    assert "cluster/aws-gpu.yaml" in names
    assert not [n for n in names if n.startswith(".git/") or "__pycache__" in n]
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE


def test_raysr_command_lines_parse_and_resolve(docs, s3_endpoint, photo_dir, tmp_path, monkeypatch, capsys):
    """Every documented `python -m raysr.<tool>` line through the tool's parser; raysr.train with --dry-run.

    The documented make_shards commands run first (their --input swapped for two small photos)
    and write to the documented S3 URIs on the moto server. A cluster job's data.train must be one
    of those URIs (the guide's steps fit together); other examples get shards made at their URL.
    Documented local paths (a user's /data/…) are swapped for test files.
    """
    import raysr.storage
    import raysr.train
    from raysr.data.make_shards import main as make_shards_main

    monkeypatch.chdir(ROOT)
    # A user who runs a GAN preset without loss.perceptual.weights_path has torchvision's VGG19 in
    # the torch hub cache; the dry run checks that the file is there, so a stand-in will do.
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "vgg19-dcbb9e9d.pth").write_bytes(b"stand-in")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    commands = raysr_commands(docs)

    def make_shards(argv: list[str], output: str, what: str) -> None:
        pairs = []  # a documented --lr-input folder: the stand-in photos' LR images at the documented --scale
        if "--lr-input" in argv:
            pairs = ["--lr-input", str(lr_stand_ins(photo_dir, int(argv[argv.index("--scale") + 1])))]
        rc = make_shards_main(argv + ["--input", str(photo_dir), "--output", output, "--workers", "1"] + pairs)
        assert rc == 0, f"{what} failed: {capsys.readouterr().err}"
        assert raysr.storage.exists(raysr.storage.join(output, "manifest.parquet"))

    local = local_stand_ins(tmp_path, photo_dir, make_shards)

    produced = set()
    for cmd in (c for c in commands if c.module == "raysr.data.make_shards"):
        what = f"{cmd.where}: python -m {cmd.module} {' '.join(cmd.argv)}"
        args = parse_or_fail(parser_for(cmd.module), cmd.argv, what)
        if raysr.storage.is_s3(args.output):
            ensure_bucket(args.output)
            make_shards(cmd.argv, args.output, what)
            produced.add(args.output.rstrip("/"))
        else:
            make_shards(cmd.argv, str(tmp_path / "shards_out"), what)

    skipped_tune = 0
    for cmd in commands:
        what = f"{cmd.where}: python -m {cmd.module} {' '.join(cmd.argv)}"
        if cmd.module == "raysr.train":
            for source in s3_train_sources(cmd.argv):
                # The scale-out flow must train on what its own make_shards step wrote; an example
                # elsewhere only needs some shards at its URL.
                if source.rstrip("/") not in produced:
                    assert not cmd.on_cluster, f"{what}: no documented make_shards writes {source}"
                    ensure_bucket(source)
                    make_shards([], source, f"shards for {what}")
                    produced.add(source.rstrip("/"))
            check_train_command(cmd, what, local, raysr.train.main, capsys)
        elif cmd.module == "raysr.tune" and importlib.util.find_spec("raysr.tune") is None:
            skipped_tune += 1
        elif cmd.module != "raysr.data.make_shards":
            args = parse_or_fail(parser_for(cmd.module), cmd.argv, what)
            if cmd.module == "raysr.tune":
                assert Path(args.space).is_file(), f"{what}: no search space file {args.space}"
    if skipped_tune:
        warnings.warn(f"{skipped_tune} documented `python -m raysr.tune` line(s) not checked: "
                      "raysr.tune does not exist yet")


def s3_train_sources(argv: list[str]) -> list[str]:
    """The s3:// shard sources a train command line sets with --set data.train=…"""
    args = parser_for("raysr.train").parse_args(argv)
    values = [documented_value(item.partition("=")[2]) for item in args.set if item.startswith("data.train=")]
    sources = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return [s for s in sources if isinstance(s, str) and s.startswith("s3://")]


def lr_stand_ins(photo_dir: Path, scale: int) -> Path:
    """The LR images (Pillow's bicubic ÷ ``scale``, same names) of the stand-in photos, in a folder beside them."""
    folder = photo_dir.parent / f"photos_lr_x{scale}"
    if not folder.is_dir():
        folder.mkdir()
        for path in sorted(photo_dir.glob("*.png")):
            with Image.open(path) as photo:
                photo.resize((photo.width // scale, photo.height // scale), Image.BICUBIC).save(folder / path.name)
    return folder


def local_stand_ins(tmp_path: Path, photo_dir: Path, make_shards) -> dict[str, str]:
    """Test files for documented local paths (a user's /data/…): shards, images (and their x4 LR, the
    presets' scale), a checkpoint, weights."""
    shards = tmp_path / "local_shards"
    make_shards([], str(shards), "local stand-in shards")
    checkpoint = tmp_path / "generator.pth"
    checkpoint.write_bytes(b"stand-in: the dry run checks that the file exists, not its contents")
    return {"data.train": str(shards), "data.val": str(photo_dir), "data.val_lr": str(lr_stand_ins(photo_dir, 4)),
            "train.init_from": str(checkpoint), "loss.perceptual.weights_path": str(checkpoint)}


def check_train_command(cmd: RaysrCommand, what: str, local: dict[str, str], train_main, capsys) -> None:
    args = parse_or_fail(parser_for("raysr.train"), cmd.argv, what)
    overrides = dict(item.partition("=")[::2] for item in args.set)
    argv = list(cmd.argv)
    for key in PATH_KEYS:  # a user's local path cannot exist here: point it at a test file instead
        if key in overrides and not overrides[key].startswith("s3://"):
            argv += ["--set", f"{key}={local[key]}"]
    if args.config and not Path(args.config).is_file():
        # e.g. best_config.yaml written by raysr.tune: stand in a preset to check the other flags
        from raysr.config import preset_text
        stand_in = Path(local["data.train"]).parent / "documented_config.yaml"
        stand_in.write_text(preset_text("quickstart"))
        argv[argv.index(args.config)] = str(stand_in)

    capsys.readouterr()
    rc = train_main(argv + ["--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, f"{what}\n-> exit {rc}: {err.strip()}"
    resolved = yaml.safe_load(out)
    for key, raw in overrides.items():  # every documented --set reached the config
        if key in PATH_KEYS and not raw.startswith("s3://"):
            continue
        assert same(documented_value(raw), config_value(resolved, key)), (
            f"{what}: --set {key}={raw} resolved to {config_value(resolved, key)!r}")
    if cmd.on_cluster:  # an autoscaling cluster has no GPU until asked, and its nodes share no disk
        assert resolved["run"]["use_gpu"] is True, f"{what}: needs --set run.use_gpu=true"
        assert resolved["run"]["storage"].startswith("s3://"), f"{what}: run.storage must be s3://"
        assert all(u.startswith("s3://") for u in resolved["data"]["train"]), f"{what}: data.train must be s3://"
        perceptual = resolved["loss"]["perceptual"]
        if resolved["train"]["phase"] == "gan" and perceptual["weight"] > 0:  # no hub cache on the head
            assert str(perceptual["weights_path"]).startswith("s3://"), (
                f"{what}: set loss.perceptual.weights_path=s3://… (the cluster has no cached VGG19)")


# --------------------------------------------------------------------------- rayjob.yaml


def test_rayjob_has_the_fields_kuberay_requires():
    job = yaml.safe_load(RAYJOB_YAML.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", job["metadata"]["name"]), "not a DNS-1123 label"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m raysr.train --preset esrgan_x4")
    check_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]), "cluster/rayjob.yaml runtimeEnvYAML")
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    check_ray_start_params(head["rayStartParams"])
    head_container = head["template"]["spec"]["containers"][0]
    check_image(head_container)
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {})

    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"]
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"], "must scale from zero"
        check_ray_start_params(group["rayStartParams"])
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        check_image(container)
        assert IMAGE_TAG.match(container["image"])["platform"] != "cpu"
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, "DataLoader workers need a /dev/shm larger than a pod's 64 MiB default"
        volume = next(v for v in pod["volumes"] if v["name"] == shm[0]["name"])
        assert volume["emptyDir"]["medium"] == "Memory"


def check_ray_start_params(params: dict) -> None:
    # KubeRay passes them as `ray start --key=value`; its CRD types the map as string -> string
    assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), params


def check_image(container: dict) -> None:
    assert container["name"]
    m = IMAGE_TAG.match(container["image"])
    assert m and m["version"] == ray.__version__, container["image"]
