"""Shared fixtures: one small trained base model on the real digits data, made
once per test session and reused by every test that needs a trained model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The suite must hold on any CPU, thread count and seed (docs/development.md lists
# the tests that once did not): RLPRUNER_TEST_SEED changes the seed of the shared
# trained fixtures, RLPRUNER_TEST_THREADS the torch threads of the test process.
TEST_SEED = int(os.environ.get("RLPRUNER_TEST_SEED", "0"))
if os.environ.get("RLPRUNER_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["RLPRUNER_TEST_THREADS"]))
# Deterministic kernels wherever torch has them: a rerun on the same machine gives
# the same trained fixtures (on a CPU this costs nothing measurable).
torch.use_deterministic_algorithms(True)

# Subprocesses (CLI runs, Ray workers, cluster nodes) import this checkout, not
# whatever copy an earlier `pip install -e` elsewhere left on the path.
_CHECKOUT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_CHECKOUT, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _CHECKOUT]])


@pytest.fixture(scope="session", autouse=True)
def no_ray_token_in_home():
    """No test leaves a Ray token in ~/.ray: a later `ray start` of this user would
    pick it up (every Ray the tests start is private, with its token in the env)."""
    token = Path.home() / ".ray" / "auth_token"
    before = token.stat().st_mtime_ns if token.exists() else None
    yield
    after = token.stat().st_mtime_ns if token.exists() else None
    assert after == before, f"a test wrote {token}"


def pytest_collection_modifyitems(config, items):
    """Tests on the shared Ray (``ray_session``) run after all the others, in their
    collected order: that Ray lives until the session ends, and every other test must
    find none running (an in-process compress or sweep then starts, sizes and stops
    its own, as a user's does)."""
    on_ray = [item for item in items if "ray_session" in getattr(item, "fixturenames", ())]
    if on_ray:
        items[:] = [item for item in items if "ray_session" not in getattr(item, "fixturenames", ())] + on_ray


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """The one in-process Ray of the test run: a private local Ray started the
    project's way (``runtime.init_ray``: loopback, token auth, nothing in ~/.ray), with
    CI's 2 CPUs. A Ray already running here was leaked by an earlier test (or started
    by one in process): the tests below would run on a Ray nobody set up for them, so
    that is an error, never a skip. Tests that start their own clusters or runs in
    subprocesses do not use it."""
    import ray
    from rlpruner_ray.runtime import init_ray, shutdown_ray
    if ray.is_initialized():
        pytest.fail("Ray is already running in the test process: an earlier test left it running")
    init_ray(None, tmp_path_factory.mktemp("ray"), num_cpus=2)
    try:
        yield ray
    finally:
        shutdown_ray()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only spins
    waiting for the first (files use it with ``pytest.mark.usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits16():
    from rlpruner_ray.data import load_dataset
    return load_dataset("digits", image_size=16)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory, digits16):
    """Path of a resnet8 trained on digits (val top-1 well above chance): the one
    trained model of the test run (``quick_resnet8`` is loaded from it)."""
    from rlpruner_ray.checkpoint import save_pruned, tag_model
    from rlpruner_ray.models import build_model, model_spec
    from rlpruner_ray.train import TrainSettings, train_base
    torch.manual_seed(TEST_SEED)
    model = build_model("resnet8", 10, 1)
    tag_model(model, model_spec("resnet8", 10, 1), (1, 16, 16))
    result = train_base(model, digits16, TrainSettings(epochs=8, lr=0.05, batch_size=128, seed=TEST_SEED))
    assert result.best_val_top1 > 0.5                               # learned: well above chance (0.1)
    path = tmp_path_factory.mktemp("base") / "base_model.pt"
    save_pruned(model, path)
    return path


@pytest.fixture(scope="session")
def quick_resnet8(base_checkpoint):
    """The trained resnet8 of ``base_checkpoint`` as a module (eval mode), shared by
    the session; copy before changing it."""
    from rlpruner_ray.checkpoint import load_pruned
    return load_pruned(base_checkpoint).eval()
