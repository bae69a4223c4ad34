"""What the cluster can hold (rlpruner_ray.cluster_offer), the device an actor picks,
default trial sizing on a small machine, and the private local Ray's temp folder.
No Ray cluster here except the one subprocess that starts a private local Ray;
the autoscaler itself is exercised in tests/test_autoscaling.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from rlpruner_ray import cluster_offer
from rlpruner_ray.cluster_offer import fits_some_node_type, node_types_from_config
from rlpruner_ray.errors import ResourceError

ROOT = Path(__file__).resolve().parent.parent
GPU_NODE = {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}
HEAD = {"resources": {"CPU": 8}, "max_workers": 1}


# ---------------------------------------------------------------------- fits_some_node_type (pure)
@pytest.mark.parametrize("bundles, fits", [
    ([{"CPU": 1}, {"CPU": 1, "GPU": 0.5}], True),                  # one trial on one GPU node
    ([{"CPU": 1, "GPU": 0.5}] * 4, True),                          # 2 GPUs over 2 nodes
    ([{"CPU": 1, "GPU": 0.5}] * 5, False),                         # 2.5 GPUs: more than 2 nodes hold
    ([{"CPU": 1, "GPU": 2}], False),                               # no node has 2 GPUs
    ([{"CPU": 6}], True),                                          # fits the head
    ([{"CPU": 9}], False),                                         # larger than every node
    ([{"CPU": 1, "TPU": 1}], False),                               # a resource no node type has
    ([], True),
])
def test_fits_some_node_type(bundles, fits):
    assert fits_some_node_type(bundles, {"head": HEAD, "gpu": GPU_NODE}) is fits


def test_node_types_that_may_not_launch_hold_nothing():
    assert not fits_some_node_type([{"GPU": 1}], {"gpu": {**GPU_NODE, "max_workers": 0}})
    assert not fits_some_node_type([{"GPU": 1}], {})


def test_node_types_of_the_aws_cluster_file():
    cfg = yaml.safe_load((ROOT / "clusters" / "aws-gpu.yaml").read_text())
    types = node_types_from_config(cfg)
    assert types["gpu_worker"] == {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 8}
    assert types["head"]["max_workers"] == 1 + 8             # the head, and the type may launch as a worker
    # a trial of the GPU sweep in docs/clusters.md (2 workers x 0.25 GPU, plus the trial's own 0.25)
    trial = [{"CPU": 1, "GPU": 0.25}] + [{"CPU": 1, "GPU": 0.25}] * 2
    assert fits_some_node_type(trial, types)
    assert not fits_some_node_type([{"CPU": 1, "GPU": 2}], types)
    cfg["max_workers"] = 2                                    # the cluster's cap wins over the type's
    assert node_types_from_config(cfg)["gpu_worker"]["max_workers"] == 2


# ---------------------------------------------------------------------- check_request
def test_fixed_or_private_cluster_refuses_at_once(monkeypatch):
    monkeypatch.setattr(cluster_offer, "autoscaler_node_types", lambda: pytest.fail("asked the autoscaler"))
    with pytest.raises(ResourceError, match=r"one trial needs 1 GPU but the Ray cluster has 0; lower"):
        cluster_offer.check_request([{"CPU": 1}, {"GPU": 1}], "one trial", offered={"CPU": 2, "GPU": 0})
    assert cluster_offer.check_request([{"CPU": 2}], "x", offered={"CPU": 2})


def _connected(monkeypatch, *, now: dict, types: dict | None):
    """check_request against a pretend cluster holding ``now`` with these autoscaler node types."""
    import ray
    import rlpruner_ray.runtime as runtime
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(now))
    monkeypatch.setattr(runtime, "private_ray_running", lambda: False)
    monkeypatch.setattr(cluster_offer, "autoscaler_node_types", lambda: types)
    monkeypatch.setattr(cluster_offer, "_current_nodes", lambda: {"node h": {"resources": now, "max_workers": 1}})


def test_autoscaled_cluster_waits_for_what_a_node_type_holds(monkeypatch):
    _connected(monkeypatch, now={"CPU": 8}, types={"gpu_worker": GPU_NODE})
    assert cluster_offer.check_request([{"CPU": 1}, {"CPU": 1, "GPU": 0.5}], "one trial") is False
    with pytest.raises(ResourceError) as err:
        cluster_offer.check_request([{"CPU": 1, "GPU": 2}], "one trial")
    line = str(err.value)
    assert "\n" not in line and "no node the autoscaler may launch can hold it" in line
    assert "gpu_worker: 4 CPU, 1 GPU x2" in line


def test_cluster_without_autoscaler_refuses_at_once(monkeypatch):
    _connected(monkeypatch, now={"CPU": 8}, types=None)
    with pytest.raises(ResourceError, match="needs 0.5 GPU but the Ray cluster has 0"):
        cluster_offer.check_request([{"CPU": 1, "GPU": 0.5}], "one trial")


def test_wait_gives_up_after_the_timeout_with_one_line(monkeypatch):
    import ray.autoscaler.sdk as sdk
    _connected(monkeypatch, now={"CPU": 8}, types={"gpu_worker": GPU_NODE})
    asked = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles: asked.append(bundles))
    monkeypatch.setattr(cluster_offer, "_POLL_S", 0.01)
    with pytest.raises(ResourceError, match=r"added no nodes for it in 0.05 s .*--autoscale-timeout"):
        cluster_offer.wait_for_request([{"CPU": 1, "GPU": 0.5}], "2 evaluation actors", timeout_s=0.05)
    assert asked == [[{"CPU": 1, "GPU": 0.5}], []]        # asked for the nodes, then withdrew the request


def test_config_unreadable_means_unknown_types(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster_offer, "has_autoscaler", lambda: True)
    monkeypatch.setenv(cluster_offer.AUTOSCALING_CONFIG_ENV, str(tmp_path / "missing.yaml"))
    assert cluster_offer.autoscaler_node_types() == {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}, "max_workers": 0}, "g": {"resources": {"CPU": 2, "GPU": 1}}}}))
    monkeypatch.setenv(cluster_offer.AUTOSCALING_CONFIG_ENV, str(tmp_path / "c.yaml"))
    assert cluster_offer.autoscaler_node_types() == {"h": {"resources": {"CPU": 0}, "max_workers": 1},
                                                     "g": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 3}}


# ---------------------------------------------------------------------- the device of an actor
@pytest.mark.parametrize("configured, gpu_ids, cuda, device", [
    ("auto", [0], True, "cuda"),
    ("auto", [], True, "cpu"),          # no GPU assigned by Ray: CPU even where CUDA exists
    ("auto", [0], False, "cpu"),        # a node that declares a GPU it does not have
    ("cuda", [0], True, "cuda"),
    ("cuda", [], True, "cpu"),
    ("cpu", [0], True, "cpu"),          # --device cpu wins on a GPU node
])
def test_actor_device_follows_what_ray_assigned(monkeypatch, configured, gpu_ids, cuda, device):
    import ray
    import torch
    from rlpruner_ray.runtime import actor_device
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert actor_device(configured) == device


# ---------------------------------------------------------------------- default trial size (issue 14)
def _plan(tmp_path, argv):
    from rlpruner_ray import sweep
    from rlpruner_ray.cli import _config, build_parser
    return sweep.plan_from_args(build_parser().parse_args(["sweep", "--out-dir", str(tmp_path / "sw"), *argv]),
                                _config)


def test_default_workers_shrink_to_fit_a_two_core_machine(tmp_path, caplog):
    from rlpruner_ray.sweep.run import check_trials_fit, fit_default_workers
    plan = _plan(tmp_path, ["--sparsity", "0.3", "0.6"])
    offer = {"CPU": 2.0, "GPU": 0.0}
    logger = logging.getLogger("rlpruner_ray")
    logger.addHandler(caplog.handler)     # (the CLI's console may stop it propagating to the root)
    try:
        with caplog.at_level(logging.INFO, logger="rlpruner_ray"):
            fit_default_workers(plan, offer)
    finally:
        logger.removeHandler(caplog.handler)
    assert plan.base["num_workers"] == 1
    # (a record reaches caplog once or twice, with the root logger's propagation on or off)
    lines = sorted({r.getMessage() for r in caplog.records if "evaluation actor" in r.getMessage()})
    assert len(lines) == 1 and "1 evaluation actor(s) instead of the default 2" in lines[0], lines
    check_trials_fit(plan, offer)                              # now it fits
    assert plan.to_dict()["base"]["num_workers"] == 1         # what sweep.json keeps (and --resume reuses)


def test_an_explicit_request_that_cannot_fit_is_still_refused(tmp_path):
    from rlpruner_ray.sweep.run import check_trials_fit, fit_default_workers
    plan = _plan(tmp_path, ["--sparsity", "0.3", "--num-workers", "2"])
    fit_default_workers(plan, {"CPU": 2.0, "GPU": 0.0})
    assert plan.base["num_workers"] == 2
    with pytest.raises(ResourceError, match=r"needs 3 CPU but the Ray cluster has 2"):
        check_trials_fit(plan, {"CPU": 2.0, "GPU": 0.0})


def test_default_workers_unchanged_where_they_fit(tmp_path):
    from rlpruner_ray.sweep.run import fit_default_workers
    plan = _plan(tmp_path, ["--sparsity", "0.3"])
    fit_default_workers(plan, {"CPU": 16.0, "GPU": 0.0})
    assert plan.base["num_workers"] == 2


# ---------------------------------------------------------------------- the private Ray's temp folder
@pytest.mark.slow
def test_private_ray_temp_folder_is_private_and_removed(tmp_path):
    """A run folder with a long path gets its Ray folder under /tmp (rlpr-<hash>):
    mode 0700 while Ray runs (Ray's own 0777 folder is inside it), gone after."""
    out = tmp_path / ("a-long-run-folder-name-" * 3) / "run"
    code = ("import json, os, stat, sys; from rlpruner_ray.runtime import init_ray, ray_temp_dir, shutdown_ray; "
            f"out = {str(out)!r}; init_ray(None, out, num_cpus=1); t = ray_temp_dir(out); "
            "mode = stat.S_IMODE(os.stat(t).st_mode); inner = sorted(os.listdir(t)); shutdown_ray(); "
            "print(json.dumps([t, oct(mode), inner, os.path.exists(t)]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    temp, mode, inner, exists_after = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(temp).name.startswith("rlpr-") and Path(temp).parent == Path(tempfile.gettempdir())
    assert mode == "0o700" and inner == ["r"]
    assert not exists_after
