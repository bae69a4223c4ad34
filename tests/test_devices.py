"""Device correctness without a GPU.

CI has no GPU, but PyTorch's ``meta`` device refuses to mix with CPU tensors the
way CUDA does: a CPU index tensor applied to a meta weight raises. Running the
importance, planning, masked and physical paths on a model on ``meta`` therefore
catches the bug class that stopped every GPU run (index tensors left on the CPU
while the weights were on ``cuda:0``).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rlpruner_ray.graph import PruningGraph, model_device
from rlpruner_ray.models import build_model, list_models

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

META = torch.device("meta")


def _on_meta(name: str, in_channels: int = 3, size: int = 32):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels).eval()
    cpu_graph = PruningGraph(model, torch.zeros(1, in_channels, size, size))
    cpu_graph.compute_scores("l1")
    meta_model = build_model(name, 10, in_channels).eval().to(META)
    return cpu_graph, meta_model


def _assert_all_on(graph: PruningGraph, device: torch.device) -> None:
    wrong = [name for name, t in graph.tensors() if t.device != device]
    assert not wrong, f"graph tensors not on {device}: {wrong[:5]}"


@pytest.mark.parametrize("name", list_models())
def test_every_path_runs_on_a_meta_model(name):
    """Importance (every criterion), plan, masked forward and physical pruning on
    a model that lives on another device than the CPU."""
    cpu_graph, meta_model = _on_meta(name)
    graph = PruningGraph(meta_model, torch.zeros(1, 3, 32, 32, device=META))
    _assert_all_on(graph, META)
    x = torch.zeros(2, 3, 32, 32, device=META)
    for criterion in ("l1", "l2", "fpgm", "random"):
        scores = graph.compute_scores(criterion)
        assert all(s.device == META for s in scores), criterion
    graph.compute_scores("taylor", x, torch.zeros(2, dtype=torch.long, device=META))
    _assert_all_on(graph, META)

    plan = graph.plan(graph.initial_distribution(), graph.max_removable // 3)
    with graph.masked(plan) as masked:
        assert masked(x).shape == (2, 10)
    # physical pruning takes host indices (a meta tensor has no values to read)
    small = graph.prune_channels(cpu_graph.pruned_indices(plan))
    assert model_device(small) == META
    assert small(x).shape == (2, 10)
    kept = {k: v.shape for k, v in small.state_dict().items()}
    reference = {k: v.shape for k, v in cpu_graph.prune(plan).state_dict().items()}
    assert kept == reference


def test_graph_follows_its_model_to_another_device(quick_resnet8):
    """Every tensor a graph keeps moves with ``graph.to``, and with a plain
    ``model.to`` after the graph was built."""
    import copy
    model = copy.deepcopy(quick_resnet8)
    graph = PruningGraph(model, torch.zeros(1, 1, 16, 16))
    graph.compute_scores("l2")
    _assert_all_on(graph, torch.device("cpu"))
    graph.to(META)
    _assert_all_on(graph, META)
    assert model_device(model) == META

    model2 = copy.deepcopy(quick_resnet8)
    graph2 = PruningGraph(model2, torch.zeros(1, 1, 16, 16))
    graph2.compute_scores("l2")
    plan = graph2.plan(graph2.initial_distribution(), 10)
    model2.to(META)                          # moved behind the graph's back
    with graph2.masked(plan) as m:
        m(torch.zeros(1, 1, 16, 16, device=META))
    _assert_all_on(graph2, META)


def test_env_does_not_import_the_worker_pool():
    """The environment and the worker pool both sit on the model store; importing
    the env must not pull in the pool (the old import circle)."""
    code = ("import sys, envs; "
            "assert 'rlpruner_ray.search.workers' not in sys.modules, 'envs imports the worker pool'; "
            "import rlpruner_ray.search.workers")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------- bad GPU requests
@pytest.fixture
def one_gpu(monkeypatch):
    """This machine as a one-GPU machine, as far as the checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("args", [
    ["compress", "--device", "cuda:7"],
    ["compress", "--gpus-per-worker", "2"],
    ["compress", "--gpus-per-worker", "1.5"],
    ["train", "--device", "cuda:1"],
    ["prune", "--device", "cuda:3"],
])
def test_bad_gpu_requests_stop_before_anything_is_written(one_gpu, tmp_path, capsys, args):
    from rlpruner_ray.cli import main
    out = tmp_path / "run"
    code = main(["-q", *args, "--out-dir", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("rlpruner: error:") and ("GPU" in err[0] or "cuda" in err[0]), err
    assert "unrecognized" not in err[0] and not out.exists()


def test_device_cuda_without_cuda_is_refused(tmp_path):
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.errors import ConfigError
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA"):
        CompressConfig(device="cuda").validate().resolved_device()


# ---------------------------------------------------------------------- the GPU pool's layout
def test_gpu_pool_layout_is_one_actor_per_gpu():
    from rlpruner_ray.cluster_offer import gpu_pool_layout
    assert gpu_pool_layout("auto", 0) is None                 # no GPU: the CPU pool as configured
    assert gpu_pool_layout("cpu", 4) is None                  # --device cpu wins
    assert gpu_pool_layout("auto", 4) == (4, 1.0)
    assert gpu_pool_layout("cuda", 1) == (1, 1.0)
    assert gpu_pool_layout("cuda:2", 4) == (1, 1.0)           # one named GPU


def test_compress_on_a_gpu_machine_gives_each_actor_a_gpu(one_gpu, monkeypatch, tmp_path):
    """The README's main job on a one-GPU machine: evaluation actors get the GPU;
    an explicit layout is left as given."""
    from rlpruner_ray import cli, pipeline
    seen = []
    monkeypatch.setattr(pipeline, "compress", lambda config: seen.append(config) or {})
    monkeypatch.setattr(cli, "_print_summary", lambda summary: None)
    assert cli.main(["-q", "compress", "--out-dir", str(tmp_path / "a")]) == 0
    assert (seen[-1].num_workers, seen[-1].gpus_per_worker) == (1, 1.0)
    assert cli.main(["-q", "compress", "--num-workers", "3", "--out-dir", str(tmp_path / "b")]) == 0
    assert (seen[-1].num_workers, seen[-1].gpus_per_worker) == (3, 0.0)
    assert cli.main(["-q", "compress", "--device", "cpu", "--out-dir", str(tmp_path / "c")]) == 0
    assert seen[-1].gpus_per_worker == 0.0
