"""The cluster files in clusters/ and the cluster entry scripts in scripts/.

Offline: the Ray autoscaler configs go through the same preparation and schema
validation that ``ray up`` applies before it talks to a cloud (with the network
switched off to prove it stays local), the KubeRay RayJob through the fields
KubeRay needs, and the scripts through their argv building. Then a real
two-node cluster on this machine (``ray start --head`` + ``ray start --address``)
runs a sweep submitted with ``ray job submit``.
"""
from __future__ import annotations

import copy
import ipaddress
import py_compile
import re
import socket
import sys
from pathlib import Path

import pytest
import yaml

from rlpruner_ray.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
SCRIPTS = ROOT / "scripts"
RAYJOB = CLUSTERS / "kuberay-rayjob.yaml"
AUTOSCALER_FILES = sorted(p for p in CLUSTERS.glob("*.yaml") if p != RAYJOB)
CLOUD_FILES = [p for p in AUTOSCALER_FILES if p.name in ("aws-gpu.yaml", "gcp-gpu.yaml")]

INSTALL = re.compile(r"pip install\s.*-c ~/rlpruner-ray/constraints\.txt\s.*-e ~/rlpruner-ray(\s|$)")
DASHBOARD_LOOPBACK = re.compile(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)")
# EC2 instance families with NVIDIA GPUs.
AWS_GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en")
# RFC 5737 documentation networks: addresses that belong to nobody.
TEST_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


def _load(path: Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_cluster_files_exist():
    names = {p.name for p in CLUSTERS.glob("*.yaml")}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml", "kuberay-rayjob.yaml"} <= names


# ---------------------------------------------------------------- autoscaler configs

@pytest.mark.parametrize("path", AUTOSCALER_FILES, ids=lambda p: p.name)
def test_autoscaler_config_passes_ray_validation(path, no_network):
    """What `ray up` does before contacting the provider: merge the provider's
    defaults, then validate against ray-schema.json and Ray's own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(path)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # Our values survive the merge (defaults only fill what the file leaves out).
    for key in ("cluster_name", "file_mounts", "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == raw[key], key
    assert prepared["provider"]["type"] == raw["provider"]["type"]


@pytest.mark.parametrize("path", AUTOSCALER_FILES, ids=lambda p: p.name)
def test_autoscaler_config_common_parts(path):
    cfg = _load(path)
    assert "docker" not in cfg, "plain hosts/AMIs: no docker section"
    assert cfg.get("idle_timeout_minutes", 0) > 0
    assert cfg["file_mounts"] == {"~/rlpruner-ray": "."}
    assert any(INSTALL.search(c) for c in cfg["setup_commands"]), \
        "setup_commands must install the project with its constraints file"

    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head
    assert DASHBOARD_LOOPBACK.search(head), "the head's dashboard must listen on 127.0.0.1"
    assert "0.0.0.0" not in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers


@pytest.mark.parametrize("path", CLOUD_FILES, ids=lambda p: p.name)
def test_cloud_config_scales_gpu_workers_from_zero(path):
    cfg = _load(path)
    provider = cfg["provider"]["type"]
    assert cfg["max_workers"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"

    gpu_types = {name: t for name, t in types.items() if name != cfg["head_node_type"] and _has_gpu(provider, t)}
    assert gpu_types, "no GPU worker node type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, name
        assert 0 < t["max_workers"] <= cfg["max_workers"], name
        assert t["resources"].get("GPU", 0) >= 1, f"{name}: state the GPU in resources for the autoscaler"


def _has_gpu(provider: str, node_type: dict) -> bool:
    node = node_type["node_config"]
    if provider == "aws":
        family = node["InstanceType"].split(".")[0]
        return family in AWS_GPU_FAMILIES or node_type["resources"].get("GPU", 0) > 0
    if provider == "gcp":
        accel = node.get("guestAccelerators") or []
        if not accel:
            return False
        assert all(a["acceleratorCount"] >= 1 and a["acceleratorType"].startswith("nvidia-") for a in accel)
        # GCE refuses to live-migrate GPU VMs: they must be allowed to stop.
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"
        return True
    raise AssertionError(f"unexpected provider {provider}")


def test_aws_head_is_not_a_gpu_instance():
    cfg = _load(CLUSTERS / "aws-gpu.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["InstanceType"]
    assert head.split(".")[0] not in AWS_GPU_FAMILIES
    assert cfg["provider"]["region"]


def test_gcp_has_project_and_zone():
    provider = _load(CLUSTERS / "gcp-gpu.yaml")["provider"]
    assert provider["project_id"] and provider["region"]
    assert provider["availability_zone"].startswith(provider["region"] + "-")


def test_local_hosts_are_documentation_addresses():
    """The template must never point at someone's real machines."""
    provider = _load(CLUSTERS / "local.yaml")["provider"]
    assert provider["type"] == "local"
    hosts = [provider["head_ip"], *provider["worker_ips"]]
    assert len(hosts) == len(set(hosts)) >= 2
    for host in hosts:
        assert any(ipaddress.ip_address(host) in net for net in TEST_NETS), host


def test_constraints_file_is_usable_by_setup_commands():
    """setup_commands run `pip install -c constraints.txt`; pip refuses a constraints
    file with extras ("Constraints cannot have extras"), and Ray must be pinned."""
    from packaging.requirements import Requirement

    reqs = [Requirement(line.split("#")[0].strip())
            for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.split("#")[0].strip()]
    with_extras = [str(r) for r in reqs if r.extras]
    assert not with_extras, f"constraints.txt lines with extras break `pip install -c`: {with_extras}"
    ray_pins = [r for r in reqs if r.name == "ray"]
    assert len(ray_pins) == 1 and str(ray_pins[0].specifier).startswith("==")


# ---------------------------------------------------------------- KubeRay RayJob

# The fields a RayJob needs for KubeRay (ray.io/v1) to create the cluster and
# submit the job; no CRD schema is available offline, so they are checked here.
KUBERAY_REQUIRED = (
    "apiVersion", "kind", "metadata.name", "spec.entrypoint",
    "spec.rayClusterSpec.headGroupSpec.rayStartParams",
    "spec.rayClusterSpec.headGroupSpec.template.spec.containers",
    "spec.rayClusterSpec.workerGroupSpecs",
)
WORKER_GROUP_REQUIRED = ("groupName", "rayStartParams", "replicas", "minReplicas", "maxReplicas",
                         "template.spec.containers")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        assert isinstance(obj, dict) and part in obj, f"missing {dotted!r} (at {part!r})"
        obj = obj[part]
    return obj


@pytest.fixture(scope="module")
def rayjob() -> dict:
    with open(RAYJOB) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(docs) == 1
    return docs[0]


def test_rayjob_required_fields(rayjob):
    for field in KUBERAY_REQUIRED:
        _get(rayjob, field)
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    name = rayjob["metadata"]["name"]
    # A DNS-1123 label, short enough for the names KubeRay derives from it.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40


def test_rayjob_runs_the_sweep_and_cleans_up(rayjob):
    spec = rayjob["spec"]
    assert "scripts/sweep.py" in spec["entrypoint"]
    assert "--sparsity" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and env.get("working_dir"), "runtimeEnvYAML needs the code (working_dir)"


def test_rayjob_cluster_spec(rayjob):
    import ray

    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, "rayVersion must match the Ray this project pins"
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["dashboard-host"] == "0.0.0.0"
    assert params["num-cpus"] == "0", "no trials on the head"
    head_pod = head["template"]["spec"]
    image = head_pod["containers"][0]["image"]
    assert image and ray.__version__ in image

    groups = cluster["workerGroupSpecs"]
    assert len(groups) >= 1
    gpu_groups = []
    for group in groups:
        for field in WORKER_GROUP_REQUIRED:
            _get(group, field)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > 0
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and ray.__version__ in container["image"]
        limits = container.get("resources", {}).get("limits", {})
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group asks for nvidia.com/gpu in resources.limits"

    # KubeRay's rayStartParams is a map of strings: numbers must be quoted.
    for p in [params, *(g["rayStartParams"] for g in groups)]:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in p.items()), p


def test_rayjob_volume_mounts_are_defined(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"],
            *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert container.get("name")
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, mount


# ---------------------------------------------------------------- scripts

SCRIPT_COMMANDS = {"sweep.py": "sweep", "compress.py": "compress"}


def _builder(name: str):
    from rlpruner_ray.cli import cluster_argv
    return lambda args: cluster_argv(SCRIPT_COMMANDS[name], args)


@pytest.mark.parametrize("name", sorted(SCRIPT_COMMANDS))
def test_script_compiles_and_calls_the_cli(name, tmp_path):
    path = SCRIPTS / name
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    text = path.read_text()
    assert "from rlpruner_ray.cli import cluster_main" in text
    assert f'raise SystemExit(cluster_main("{SCRIPT_COMMANDS[name]}", sys.argv[1:]))' in text
    assert 'if __name__ == "__main__":' in text


@pytest.mark.parametrize("name", sorted(SCRIPT_COMMANDS))
def test_build_argv(name):
    build = _builder(name)
    cmd = SCRIPT_COMMANDS[name]
    assert build([]) == [cmd, "--ray-address", "auto"]
    assert build(["--sparsity", "0.2", "0.4"]) == [cmd, "--ray-address", "auto", "--sparsity", "0.2", "0.4"]
    # The user's own address wins and is not doubled.
    assert build(["--ray-address", "10.0.0.5:6379", "--x"]) == [cmd, "--ray-address", "10.0.0.5:6379", "--x"]
    assert build(["--ray-address=ray://h:10001"]) == [cmd, "--ray-address=ray://h:10001"]
    # `rlpruner -q` is an option of the top-level command: it goes before the subcommand.
    assert build(["-q", "--out-dir", "d"]) == ["-q", cmd, "--ray-address", "auto", "--out-dir", "d"]


@pytest.mark.parametrize("name", sorted(SCRIPT_COMMANDS))
def test_built_argv_parses_with_the_cli(name):
    parser = build_parser()
    cmd = SCRIPT_COMMANDS[name]
    choices = next(a for a in parser._subparsers._group_actions).choices
    assert cmd in choices, f"the cluster script runs `rlpruner {cmd}`, which the CLI does not have"
    build = _builder(name)
    args = parser.parse_args(build(["-q"]))
    assert args.command == cmd and args.quiet
    assert args.ray_address == "auto"
    assert parser.parse_args(build(["--ray-address", "10.0.0.5:6379"])).ray_address == "10.0.0.5:6379"


# ---------------------------------------------------------------- a real two-node cluster

@pytest.mark.slow
def test_sweep_submitted_as_a_ray_job_runs_on_both_nodes(tmp_path):
    """Head and worker node as separate `ray start` processes; the sweep goes in
    with `ray job submit --working-dir .` (the driver imports the uploaded copy);
    its two trials fill one node each; both nodes are stopped at the end."""
    import pyarrow.parquet as pq
    from .local_cluster import TINY_SWEEP, LocalCluster

    out = tmp_path / "sw"
    with LocalCluster(cpus_per_node=2) as cluster:          # one trial (driver + 1 worker) per node
        cluster.add_worker()
        nodes = {n.node_id: n.name for n in cluster.nodes}
        r = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", str(ROOT), "--",
                        sys.executable, "scripts/sweep.py", "-q", "--out-dir", str(out),
                        "--sparsity", "0.1", "0.2", *TINY_SWEEP, cwd=ROOT, timeout=900)
        log = r.stdout + r.stderr
        assert r.returncode == 0 and "succeeded" in log, log[-4000:]
        processes = [n.processes for n in cluster.nodes]
    assert not any(p() for p in processes), "a node's processes outlived the cluster"

    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((x["sparsity"], x["step"]) for x in rows) == [(0.1, 1), (0.2, 1), (0.2, 2)]
    assert sum(bool(x["final"]) for x in rows) == 2 and all(x["attempt"] == 1 for x in rows)
    assert {nodes[x["node_id"]] for x in rows} == {"head", "worker1"}     # both nodes ran a trial
    for x in rows:                                   # one trial never moves between nodes
        assert x["node_id"] == next(y["node_id"] for y in rows if y["trial"] == x["trial"])
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
