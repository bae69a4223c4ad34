"""What the Ray cluster can hold: now, or once its autoscaler has added nodes.

A private local Ray and a fixed cluster hold what they hold: a request larger
than that is refused at once. A cluster with an autoscaler (``ray up`` with a
file from ``clusters/``) may hold no GPU at all until something asks for one;
there a request is refused only when no node the autoscaler may launch could
hold it, and otherwise the run asks the autoscaler for it and waits, up to
``--autoscale-timeout`` seconds.

Requests are lists of *bundles* (resource dicts), one per actor or placement
group bundle: each must fit on one node, the total on the cluster.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .errors import ResourceError

log = logging.getLogger("rlpruner_ray")

# The autoscaling config the autoscaler runs with: `ray up` writes it to the
# head's home folder; the environment variable points elsewhere (a driver that
# does not run on the head, a cluster started by hand).
AUTOSCALING_CONFIG_ENV = "RLPRUNER_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
WAIT_LOG_EVERY_S = 30.0
_POLL_S = 1.0
_EPS = 1e-9


# ---------------------------------------------------------------------- pure checks
def total(bundles: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for key, amount in b.items():
            out[key] = out.get(key, 0.0) + float(amount)
    return out


def asked(bundles: list[dict]) -> list[dict]:
    """The bundles that ask for anything (a CPU-only trial has a GPU entry of 0)."""
    return [b for b in bundles if any(v > 0 for v in b.values())]


def shortfall(need: dict, offered: dict) -> tuple[str, float, float] | None:
    """The first resource ``offered`` lacks: (name, needed, offered); None when it fits."""
    for key, amount in need.items():
        if amount > 0 and offered.get(key, 0.0) + _EPS < amount:
            return key, float(amount), float(offered.get(key, 0.0))
    return None


def fits_some_node_type(need_bundles: list[dict], node_types: dict[str, dict]) -> bool:
    """Whether nodes of ``node_types`` ({name: {"resources": {...}, "max_workers": n}},
    n nodes of that type at most) could ever hold ``need_bundles``: every bundle on
    one node of some type with n > 0, and the total within all of them together."""
    usable = [t for t in node_types.values() if int(t.get("max_workers", 0)) > 0]
    for bundle in need_bundles:
        if not any(shortfall(bundle, t.get("resources") or {}) is None for t in usable):
            return False
    capacity = total([{k: float(v) * int(t["max_workers"]) for k, v in (t.get("resources") or {}).items()}
                      for t in usable])
    return shortfall(total(need_bundles), capacity) is None


def node_types_from_config(config: dict) -> dict[str, dict]:
    """The node types of an autoscaling config (the YAML ``ray up`` takes): each
    type's resources and how many nodes of it may run (its ``max_workers`` capped
    by the cluster's; the head type counts its one head node on top)."""
    cluster_max = int(config.get("max_workers", 0) or 0)
    head = config.get("head_node_type")
    out = {}
    for name, t in (config.get("available_node_types") or {}).items():
        count = min(int(t.get("max_workers", cluster_max) or 0), cluster_max)
        out[name] = {"resources": dict(t.get("resources") or {}), "max_workers": count + (name == head)}
    return out


def describe(resources: dict) -> str:
    """"2 CPU, 0.5 GPU": the resources a user asks for (not memory or node labels)."""
    shown = {k: v for k, v in resources.items() if "memory" not in k and not k.startswith("node:")}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items() if v > 0) or "nothing"


def gpu_pool_layout(device: str, gpus: int) -> tuple[int, float] | None:
    """(actors, GPUs per actor) for evaluation on ``gpus`` local GPUs when the user
    asked for neither: one actor per GPU (processes sharing a GPU only take turns
    on it; an actor keeps its GPU busy by scoring K candidates per pass). None
    when the run stays on the CPU (no GPU, or ``--device cpu``)."""
    if gpus < 1 or device == "cpu":
        return None
    if device.startswith("cuda:"):     # one named GPU: the pool shares it with the run's own work
        return 1, 1.0
    return gpus, 1.0


# ---------------------------------------------------------------------- the cluster
def has_autoscaler() -> bool:
    """Whether the connected cluster runs an autoscaler with a config (not the bare
    monitor every ``ray start --head`` has)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized
    if not _internal_kv_initialized():
        return False
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        if status and "autoscaler_report" in json.loads(status):      # autoscaler v1 (ray up)
            return True
        from ray.autoscaler.v2.utils import is_autoscaler_v2            # v2 (KubeRay)
        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:       # noqa: BLE001  (Ray moved these internals: treat as fixed)
        return False


def autoscaler_node_types() -> dict[str, dict] | None:
    """The node types the cluster's autoscaler may launch; {} when it has an
    autoscaler whose config this process cannot read; None when it has none."""
    if not has_autoscaler():
        return None
    path = Path(os.path.expanduser(os.environ.get(AUTOSCALING_CONFIG_ENV) or BOOTSTRAP_CONFIG))
    try:
        import yaml
        return node_types_from_config(yaml.safe_load(path.read_text()) or {})
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.info("the cluster has an autoscaler, but its config %s is unreadable here (%s): "
                 "requests are not checked against its node types", path, exc.__class__.__name__)
        return {}


def _current_nodes() -> dict[str, dict]:
    import ray
    return {f"node {n['NodeID'][:8]}": {"resources": n["Resources"], "max_workers": 1}
            for n in ray.nodes() if n.get("Alive")}


# ---------------------------------------------------------------------- checks and waits
def check_request(bundles: list[dict], what: str, offered: dict | None = None) -> bool:
    """Refuse (one line) a request the cluster can never hold. True when it fits
    now; False when it fits only once the autoscaler has added nodes.

    ``offered``: what the private local Ray, not started yet, will hold;
    otherwise the connected cluster is asked."""
    from .runtime import private_ray_running
    bundles = asked(bundles)
    need = total(bundles)
    fixed = offered is not None or private_ray_running()
    if offered is None:
        import ray
        offered = ray.cluster_resources()
    missing = shortfall(need, offered)
    if missing is None:
        return True
    key, amount, have = missing
    types = None if fixed else autoscaler_node_types()
    if types is None:
        raise ResourceError(f"{what} needs {amount:g} {key} but the Ray cluster has {have:g}; "
                            f"lower the request or add nodes")
    if types and not fits_some_node_type(bundles, {**types, **_current_nodes()}):
        kinds = "; ".join(f"{n}: {describe(t['resources'])} x{t['max_workers']}" for n, t in types.items()
                          if describe(t["resources"]) != "nothing") or "none with resources"
        raise ResourceError(f"{what} needs {describe(need)} ({len(bundles)} bundles) but no node the "
                            f"autoscaler may launch can hold it ({kinds}); lower the request or add a node type")
    return False


def wait_for_request(bundles: list[dict], what: str, *, timeout_s: float) -> None:
    """Return once the cluster holds ``bundles``: at once when it does, else (on a
    cluster with an autoscaler that can hold them) after asking the autoscaler
    for them. ResourceError (one line) when the request can never fit, or the
    nodes did not come within ``timeout_s``."""
    if check_request(bundles, what):
        return
    import ray
    from ray.autoscaler.sdk import request_resources
    bundles = asked(bundles)
    need = total(bundles)
    log.info("%s needs %s; the cluster has %s: waiting up to %g s for the autoscaler to add nodes "
             "(--autoscale-timeout)", what, describe(need), describe(ray.cluster_resources()), timeout_s)
    request_resources(bundles=bundles)   # at once, not at the autoscaler's upscaling speed
    start = last_log = time.monotonic()
    try:
        while shortfall(need, ray.cluster_resources()) is not None:
            now = time.monotonic()
            if now - start >= timeout_s:
                raise ResourceError(f"{what} needs {describe(need)} but the autoscaler added no nodes for it in "
                                    f"{timeout_s:g} s (the cluster has {describe(ray.cluster_resources())}); "
                                    f"check the autoscaler (ray status) or raise --autoscale-timeout")
            if now - last_log >= WAIT_LOG_EVERY_S:
                log.info("still waiting for the autoscaler: %s needs %s, the cluster has %s (%.0f s of %g s)",
                         what, describe(need), describe(ray.cluster_resources()), now - start, timeout_s)
                last_log = now
            time.sleep(_POLL_S)
    finally:
        request_resources(bundles=[])    # the standing request would keep idle nodes alive
    log.info("the autoscaler added the nodes %s needs, after %.0f s", what, time.monotonic() - start)
