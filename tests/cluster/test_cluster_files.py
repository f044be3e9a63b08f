"""Every file in ``cluster/``, loaded and checked against what the tools that read it expect.

- every YAML parses (all documents of it), and every key carries a comment;
- Ray cluster launcher configs validate against the schema that ships inside Ray
  (``ray/autoscaler/ray-schema.json``), pass the launcher's own preparation and checks (what
  ``ray up`` runs first) and have what this project needs: GPU counts on GPU nodes, the
  repository synced by ``file_mounts``, torch installed before the project;
- KubeRay manifests (``ray.io/v1`` RayCluster / RayJob) validate against KubeRay's CRD schemas,
  strictly (an unknown field is an error, as ``kubectl apply`` makes it): the CRDs are not
  shipped here but read from ``shared/`` beside the repository (see ``KUBERAY_CRDS``), and
  those checks skip with a message where it lacks them. Beyond the schema: GPU limits on GPU
  workers, S3 credentials only through ``secretKeyRef``, images under tags never reused, a
  RayJob that shuts its cluster down and whose entrypoint survives KubeRay's shell line;
- every cluster has Ray's token authentication on and keeps its dashboard off public
  interfaces;
- every ``qformer train|prep SPEC.yaml`` in any cluster file names a job spec in ``jobs/`` that
  validates (a training spec for ``train``, a prep spec for ``prep``);
- no credentials anywhere: no AWS access key IDs, no secret-key values but placeholders;
- ``local-multinode.sh`` passes ``bash -n``, is executable, and really starts and stops a
  two-node cluster (only its own processes);
- every file is covered: a file of a kind no check knows fails ``test_every_file_is_checked``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.spec import JobSpec, load_spec
from tests.helpers import REPO

CLUSTER = REPO / "cluster"
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
YAML_FILES = [p for p in FILES if p.suffix in (".yaml", ".yml")]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _category(path: Path) -> str | None:
    """Which group of checks covers ``path``; None: no check knows this kind of file."""
    if path.suffix in (".yaml", ".yml"):
        try:
            docs = _documents(path)
        except yaml.YAMLError:
            return "yaml"  # test_yaml_parses reports it
        if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]:
            return "launcher"
        if docs and all(isinstance(d, dict) and {"apiVersion", "kind"} <= d.keys() for d in docs):
            return "kubernetes"
        return None
    if path.suffix == ".sh":
        return "shell"
    if path.suffix == ".md":
        return "docs"
    if path.name == "Dockerfile":
        return "dockerfile"
    return None


LAUNCHER = [p for p in YAML_FILES if _category(p) == "launcher"]
KUBERNETES = [p for p in YAML_FILES if _category(p) == "kubernetes"]
SCRIPTS = [p for p in FILES if _category(p) == "shell"]
DOCKERFILES = [p for p in FILES if _category(p) == "dockerfile"]


def _ids(paths: list[Path]) -> list[str]:
    return [_rel(p) for p in paths]


# ---------------------------------------------------------------- what the project pins


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pinned_ray() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[\w,]+\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml pins no ray version")


def _pinned_torch() -> str:
    """The torch version .ci/install installs first (the one the project is tested with)."""
    match = re.search(r"install\b.*\btorch==([\w.]+)", (REPO / ".ci" / "install").read_text())
    assert match, ".ci/install pins no torch version"
    return match.group(1)


# ---------------------------------------------------------------- all files


def test_every_file_is_checked():
    unknown = [_rel(p) for p in FILES if _category(p) is None]
    assert not unknown, (f"no check in {Path(__file__).name} covers {unknown}: add one (and a "
                         "category in _category) for this kind of file")


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_yaml_parses(path):
    docs = _documents(path)
    assert docs, f"{_rel(path)} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs)


def _uncommented_keys(text: str) -> list[str]:
    """Keys with no comment on their line or the line above (headings and list items exempt,
    block scalars skipped), as in tests/spec's rule for jobs/."""
    missing, previous, block_indent = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped:
            continue
        is_key = not stripped.startswith(("#", "- ")) and not stripped.endswith(":")
        if not stripped.startswith("#") and re.search(r":\s*[|>][-+]?\s*(#.*)?$", stripped):
            block_indent = indent
            is_key = True
        if is_key and not ("#" in line or previous.startswith("#")):
            missing.append(f"{number}: {stripped}")
        previous = stripped
    return missing


@pytest.mark.parametrize("path", YAML_FILES, ids=_ids(YAML_FILES))
def test_every_key_is_commented(path):
    missing = _uncommented_keys(path.read_text())
    assert not missing, f"{_rel(path)}: keys without a comment:\n" + "\n".join(missing)


# ---------------------------------------------------------------- credentials

ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_VALUE = re.compile(
    r"aws_secret_access_key['\"]?\s*[:=]\s*['\"]?([^\s'\"#,}]+)", re.IGNORECASE)
PLACEHOLDER = re.compile(r"^(REPLACE\w*|<[^>]*>|\$\{?\w+\}?|\.\.\.)$")


def _credential_leaks(text: str) -> list[str]:
    leaks = [f"access key ID {m.group(0)}" for m in ACCESS_KEY_ID.finditer(text)]
    leaks += [f"secret access key value {m.group(1)!r}" for m in SECRET_VALUE.finditer(text)
              if not PLACEHOLDER.match(m.group(1))]
    return leaks


def test_the_credential_scan_catches_real_looking_keys():
    key_id = "AKIA" + "Q" * 16  # built here so that this file holds no key-shaped literal
    secret = "wJalr" + "X" * 35
    assert _credential_leaks(f"AWS_ACCESS_KEY_ID={key_id}")
    assert _credential_leaks(f"aws_secret_access_key = {secret}")
    assert _credential_leaks(f'  AWS_SECRET_ACCESS_KEY: "{secret}"')
    assert not _credential_leaks('  AWS_SECRET_ACCESS_KEY: "REPLACE_WITH_SECRET_ACCESS_KEY"')
    assert not _credential_leaks("--from-literal=AWS_SECRET_ACCESS_KEY=<secret>")
    assert not _credential_leaks("- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:")


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_no_credentials_in_cluster_files(path):
    assert not _credential_leaks(path.read_text()), _rel(path)


# ---------------------------------------------------------------- job specs named by commands

COMMAND = re.compile(r"\bqformer\s+(train|prep)\s+([\w./-]+\.ya?ml)((?:\s+--set\s+[^\s`'\"]+)*)")


def _commands() -> list[tuple[Path, str, str, list[str]]]:
    found = []
    for path in FILES:
        for match in COMMAND.finditer(path.read_text()):
            overrides = shlex.split(match.group(3))[1::2]
            found.append((path, match.group(1), match.group(2), overrides))
    return found


COMMANDS = _commands()


def test_commands_are_found():
    """The scan sees the commands the cluster files are about (a regex that matches nothing
    would let every spec check pass vacuously)."""
    seen = {(_rel(path), verb, spec) for path, verb, spec, _ in COMMANDS}
    assert ("cluster/kuberay/rayjob.yaml", "train", "jobs/blip2_curriculum.yaml") in seen
    assert ("cluster/aws-gpu.yaml", "train", "jobs/blip2_curriculum.yaml") in seen
    assert ("cluster/aws-cpu-prep.yaml", "prep", "jobs/prep_laion.yaml") in seen
    assert any(_rel(path) == "cluster/README.md" for path, *_ in COMMANDS)


@pytest.mark.parametrize(
    "path, verb, spec, overrides", COMMANDS,
    ids=[f"{_rel(p)}:{verb}:{spec}" for p, verb, spec, _ in COMMANDS],
)
def test_commands_name_job_specs_that_validate(path, verb, spec, overrides):
    spec_path = REPO / spec
    assert spec_path.is_file(), f"{_rel(path)} runs `qformer {verb} {spec}`: no such file"
    assert spec_path.parent == REPO / "jobs", f"{spec} is not a job spec in jobs/"
    job = load_spec(spec_path, JobSpec, overrides)
    if verb == "train":
        assert job.is_training, f"`qformer train {spec}`: the spec has no training job"
    else:
        assert job.prep is not None, f"`qformer prep {spec}`: the spec has no prep section"


def _train_specs_in(path: Path) -> list[JobSpec]:
    return [load_spec(REPO / spec, JobSpec, overrides)
            for p, verb, spec, overrides in COMMANDS if p == path and verb == "train"]


def _fits(job: JobSpec, nodes: list[tuple[float, float, int]]) -> bool:
    """Can nodes ``(cpus, gpus, count)`` hold the job's Ray Train workers at once?"""
    scaling = job.scaling
    slots = 0
    for cpus, gpus, count in nodes:
        per_node = int(cpus // scaling.cpus_per_worker)
        if scaling.gpus_per_worker:
            per_node = min(per_node, int(gpus // scaling.gpus_per_worker))
        slots += per_node * count
    return slots >= scaling.workers


# ---------------------------------------------------------------- Ray cluster launcher

# vCPUs and GPUs of the instance types the configs use (AWS's published figures).
INSTANCES = {
    "m7i.4xlarge": (16, 0), "m7i.8xlarge": (32, 0), "c7i.16xlarge": (64, 0),
    "c7i.24xlarge": (96, 0), "p4d.24xlarge": (96, 8), "p4de.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8), "p5e.48xlarge": (192, 8), "p5en.48xlarge": (192, 8),
}
GPU_FAMILY = re.compile(r"^(p\d|g\d)")


def _launcher(path: Path) -> dict:
    return _documents(path)[0]


def _prepared(path: Path) -> dict:
    """The config as `ray up` sees it: defaults filled in, setup commands merged, validated
    against Ray's cluster-config schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_launcher(path)))
    validate_config(config)
    return config


def _has_gpus(config: dict) -> bool:
    return any(t["resources"].get("GPU", 0) for t in config["available_node_types"].values())


def _schema_errors(validator, instance) -> list[str]:
    """Every schema violation of ``instance``, as ``field.path: message``."""
    return [f"{'.'.join(map(str, error.absolute_path)) or '(top level)'}: {error.message}"
            for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path)))]


@pytest.fixture(scope="module")
def launcher_schema():
    """The launcher's schema, as Ray ships it (``ray up`` validates against it)."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_matches_rays_schema(path, launcher_schema):
    """The file as written: required keys, no unknown ones, the types of every field."""
    errors = _schema_errors(launcher_schema, _launcher(path))
    assert not errors, f"{_rel(path)}:\n" + "\n".join(errors)


def test_the_launcher_schema_catches_mistakes(launcher_schema):
    config = copy.deepcopy(_launcher(LAUNCHER[0]))
    config["max_worker"] = config.pop("max_workers")  # misspelt
    del config["provider"]["type"]
    next(iter(config["available_node_types"].values()))["resources"]["CPU"] = "16"
    errors = _schema_errors(launcher_schema, config)
    assert any("max_worker" in e for e in errors)
    assert any(e.startswith("provider: 'type' is a required property") for e in errors)
    assert any(e.endswith(".resources.CPU: '16' is not of type 'integer'") for e in errors)


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_passes_ray_validation(path):
    """What ``ray up`` checks beyond the schema (the head node type is one of the node types,
    max_workers holds every type's min_workers) after filling in its defaults."""
    _prepared(path)


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_config_has_what_the_project_needs(path):
    config = _launcher(path)
    for key in ("available_node_types", "head_node_type", "max_workers", "idle_timeout_minutes",
                "setup_commands", "file_mounts", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in config, f"{_rel(path)}: no {key}"
    types = config["available_node_types"]
    assert len(types) >= 2, "a head node type and at least one worker node type"
    for name, node in types.items():
        instance = node["node_config"].get("InstanceType", "")
        cpus, gpus = INSTANCES.get(instance, (None, None))
        declared_gpus = node["resources"].get("GPU", 0)
        if GPU_FAMILY.match(instance):
            assert declared_gpus > 0, f"{name}: GPU instance {instance} declares no GPU count"
        else:
            assert declared_gpus == 0, f"{name}: {instance} has no GPUs"
        if gpus is not None:
            if declared_gpus:
                assert declared_gpus == gpus, f"{name}: {instance} has {gpus} GPUs"
            assert node["resources"].get("CPU", 0) <= cpus, f"{name}: {instance} has {cpus} vCPUs"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "ray start --address=$RAY_HEAD_IP:" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_syncs_the_repository_and_installs_torch_then_the_project(path):
    config = _prepared(path)
    repo_targets = [remote for remote, local in config["file_mounts"].items()
                    if (REPO / local).resolve() == REPO]
    assert repo_targets, f"{_rel(path)}: file_mounts syncs no local '.' (the repository root)"
    torch = _pinned_torch()
    for which in ("head_setup_commands", "worker_setup_commands"):
        commands = config[which]
        torch_at = [i for i, c in enumerate(commands) if re.search(r"pip install\b.*\btorch==", c)]
        project_at = [i for i, c in enumerate(commands)
                      if re.search(r"pip install\b", c) and any(t in c for t in repo_targets)]
        assert torch_at, f"{which}: no pinned torch install"
        assert project_at, f"{which}: no install of the synced project ({repo_targets})"
        assert torch_at[0] < project_at[0], f"{which}: torch must be installed before the project"
        torch_command = commands[torch_at[0]]
        assert f"torch=={torch}" in torch_command, f"{which}: torch=={torch} as .ci/install"
        # GPU nodes need PyPI's CUDA build; a CPU-only fleet takes the CPU wheel, not GBs of CUDA.
        uses_cpu_index = "download.pytorch.org/whl/cpu" in torch_command
        assert uses_cpu_index != _has_gpus(config), torch_command


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_image_matches_the_pinned_ray(path):
    config = _launcher(path)
    if "docker" not in config:
        return
    images = [config["docker"]["image"]]
    images += [config["docker"][k] for k in ("head_image", "worker_image") if k in config["docker"]]
    flavour = r"gpu|cu\d+" if _has_gpus(config) else "cpu"
    for image in images:
        match = re.fullmatch(r"rayproject/ray:([\d.]+)-py3\d+-(\w+)", image)
        assert match, f"{image}: expected rayproject/ray:VERSION-pyXY-FLAVOUR"
        assert match.group(1) == _pinned_ray(), f"{image}: the project pins ray {_pinned_ray()}"
    image = config["docker"]["image"]
    assert re.fullmatch(flavour, image.rsplit("-", 1)[1]), f"{image}: a {flavour} image"


@pytest.mark.parametrize("path", LAUNCHER, ids=_ids(LAUNCHER))
def test_launcher_cluster_has_token_auth_and_a_private_dashboard(path):
    """Every Ray process of every node runs with RAY_AUTH_MODE=token and finds the cluster's
    token where Ray looks by default; the dashboard stays on the head's localhost (reached
    through ``ray dashboard``'s SSH tunnel)."""
    config = _launcher(path)
    run_options = " ".join(config.get("docker", {}).get("run_options", []))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert re.search(r"(--env|-e)[ =]RAY_AUTH_MODE=token\b", run_options) or all(
        "RAY_AUTH_MODE=token" in command for command in starts if "ray start" in command), \
        "RAY_AUTH_MODE=token for every node (docker run_options, or each `ray start`)"
    assert "~/.ray/auth_token" in config["file_mounts"], \
        "the token synced to every node (file_mounts ~/.ray/auth_token)"
    hosts = re.findall(r"--dashboard-host[= ](\S+)", " ".join(config["head_start_ray_commands"]))
    assert set(hosts) <= {"127.0.0.1", "localhost"}, f"dashboard on {hosts}: keep it on localhost"


GPU_LAUNCHER = [p for p in LAUNCHER if _has_gpus(_launcher(p))]


@pytest.mark.parametrize("path", GPU_LAUNCHER, ids=_ids(GPU_LAUNCHER))
def test_gpu_launcher_cluster_holds_the_training_jobs_it_names(path):
    config = _launcher(path)
    nodes = [(t["resources"].get("CPU", 0), t["resources"].get("GPU", 0),
              min(t.get("max_workers", config["max_workers"]), config["max_workers"]))
             for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    jobs = _train_specs_in(path)
    assert jobs, f"{_rel(path)} names no `qformer train` job"
    for job in jobs:
        assert job.scaling.gpus_per_worker > 0, "a GPU cluster's job should train on GPUs"
        assert _fits(job, nodes), f"{_rel(path)} cannot hold {job.scaling}"


# ---------------------------------------------------------------- KubeRay

KUBERAY_CRDS = Path(os.environ.get("QFORMER_KUBERAY_CRDS",
                                   REPO.parent / "shared" / "assets" / "kuberay-crds"))
"""KubeRay's CRDs, as ray-project/kuberay v1.6.2 (commit 598eb66a) ships them in
helm-chart/kuberay-operator/crds/ (the first release with ``authOptions.secretName`` in both
kinds' schema that this project relies on). Not in this repository: fetched material lives in
``shared/`` beside it; ``QFORMER_KUBERAY_CRDS`` names another folder holding the same files."""
KUBERAY_CRD_FILES = {
    "RayCluster": ("ray.io_rayclusters.yaml",
                   "1d51d8c4ce065b22c2069af0ebd72ae25f4a6968e5c5f93a3106ba6fc35bcc1d"),
    "RayJob": ("ray.io_rayjobs.yaml",
               "ecae45d9a5dc1be68f1074ba784c495ef9d439d295253b61e1bd51f7b08522f5"),
}
CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
SHELL_OPERATORS = re.compile(r"&&|\|\||[;|&<>`]|\$\(")


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in KUBERNETES for doc in _documents(path)
            if doc["apiVersion"].startswith("ray.io/")]


def _secrets() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for path in KUBERNETES for doc in _documents(path)
            if doc["kind"] == "Secret"}


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _quantity(value) -> float:
    return float(str(value))


KUBERAY = _kuberay_docs()
KUBERAY_IDS = [f"{_rel(p)}:{d['kind']}" for p, d in KUBERAY]


def test_kuberay_manifests_define_a_cluster_and_a_job():
    kinds = {(_rel(p), d["kind"]) for p, d in KUBERAY}
    assert ("cluster/kuberay/raycluster.yaml", "RayCluster") in kinds
    assert ("cluster/kuberay/rayjob.yaml", "RayJob") in kinds


@pytest.mark.parametrize("path", KUBERNETES, ids=_ids(KUBERNETES))
def test_kubernetes_objects_are_known_kinds(path):
    for doc in _documents(path):
        assert (doc["apiVersion"], doc["kind"]) in {
            ("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "Secret")}, doc["kind"]
        assert doc["metadata"]["name"]


def _strict(schema):
    """``schema`` with unknown fields refused where it lists the known ones, as the API server
    does under ``kubectl apply``'s default strict field validation (a CRD schema alone lets
    them through: the server prunes or refuses them, and a validator would accept them)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def kuberay_schemas() -> dict:
    """kind -> a validator of KubeRay's ray.io/v1 schema for it (strict)."""
    import hashlib

    import jsonschema

    validators = {}
    for kind, (name, sha256) in KUBERAY_CRD_FILES.items():
        path = KUBERAY_CRDS / name
        if not path.is_file():
            pytest.skip(f"no {path}: put KubeRay v1.6.2's helm-chart/kuberay-operator/crds/{name} "
                        "there (or point QFORMER_KUBERAY_CRDS at it) to validate the manifests")
        text = path.read_bytes()
        assert hashlib.sha256(text).hexdigest() == sha256, f"{path} is not KubeRay v1.6.2's"
        crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        validators[kind] = jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    return validators


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_manifest_matches_the_crd_schema(path, doc, kuberay_schemas):
    """Every field known to KubeRay v1.6 (or to the Kubernetes pod spec inside), of its type:
    a misspelt field, a number where a string map is wanted (rayStartParams), a missing
    groupName all fail here as they would at ``kubectl apply``."""
    errors = _schema_errors(kuberay_schemas[doc["kind"]], doc)
    assert not errors, f"{_rel(path)} ({doc['kind']}):\n" + "\n".join(errors)


def test_the_kuberay_schema_catches_mistakes(kuberay_schemas):
    doc = copy.deepcopy(next(d for _, d in KUBERAY if d["kind"] == "RayCluster"))
    doc["spec"]["enableInTreeAutoScaling"] = doc["spec"].pop("enableInTreeAutoscaling")
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    doc["spec"]["authOptions"]["mode"] = "password"
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    errors = _schema_errors(kuberay_schemas["RayCluster"], doc)
    assert any("'enableInTreeAutoScaling' was unexpected" in e for e in errors), errors
    assert any(e.startswith("spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'")
               for e in errors), errors
    assert any(e.startswith("spec.authOptions.mode: 'password' is not one of") for e in errors)
    assert any(e.startswith("spec.workerGroupSpecs.0: 'groupName' is a required property")
               for e in errors), errors


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_groups_fit_the_project(path, doc):
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _pinned_ray(), "rayVersion: the Ray in the image"
    groups = spec["workerGroupSpecs"]
    assert groups, "at least one worker group"
    for group in groups:
        replicas = group.get("replicas", group["minReplicas"])
        assert group["minReplicas"] <= replicas <= group["maxReplicas"], group["groupName"]


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_cluster_has_token_auth_and_a_private_dashboard(path, doc):
    """Ray's token authentication with the token from a Secret shipped (as an example) here;
    the head's Service only inside the Kubernetes cluster."""
    spec = _cluster_spec(doc)
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token", "authOptions.mode: token"
    secret = _secrets().get(auth.get("secretName"))
    assert secret, f"authOptions.secretName {auth.get('secretName')!r}: no such Secret in cluster/kuberay"
    assert "auth_token" in {**secret.get("stringData", {}), **secret.get("data", {})}, \
        "KubeRay reads the token from the Secret's key auth_token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "no NodePort or LoadBalancer"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress"), "no Ingress to the dashboard"


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_gpu_workers_have_gpu_limits(path, doc):
    spec = _cluster_spec(doc)
    head = _containers(spec["headGroupSpec"])[0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {}), "a CPU head"
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        ray = _containers(group)[0]  # KubeRay runs Ray in the first container
        limits = ray.get("resources", {}).get("limits", {})
        requests = ray.get("resources", {}).get("requests", {})
        assert "cpu" in limits and "memory" in limits, f"{group['groupName']}: cpu/memory limits"
        if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
            gpu_groups += 1
            assert _quantity(limits["nvidia.com/gpu"]) >= 1
            # Kubernetes requires request == limit for extended resources such as GPUs.
            gpus = limits["nvidia.com/gpu"]
            assert str(requests.get("nvidia.com/gpu", gpus)) == str(gpus), "GPU request != limit"
    assert gpu_groups, "a GPU worker group (nvidia.com/gpu limits)"


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_credentials_come_from_a_secret(path, doc):
    spec = _cluster_spec(doc)
    secrets = _secrets()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"]: e for e in _containers(group)[0].get("env", [])}
        # Every Ray node reads or writes S3 itself, so every Ray container needs the keys.
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys()
        for name in CREDENTIAL_VARS & env.keys():
            assert "value" not in env[name], f"{name}: a literal value; use valueFrom.secretKeyRef"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets, f"{name}: no Secret {ref['name']} in cluster/kuberay"
            secret = secrets[ref["name"]]
            keys = {**secret.get("stringData", {}), **secret.get("data", {})}
            assert ref["key"] in keys, f"{name}: Secret {ref['name']} has no key {ref['key']}"


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_jobs_run_from_the_image_project_dir(path, doc):
    """Relative job-spec paths resolve on the head: Ray (and so a job's entrypoint) starts in
    the head container's working directory, which must be where the image put jobs/."""
    head = _containers(_cluster_spec(doc)["headGroupSpec"])[0]
    workdir = head.get("workingDir")
    assert workdir, "set the head container's workingDir to the project dir of the image"
    assert workdir in {_dockerfile_workdir(p) for p in DOCKERFILES}
    images = {c["image"] for _, d in KUBERAY for g in _groups(d) for c in _containers(g)}
    assert len(images) == 1, f"one project image everywhere, not {images}"


def test_kuberay_images_are_never_a_reused_tag():
    """A rebuilt image under an old tag is not pulled by nodes holding the old one
    (``imagePullPolicy: IfNotPresent``): the image is pinned by digest, or its tag is the
    project version plus a build id; cluster/README.md says how to set it."""
    version = re.escape(_pyproject()["project"]["version"])
    for path, doc in KUBERAY:
        for group in _groups(doc):
            for container in _containers(group):
                image = container["image"]
                assert re.fullmatch(rf"[^@\s]+@sha256:[0-9a-f]{{64}}|[^:@\s]+(:[^:@\s]+)?:{version}-[\w.-]+",
                                    image), f"{_rel(path)}: {image}: VERSION-BUILD tag or @sha256 digest"
    assert "docker inspect --format '{{index .RepoDigests 0}}'" in (CLUSTER / "README.md").read_text()


def _groups(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path, doc", KUBERAY, ids=KUBERAY_IDS)
def test_kuberay_cluster_holds_the_training_jobs_it_names(path, doc):
    spec = _cluster_spec(doc)
    nodes = []
    for group in spec["workerGroupSpecs"]:
        limits = _containers(group)[0]["resources"]["limits"]
        autoscaled = spec.get("enableInTreeAutoscaling")
        count = group["maxReplicas"] if autoscaled else group.get("replicas", 0)
        nodes.append((_quantity(limits["cpu"]), _quantity(limits.get("nvidia.com/gpu", 0)), count))
    jobs = _train_specs_in(path)
    assert jobs, f"{_rel(path)} names no `qformer train` job"
    for job in jobs:
        assert _fits(job, nodes), f"{_rel(path)}: {nodes} cannot hold {job.scaling}"


def test_rayjob_shuts_down_and_keeps_its_entrypoint_whole():
    from ray.runtime_env import RuntimeEnv

    jobs = [doc for _, doc in KUBERAY if doc["kind"] == "RayJob"]
    assert jobs
    for doc in jobs:
        spec = doc["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
        assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "SidecarMode"}
        # K8sJobMode pastes the entrypoint into a shell line after `ray job submit ... --`:
        # `a && b` would run b in the submitter pod, not in the Ray job.
        assert not SHELL_OPERATORS.search(spec["entrypoint"]), spec["entrypoint"]
        assert COMMAND.fullmatch(spec["entrypoint"].strip()), spec["entrypoint"]
        if "runtimeEnvYAML" in spec:
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
            RuntimeEnv(**runtime_env)  # Ray's own validation of the runtime-env fields
            assert not CREDENTIAL_VARS & set(runtime_env.get("env_vars", {})), \
                "credentials in the runtime env (shown in the dashboard and the submitter's command)"


def test_the_secret_is_an_example_with_placeholders():
    secrets = [(path, doc) for path in KUBERNETES for doc in _documents(path)
               if doc["kind"] == "Secret"]
    assert secrets
    for path, doc in secrets:
        assert ".example." in path.name, f"{_rel(path)}: a Secret here must be a marked example"
        assert "EXAMPLE" in path.read_text().splitlines()[0], "say so on the first line"
        values = {**doc.get("stringData", {}), **doc.get("data", {})}
        assert values
        for key, value in values.items():
            assert PLACEHOLDER.match(str(value)), f"{key}: {value!r} is not a placeholder"


# ---------------------------------------------------------------- Dockerfile


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def _dockerfile_workdir(path: Path) -> str:
    return [args for op, args in _dockerfile(path) if op == "WORKDIR"][-1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_dockerfile_installs_torch_then_the_project_on_the_pinned_ray(path):
    steps = _dockerfile(path)
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py3\d+-(gpu|cu\d+)", base[0])
    assert match and match.group(1) == _pinned_ray(), f"FROM {base[0]}: Ray {_pinned_ray()} GPU image"
    runs = [(i, args) for i, (op, args) in enumerate(steps) if op == "RUN"]
    torch = [i for i, args in runs if f"torch=={_pinned_torch()}" in args and "pip install" in args]
    project = [i for i, args in runs if re.search(r"pip install\b.*(-e\s+\.|\s\.)(\s|$)", args)]
    assert torch and project and torch[0] < project[0], "torch (pinned) before the project"
    copied = " ".join(args for op, args in steps if op == "COPY")
    for needed in ("pyproject.toml", "pipeline", "jobs"):
        assert needed in copied, f"the image needs {needed}"


# ---------------------------------------------------------------- local multi-node script


@pytest.mark.parametrize("path", SCRIPTS, ids=_ids(SCRIPTS))
def test_script_is_valid_bash_and_executable(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert path.stat().st_mode & stat.S_IXUSR, f"chmod +x {_rel(path)}"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


def test_local_multinode_script_usage():
    script = CLUSTER / "local-multinode.sh"
    result = subprocess.run([str(script)], capture_output=True, text=True)
    assert result.returncode == 2
    for subcommand in ("start", "stop", "status"):
        assert f"local-multinode.sh {subcommand}" in result.stdout
    assert "local-multinode.sh" in (CLUSTER / "README.md").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_local_multinode_script_starts_and_stops_its_own_nodes(tmp_path):
    """From an empty HOME, with token authentication (the script's default): it creates the
    token, starts a head and one worker with 1 CPU each (two alive nodes, 2 CPUs) that refuse
    requests without the token and serve `qformer jobs` with it; `stop` ends them."""
    import requests

    script = CLUSTER / "local-multinode.sh"
    state = Path(tempfile.mkdtemp(prefix="qfr", dir="/tmp"))  # short: Ray's socket paths
    home = tmp_path / "home"  # a fresh machine's: no ~/.ray/auth_token (the real one untouched)
    home.mkdir()
    port, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_PORT=str(port), DASHBOARD_PORT=str(dashboard), STATE_DIR=str(state),
               HOME=str(home), PYTHON=sys.executable)
    pids: list[int] = []
    try:
        started = subprocess.run([str(script), "start", "1", "1"], env=env, capture_output=True,
                                 text=True, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "created a Ray token in ~/.ray/auth_token" in started.stdout
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert f"address:   127.0.0.1:{port}" in started.stdout
        pids = [int(line.split()[0]) for line in (state / "pids").read_text().splitlines()]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        probe = ("import json, ray; ray.init(logging_level='ERROR'); "
                 "print(json.dumps([n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']]))")
        nodes = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                               env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"})
        assert json.loads(nodes.stdout.strip().splitlines()[-1]) == [1.0, 1.0], nodes.stderr
        version = f"http://127.0.0.1:{dashboard}/api/version"
        assert requests.get(version, timeout=10).status_code == 401
        assert requests.get(version, headers={"Authorization": f"Bearer {token}"}, timeout=10).ok
        jobs = subprocess.run([sys.executable, "-m", "pipeline", "jobs", "list", "--address",
                               f"http://127.0.0.1:{dashboard}"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert jobs.returncode == 0 and jobs.stdout.startswith("SUBMISSION ID"), jobs.stderr
        again = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True)
        assert again.returncode == 1 and "stop it first" in again.stderr
    finally:
        stopped = subprocess.run([str(script), "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in pids)
    assert not (state / "pids").exists()
    shutil.rmtree(state, ignore_errors=True)
