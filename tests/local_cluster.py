"""A real multi-node Ray cluster on this machine, for the cluster and fault tests.

Each node is started the way a user starts one on its own machine: ``ray start
--head`` and ``ray start --address HEAD``. Every node gets its own temp folder
(on separate machines nothing is shared; two nodes sharing one would unpack a
job's working_dir into the same folder and delete it under each other). Nodes
are stopped by killing exactly their own processes, never with ``ray stop``,
which would kill every Ray on the machine.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]      # the `ray` command of this interpreter
# Tiny budgets for sweeps on real digits data: a step takes seconds.
TINY_SWEEP = ["--train-epochs", "2", "--evaluations-per-step", "4", "--finetune-epochs", "1",
              "--max-batches-per-epoch", "3", "--num-workers", "1", "--step-fraction", "0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A node's processes, found by markers on their command lines: its temp folder
    (a node started with ``ray start``) or ``--node_id=ID`` (a node the fake
    autoscaler started, which shares the head's temp folder)."""

    def __init__(self, name: str, temp_dir: str | None, markers: tuple[str, ...] = ()):
        self.name, self.temp_dir = name, temp_dir
        self.markers = ((temp_dir,) if temp_dir else ()) + tuple(markers)

    def processes(self) -> list[psutil.Process]:
        """Every process of this node: those started with its temp folder (or, for
        the head's Ray Client server, its port) on their command line (raylet, GCS,
        dashboard, monitors) and all their children (workers, agents)."""
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(m in part for part in (p.info["cmdline"] or []) for m in self.markers):
                    roots.append(p)
            except psutil.Error:
                continue
        found = {}
        for p in roots:
            found[p.pid] = p
            try:
                for c in p.children(recursive=True):
                    found[c.pid] = c
            except psutil.Error:
                continue
        return list(found.values())

    def raylet_arg(self, key: str) -> str | None:
        for p in self.processes():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].endswith("raylet"):
                for part in cmd:
                    if part.startswith(f"--{key}="):
                        return part.split("=", 1)[1]
        return None

    @functools.cached_property
    def node_id(self) -> str:
        node_id = self.raylet_arg("node_id")
        assert node_id, f"no raylet found for node {self.name}"
        return node_id

    def kill(self) -> int:
        """SIGKILL every process of the node at once (as when its machine dies)."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)


class LocalCluster:
    """``with LocalCluster(cpus_per_node=2) as c: c.add_worker()``: a head node (with
    the dashboard and job server on 127.0.0.1) and worker nodes on this machine."""

    def __init__(self, *, cpus_per_node: int = 2):
        self.cpus = cpus_per_node
        self.home = tempfile.mkdtemp(prefix="rlpr-home-")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[Node] = []
        import site
        # a private HOME: no stray ~/.ray/auth_token or ~/ray_results of the user's
        # own Ray; the same user site-packages as this interpreter
        self.env = {**os.environ, "HOME": self.home, "PYTHONUSERBASE": site.getuserbase(),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    # notice a dead node in seconds, not the default half minute
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}
        for key in [k for k in self.env if k == "RAY_ADDRESS" or k.startswith("RAY_AUTH")]:
            self.env.pop(key)       # set by an earlier private Ray of this process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "LocalCluster":
        client_port = free_port()
        try:
            self._start("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                 "--ray-client-server-port", str(client_port), "--disable-usage-stats"],
                        markers=(f"--port={client_port}",))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_worker(self) -> Node:
        return self._start(f"worker{len(self.nodes)}", ["--address", self.address])

    def _start(self, name: str, args: list[str], markers: tuple[str, ...] = ()) -> Node:
        node = Node(name, tempfile.mkdtemp(prefix="rlpr-"), markers)   # short: Ray's socket paths are limited
        self.nodes.append(node)
        r = subprocess.run([*RAY_CLI, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus",
                            str(self.cpus), "--num-gpus", "0", "--temp-dir", node.temp_dir,
                            "--object-store-memory", str(256 * 2**20),      # small models; spare /dev/shm
                            "--dashboard-agent-listen-port", str(free_port())],
                           env=self.env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"ray start ({name}) failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        self.wait_for_nodes(len([n for n in self.nodes if n.processes()]))
        assert node.node_id in self.alive_node_ids()
        return node

    def alive_node_ids(self) -> set[str]:
        """The nodes the head counts as alive (the dashboard's state API)."""
        import json
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100", timeout=10) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return set()
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while len(self.alive_node_ids()) != count:
            assert time.time() < deadline, f"the cluster did not reach {count} alive nodes"
            time.sleep(0.5)

    def ray(self, *args: str, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this cluster."""
        return subprocess.run([*RAY_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)

    def stop(self) -> None:
        for node in reversed(self.nodes):       # workers first, the head (GCS) last
            node.kill()
        for node in self.nodes:
            if node.temp_dir:
                shutil.rmtree(node.temp_dir, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def get(self, path: str):
        """A JSON answer of the head's dashboard (None while it cannot answer)."""
        import json
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.dashboard}{path}", timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None


FAKE_HEAD_TYPE = "ray.head.default"      # the head's type name in Ray's fake_multinode provider
_COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def fake_autoscaling_config(cluster_file, *, cpus_per_node: int = 2, max_workers: int = 2,
                            idle_timeout_minutes: float = 0.1) -> dict:
    """The worker node types of a cluster file from clusters/ (GPUs as declared, CPUs
    and node counts scaled down to this machine), with the provider swapped for
    Ray's ``fake_multinode``: its real autoscaler starts each node as local Ray
    processes. The head has no CPU, so every trial needs an autoscaled node.
    The whole config is written out (the provider's defaults file is not in
    Ray's wheel)."""
    import yaml
    with open(cluster_file) as f:
        src = yaml.safe_load(f)
    types = {FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in src["available_node_types"].items():
        if name == src["head_node_type"]:
            continue
        resources = {**t["resources"], "CPU": min(t["resources"].get("CPU", cpus_per_node), cpus_per_node),
                     "object_store_memory": 256 * 2**20}          # small models; spare /dev/shm
        types[name] = {"resources": resources, "node_config": {}, "min_workers": t.get("min_workers", 0),
                       "max_workers": min(t["max_workers"], max_workers)}
    return {"cluster_name": f"fake-{src['cluster_name']}", "max_workers": max_workers,
            "upscaling_speed": src.get("upscaling_speed", 1.0), "idle_timeout_minutes": idle_timeout_minutes,
            # nodes share 127.0.0.1: the autoscaler tells them apart by node id; a
            # node that stops reporting is terminated (and replaced) instead of repaired
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "launch_multiple": True},
            "auth": {"ssh_user": "ray"}, "available_node_types": types, "head_node_type": FAKE_HEAD_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], **{k: [] for k in _COMMAND_KEYS}}


class AutoscalingCluster(LocalCluster):
    """A head node running Ray's real autoscaler with the fake multi-node provider:
    worker nodes come and go as the autoscaler decides, as local Ray processes
    with the resources their node type declares (GPUs included, none real).

    Everything listens on and talks to 127.0.0.1: the provider resolves node
    addresses with Ray's own rule, which keeps the loopback address only with
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (every process of the cluster, and
    every driver, inherits it from ``env``). The autoscaler reads its config
    from ``~/ray_bootstrap_config.yaml`` of the cluster's home, as on a cluster
    ``ray up`` started."""

    def __init__(self, config: dict):
        super().__init__(cpus_per_node=0)
        self.env.update({"RAY_FAKE_CLUSTER": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                         "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"})   # replace a lost node in seconds
        self.config = {**config, "provider": {**config["provider"], "gcs_address": self.address}}
        self.config_path = os.path.join(self.home, "ray_bootstrap_config.yaml")

    def __enter__(self) -> "AutoscalingCluster":
        import yaml
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config, f)
        client_port = free_port()
        try:
            self._start("head", ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                 "--ray-client-server-port", str(client_port), "--disable-usage-stats",
                                 f"--autoscaling-config={self.config_path}"],
                        markers=(f"--port={client_port}",))
            self._wait_for_autoscaler()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_autoscaler(self, timeout: float = 120.0) -> None:
        """Until the autoscaler has published its first status (what drivers read)."""
        deadline = time.time() + timeout
        while "autoscalerReport" not in (((self.get("/api/cluster_status") or {}).get("data") or {})
                                         .get("clusterStatus") or {}):
            assert time.time() < deadline, "the autoscaler published no status"
            time.sleep(1.0)

    @property
    def head_id(self) -> str:
        return self.nodes[0].node_id

    def worker_ids(self) -> set[str]:
        """The alive nodes the autoscaler started."""
        return self.alive_node_ids() - {self.head_id}

    def kill_worker(self, node_id: str) -> int:
        """SIGKILL one autoscaled node: its raylet and everything the raylet started."""
        return Node(f"node-{node_id[-5:]}", None, markers=(f"--node_id={node_id}",)).kill()

