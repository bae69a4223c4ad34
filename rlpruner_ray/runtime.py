"""The one place Ray is started and stopped, and the device an actor computes on.
(What the cluster can hold is checked in :mod:`rlpruner_ray.cluster_offer`.)"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("rlpruner_ray")
NAMESPACE = "rlpruner"
# Ray's socket paths must fit in 107 bytes; its session folder adds ~70, and
# init_ray's "/r" below 2 more.
_MAX_TEMP_DIR = 34
# The private folder of the local Ray this process started (None: no such Ray).
_private_temp: str | None = None


def ray_temp_dir(out_dir) -> str:
    """The private folder of a run's local Ray: inside the run's folder when the
    path is short enough for Ray's sockets, else a short folder named after the
    run's path. Ray itself gets its subfolder ``r`` (see :func:`init_ray`)."""
    inside = Path(out_dir).resolve() / "ray"
    if len(str(inside)) <= _MAX_TEMP_DIR:
        return str(inside)
    digest = hashlib.sha1(str(inside).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"rlpr-{digest}")


def private_ray_running() -> bool:
    """Whether the Ray this process uses is the private local one init_ray started."""
    import ray
    return _private_temp is not None and ray.is_initialized()


def init_ray(address: str | None, out_dir, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Connect to ``address`` ("auto": the running cluster) or start a private local
    Ray bound to 127.0.0.1, without the dashboard, with token authentication.
    Idempotent."""
    import ray
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        # Ray's own connection lines only when rlpruner logs at INFO (not with -q)
        quiet = log.getEffectiveLevel() > logging.INFO
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True,
                 logging_level=logging.WARNING if quiet else logging.INFO)
        return
    global _private_temp
    temp = ray_temp_dir(out_dir)
    _make_private_folder(temp)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _session_token()
    with _loopback_only():
        # Ray makes its temp folder world-writable (0777, for machines shared by
        # several users); inside our 0700 folder nobody else can reach it
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=os.path.join(temp, "r"), namespace=NAMESPACE, runtime_env=env, log_to_driver=True,
                 configure_logging=True, logging_level=logging.WARNING)
    _private_temp = temp
    log.info("started a local Ray (temp folder %s)", temp)


def _make_private_folder(path: str) -> None:
    """``path`` as a folder only this user can enter (also when a run left it behind)."""
    Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _session_token() -> None:
    """Token authentication for a private local Ray, without a file in the home folder.

    Ray (checked with 2.60) turns a new local ``ray.init()`` cluster to token
    authentication and, when it finds no token, writes a new one to
    ``~/.ray/auth_token``: outside the run's folder, and then picked up by every
    later ``ray start`` of this user. A fresh random token in ``RAY_AUTH_TOKEN``
    keeps the protection (every Ray process of the run inherits it) and writes
    nothing. A mode or token the user chose is left alone."""
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@contextlib.contextmanager
def _loopback_only():
    """Keep a private local Ray on the loopback interface.

    On Linux, Ray (checked with 2.60) replaces ``_node_ip_address="127.0.0.1"`` by the
    machine's routable address (``services.resolve_ip_for_localhost``), and its
    gRPC servers (GCS, raylet, every worker) then listen on all interfaces
    (``::``). It keeps the loopback address only when ``ENABLE_RAY_CLUSTER`` is
    off (its macOS/Windows default, env ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read
    at import). Switch it off while the node starts: the node's address is then
    127.0.0.1, handed to every Ray process it starts, and all of them bind there."""
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - Ray moved its constants
        yield
        return
    had = hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if had:
            ray_constants.ENABLE_RAY_CLUSTER = before
        else:
            del ray_constants.ENABLE_RAY_CLUSTER


def local_offer() -> dict[str, float]:
    """What a private local Ray started by :func:`init_ray` will offer (known before
    starting it, so bad requests are refused before anything is written)."""
    import torch
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def actor_device(configured: str) -> str:
    """The device of an evaluation actor or env runner, decided where it runs: CUDA
    only when Ray assigned it a GPU and CUDA is there. An explicit ``cpu`` (the
    run's ``--device``) wins even on a node that declares GPUs, so placement by
    GPU resource can be tested on machines without one."""
    if configured == "cpu":
        return "cpu"
    import ray
    import torch
    if not ray.get_gpu_ids() or not torch.cuda.is_available():
        return "cpu"
    return "cuda"       # Ray limits CUDA_VISIBLE_DEVICES to the GPUs it assigned


def shutdown_ray() -> None:
    """Disconnect; a private local Ray is stopped and its temp folder removed."""
    global _private_temp
    import ray
    if ray.is_initialized():
        ray.shutdown()
    temp, _private_temp = _private_temp, None
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)
