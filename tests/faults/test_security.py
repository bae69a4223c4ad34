"""Loading never runs someone else's code, and a local Ray stays on loopback.

* Static: every ``torch.load`` in the project passes ``weights_only=True``,
  ``torch.save`` appears only in checkpoint.py (plain-data records), and no
  pickle / unsafe yaml / ``np.load(allow_pickle=True)`` is used.
* A private local Ray started by ``runtime.init_ray`` has node address
  127.0.0.1, every socket its processes listen on is a loopback one, and the
  dashboard web UI is not served.
(Model files naming a user factory: tests/faults/test_checkpoints.py.)
"""
from __future__ import annotations

import ast
import ipaddress
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("rlpruner_ray", "envs", "scripts")


def _sources():
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")    # ?.eval: a method of an expression
    return ".".join(reversed(parts))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, _dotted(node.func)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_sources_are_scanned():
    files = [rel for rel, _ in _sources()]
    assert "rlpruner_ray/checkpoint.py" in files and "envs/layer_pruning.py" in files
    assert any(f.startswith("scripts/") for f in files)


def test_every_torch_load_is_weights_only():
    loads, bad = [], []
    for rel, tree in _sources():
        for call, name in _calls(tree):
            if name in ("torch.load", "load") and (name == "torch.load" or _imports_torch_load(tree)):
                loads.append(f"{rel}:{call.lineno}")
                if _kw(call, "weights_only") is not True:
                    bad.append(f"{rel}:{call.lineno}")
    assert loads, "expected at least the loader in checkpoint.py"
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def _imports_torch_load(tree) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "torch" and any(a.name == "load" for a in n.names)
               for n in ast.walk(tree))


def test_torch_save_only_in_checkpoint_and_no_unsafe_deserialisers():
    saves, unsafe = [], []
    for rel, tree in _sources():
        for call, name in _calls(tree):
            if name.endswith("torch.save") or name == "torch.save":
                saves.append(rel)
            if name in ("pickle.load", "pickle.loads", "pickle.dump", "pickle.dumps", "cloudpickle.load",
                        "cloudpickle.loads", "cloudpickle.dump", "marshal.loads", "dill.load", "dill.loads",
                        "torch.jit.load", "eval", "exec"):
                unsafe.append(f"{rel}:{call.lineno} {name}")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                loader = next((_dotted(k.value) for k in call.keywords if k.arg == "Loader"), "")
                if name != "yaml.load" or not loader.endswith("SafeLoader"):
                    unsafe.append(f"{rel}:{call.lineno} {name}")
            if name in ("np.load", "numpy.load") and _kw(call, "allow_pickle") is not False:
                unsafe.append(f"{rel}:{call.lineno} {name} without allow_pickle=False")
    assert set(saves) == {"rlpruner_ray/checkpoint.py"}, saves
    assert unsafe == []


def test_checkpoint_saves_only_plain_data():
    """What checkpoint.py hands to torch.save is a dict of plain data and tensors:
    saving a record of a real model and reloading it with weights_only works."""
    import io

    import torch
    from rlpruner_ray import checkpoint as ckpt
    from rlpruner_ray.models import build_model, model_spec
    model = ckpt.tag_model(build_model("resnet8", 10, 1), model_spec("resnet8", 10, 1), (1, 16, 16))
    record = torch.load(io.BytesIO(ckpt.model_to_bytes(model)), weights_only=True)
    assert isinstance(record, dict) and not any(isinstance(v, torch.nn.Module) for v in record.values())
    with pytest.raises(ckpt.CheckpointError):     # a module itself never gets saved
        ckpt.model_record(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------- network
def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_without_dashboard(ray_session):
    ray = ray_session
    import os

    import psutil

    # actors too: the model store and an evaluation-style actor open their own servers
    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    probes = [Probe.remote() for _ in range(2)]
    pids = ray.get([p.pid.remote() for p in probes])

    nodes = ray.nodes()
    assert [n["NodeManagerAddress"] for n in nodes if n["Alive"]] == ["127.0.0.1"]
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    ours = {os.getpid(), *pids} | {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "found no listening socket of Ray's processes (cannot check)"
    exposed = [(pid, _name(pid), ip, port) for pid, ip, port in listening if not _loopback(ip)]
    assert exposed == [], f"Ray processes listening beyond loopback: {exposed}"

    # no dashboard web UI: nothing on its port, and Ray's head process runs without frontend
    assert 8265 not in {port for _, _, port in listening}
    node = ray._private.worker._global_node
    assert not node.address_info.get("webui_url")
    for p in psutil.Process().children(recursive=True):
        cmd = " ".join(_cmdline(p))
        if "dashboard/dashboard.py" in cmd:      # headless (Ray runs it for usage stats): no web UI, no jobs
            assert "--disable-frontend" in cmd, cmd
            assert "--minimal" in cmd or "--modules-to-load=UsageStatsHead " in cmd, cmd
    for p in probes:
        ray.kill(p)


def _name(pid):
    import psutil
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def _cmdline(p):
    import psutil
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.slow
def test_local_ray_uses_token_auth_and_writes_nothing_in_home(tmp_path):
    """Ray 2.60 would write ~/.ray/auth_token for a new local cluster; ours keeps
    token authentication with a token in the environment and writes no file."""
    import json
    import site
    import subprocess
    import sys
    home = tmp_path / "home"
    home.mkdir()
    code = ("import json, os, ray; from rlpruner_ray.runtime import init_ray; "
            f"init_ray(None, {str(tmp_path / 'run')!r}, num_cpus=1); "
            "print(json.dumps([os.environ.get('RAY_AUTH_MODE'), len(os.environ.get('RAY_AUTH_TOKEN', '')), "
            "ray.get(ray.put(7))])); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env={**env, "HOME": str(home), "PYTHONUSERBASE": site.getuserbase()})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["token", 64, 7]
    assert not any(home.rglob("*")), sorted(map(str, home.rglob("*")))
