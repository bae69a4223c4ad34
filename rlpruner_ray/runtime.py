"""The one place Ray is started, and resource checks against what the cluster offers."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import tempfile
from pathlib import Path

from .errors import ResourceError

log = logging.getLogger("rlpruner_ray")
NAMESPACE = "rlpruner"
# Ray's socket paths must fit in 107 bytes; its session folder adds ~70.
_MAX_TEMP_DIR = 36


def ray_temp_dir(out_dir) -> str:
    """Ray's temp folder for a run: inside the run's folder when the path is short
    enough for Ray's sockets, else a short folder named after the run's path."""
    inside = Path(out_dir).resolve() / "ray"
    if len(str(inside)) <= _MAX_TEMP_DIR:
        return str(inside)
    digest = hashlib.sha1(str(inside).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"rlpr-{digest}")


def init_ray(address: str | None, out_dir, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Connect to ``address`` ("auto": the running cluster) or start a private local
    Ray bound to 127.0.0.1, without the dashboard, with token authentication.
    Idempotent."""
    import ray
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        return
    temp = ray_temp_dir(out_dir)
    Path(temp).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _session_token()
    with _loopback_only():
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp, namespace=NAMESPACE, runtime_env=env, log_to_driver=True,
                 configure_logging=True, logging_level=logging.WARNING)
    log.info("started a local Ray (temp folder %s)", temp)


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


def check_resources(need: dict[str, float], what: str, offered: dict | None = None) -> None:
    """Fail fast (one line) when the cluster cannot ever place ``need``."""
    if offered is None:
        import ray
        offered = ray.cluster_resources()
    have = offered
    for key, amount in need.items():
        if amount > 0 and have.get(key, 0.0) + 1e-9 < amount:
            raise ResourceError(f"{what} needs {amount:g} {key} but the Ray cluster has "
                                f"{have.get(key, 0.0):g}; lower the request or add nodes")


def shutdown_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()
