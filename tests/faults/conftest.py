"""Fixtures of the fault suite: a base model published to a model store for
evaluation actors, on the test run's shared Ray (``ray_session``). The model is
an untrained resnet8 on real digits images: these tests check bookkeeping,
determinism and memory, not accuracy."""
from __future__ import annotations

import pytest
import torch

from rlpruner_ray.config import CompressConfig

from .helpers import POOL_CONFIG


@pytest.fixture(scope="package")
def published(ray_session, digits16):
    """An untrained resnet8, its graph and step context, published as version 0 to a
    model store that evaluation pools read."""
    from rlpruner_ray.checkpoint import tag_model
    from rlpruner_ray.models import build_model, model_spec
    from rlpruner_ray.pipeline import build_graph
    from rlpruner_ray.search.workers import make_payload, start_store
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1)
    tag_model(model, model_spec("resnet8", 10, 1), (1, 16, 16))
    model.eval()
    config = CompressConfig(**POOL_CONFIG).validate()
    graph = build_graph(config, model, digits16, "cpu")
    original = graph.sizes()
    context = {"step": 0, "num_steps": 5, "original": original, "num_filters": int(0.2 * graph.total_channels)}
    store, name = start_store()
    ray_session.get(store.publish.remote(make_payload(model, graph, context, version=0)))
    try:
        yield {"config": config, "graph": graph, "context": context, "store_name": name, "model": model}
    finally:
        ray_session.kill(store)


@pytest.fixture(scope="package")
def pool(published):
    """Two evaluation actors on the published model, shared by the package's tests
    (each test reads the actors' pids when it starts: one test kills an actor)."""
    from rlpruner_ray.search.workers import EvaluationPool
    p = EvaluationPool(published["config"], published["store_name"])
    try:
        yield p
    finally:
        p.close()
