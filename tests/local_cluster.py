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
    def __init__(self, name: str, temp_dir: str, markers: tuple[str, ...] = ()):
        self.name, self.temp_dir = name, temp_dir
        self.markers = (temp_dir, *markers)

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
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

