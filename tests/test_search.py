"""Tests for the search algorithms (rlpruner_ray.search): budgets, learning, state,
drop guard, epsilon schedule, and the Ray evaluation pool.

Most tests score with a local LayerPruningEnv (no Ray) or a synthetic score function;
only the one test marked ``slow`` starts a local Ray.
"""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from envs import LayerPruningEnv
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.errors import ConfigError
from rlpruner_ray.pipeline import build_graph
from rlpruner_ray.search.base import BudgetExhausted, Evaluator, StepContext, make_algorithm
from rlpruner_ray.search.rlpruner import epsilon_at
from rlpruner_ray.search.workers import env_settings, make_payload

NATIVE = ("rlpruner", "random", "uniform", "global")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_context(graph, *, step=0, num_filters=None, original=None):
    original = original or graph.sizes()
    return {"step": step, "num_steps": 5, "original": original,
            "num_filters": int(0.2 * graph.total_channels) if num_filters is None else num_filters}


@pytest.fixture(scope="module")
def real(one_thread, digits16, quick_resnet8):
    """A briefly trained resnet8 on 16x16 digits, its graph, payload and a local env."""
    data, model = digits16, copy.deepcopy(quick_resnet8)
    config = CompressConfig(reward_samples=144, image_size=16, num_workers=2)
    graph = build_graph(config, model, data, "cpu")
    context = make_context(graph)
    payload = make_payload(model, graph, context, version=0)
    settings = env_settings(config)
    settings["payload"] = payload
    env = LayerPruningEnv(settings)
    return {"data": data, "model": model, "config": config, "graph": graph, "context": context,
            "payload": payload, "settings": settings, "env": env}


class Counter:
    """score_fn for an Evaluator that scores with the local env and counts evaluations."""

    def __init__(self, env):
        self.env = env
        self.calls = 0
        self.distributions = []

    def __call__(self, distributions):
        self.calls += len(distributions)
        self.distributions += [np.array(d) for d in distributions]
        return [self.env.evaluate_distribution(d) for d in distributions]


def real_ctx(real, seed=0, step=0, **kw):
    return StepContext(step, 5, real["graph"], np.random.default_rng([seed, step]),
                       extras={"num_filters": real["context"]["num_filters"]}, **kw)


# ---------------------------------------------------------------------- budget
@pytest.mark.parametrize("budget", [7, 10, 23])
@pytest.mark.parametrize("algo", NATIVE)
def test_every_native_algorithm_respects_its_budget(real, algo, budget):
    counter = Counter(real["env"])
    evaluator = Evaluator(counter, budget)
    search = make_algorithm(real["config"].replace(algo=algo))
    chosen = search.search(real_ctx(real), evaluator)
    assert counter.calls <= budget
    if algo in ("rlpruner", "random"):
        assert counter.calls == budget
    else:
        assert counter.calls == 1
    assert evaluator.used == counter.calls == len(evaluator.candidates)
    assert [c.index for c in evaluator.candidates] == list(range(counter.calls))
    assert any(chosen is c for c in evaluator.candidates)
    assert int(chosen.counts.sum()) == real["context"]["num_filters"]
    if algo == "uniform":
        np.testing.assert_allclose(chosen.distribution, real["graph"].initial_distribution())


def test_evaluator_truncates_and_then_refuses(real):
    counter = Counter(real["env"])
    evaluator = Evaluator(counter, 3)
    init = real["graph"].initial_distribution()
    out = evaluator([init] * 5, 0)
    assert len(out) == 3 and counter.calls == 3 and evaluator.remaining == 0
    with pytest.raises(BudgetExhausted):
        evaluator([init], 1)
    assert counter.calls == 3


def test_global_removes_the_globally_least_important_channels(real):
    from rlpruner_ray.search.baselines import global_counts
    graph = real["graph"]
    n = real["context"]["num_filters"]
    counts = global_counts(graph, n)
    assert int(counts.sum()) == n
    assert np.all(counts <= graph.channels - graph.floors)
    # every kept channel scores (normalised) at least as high as every removed one
    removed, kept = [], []
    for g, s in enumerate(graph.scores):
        s = (s.double() / float(s.double().mean())).numpy()
        order = np.sort(s)
        removed += list(order[: counts[g]])
        if counts[g] < graph.channels[g] - graph.floors[g]:
            kept.append(order[counts[g]])
    assert max(removed) <= min(kept) + 1e-12


# ---------------------------------------------------------------------- learning on the real model
def test_rlpruner_improves_over_iterations_on_the_real_model(real):
    evaluator = Evaluator(Counter(real["env"]), 60)
    search = make_algorithm(real["config"].replace(algo="rlpruner", samples_per_iteration=10))
    search.search(real_ctx(real, seed=0), evaluator)
    per_iteration = {}
    for c in evaluator.candidates:
        per_iteration.setdefault(c.iteration, []).append(c.reward)
    assert sorted(per_iteration) == list(range(6))
    assert all(len(v) == 10 for v in per_iteration.values())
    first = max(per_iteration[0])
    last = max(max(per_iteration[i]) for i in (3, 4, 5))
    assert last >= first, per_iteration
    assert evaluator.best.reward > first            # it found something better than iteration 0's best
    assert evaluator.best.iteration > 0
    # the policy moved away from the initial distribution
    assert not np.allclose(search.pd, real["graph"].initial_distribution())


# ---------------------------------------------------------------------- synthetic problem
class FakeGraph:
    """Just what the native algorithms read off a PruningGraph."""

    def __init__(self, channels):
        self.channels = np.asarray(channels, np.int64)
        self.floors = np.ones_like(self.channels)
        gen = torch.Generator().manual_seed(0)
        self.scores = [torch.rand(int(c), generator=gen) + 0.1 for c in self.channels]

    @property
    def num_groups(self):
        return len(self.channels)

    @property
    def total_channels(self):
        return int(self.channels.sum())

    @property
    def max_removable(self):
        return int((self.channels - self.floors).sum())

    def initial_distribution(self):
        return self.channels / self.channels.sum()


SENSITIVE = 3


def sensitive_problem(graph, *, penalty=10.0, accuracy=None):
    """Reward 1 - 5 * share(group 3) - penalty * ||d - init||^2: group 3 is sensitive,
    and (as in real pruning) piling filters onto any single group costs accuracy too."""
    init = graph.initial_distribution()
    calls = []

    def score(distributions):
        out = []
        for d in distributions:
            d = np.asarray(d)
            calls.append(d)
            r = 1.0 - 5.0 * d[SENSITIVE] - penalty * float(np.sum((d - init) ** 2))
            acc = r if accuracy is None else accuracy(d)
            out.append({"reward": r, "accuracy": acc, "macs": 1.0, "params": 1.0,
                        "counts": np.round(d * 40).astype(np.int64)})
        return out

    score.calls = calls
    return score


def run_search(algo, graph, score, *, budget, seed, step=0, num_steps=5, reference=None, search=None,
               **config):
    search = search or make_algorithm(CompressConfig(algo=algo, **config))
    evaluator = Evaluator(score, budget)
    ctx = StepContext(step, num_steps, graph, np.random.default_rng(seed), reference_accuracy=reference)
    chosen = search.search(ctx, evaluator)
    return search, evaluator, chosen


def test_rlpruner_beats_random_when_one_group_is_sensitive():
    graph = FakeGraph([16] * 8)
    init_reward = sensitive_problem(graph)([graph.initial_distribution()])[0]["reward"]
    best = {"rlpruner": [], "random": []}
    for seed in range(3):
        for algo in best:
            search, evaluator, _ = run_search(algo, graph, sensitive_problem(graph), budget=100, seed=seed)
            assert evaluator.used == 100
            best[algo].append(evaluator.best.reward)
            if algo == "rlpruner":
                # it learned to spare the sensitive group
                assert search.pd[SENSITIVE] < graph.initial_distribution()[SENSITIVE]
    rl, rnd = np.mean(best["rlpruner"]), np.mean(best["random"])
    assert rl > rnd, best
    assert rl > init_reward + 0.1


# ---------------------------------------------------------------------- epsilon
def test_epsilon_schedule():
    eps, frac, steps = 0.4, 0.3, 20
    values = [epsilon_at(s, steps, eps, frac) for s in range(steps)]
    assert values[0] == pytest.approx(eps)
    decay_steps = math.ceil(frac * steps)
    assert all(v == 0.0 for v in values[decay_steps:])
    assert all(v > 0.0 for v in values[:decay_steps])
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= eps for v in values)
    # cosine: halfway through the decay it is at half the initial value
    assert epsilon_at(5, 100, 1.0, 0.1) == pytest.approx(0.5)
    assert epsilon_at(0, 1, 0.4, 0.1) == pytest.approx(0.4)
    assert epsilon_at(1, 1, 0.4, 0.1) == 0.0


def test_epsilon_greedy_choice():
    graph = FakeGraph([16] * 8)
    # epsilon 0: the best candidate of the step
    _, evaluator, chosen = run_search("rlpruner", graph, sensitive_problem(graph), budget=30, seed=1,
                                      epsilon=0.0)
    assert chosen is evaluator.best
    # epsilon 1 at step 0: always another elite sample
    _, evaluator, chosen = run_search("rlpruner", graph, sensitive_problem(graph), budget=30, seed=1,
                                      epsilon=1.0, epsilon_decay_fraction=1.0)
    assert chosen is not evaluator.best
    assert chosen.reward <= evaluator.best.reward
    ranked = sorted(evaluator.candidates, key=lambda c: -c.reward)[:10]
    assert any(chosen is c for c in ranked)


# ---------------------------------------------------------------------- state
def test_rlpruner_state_round_trip_gives_the_same_next_search():
    graph = FakeGraph([8, 16, 16, 32, 32, 64, 64, 8])
    first, _, _ = run_search("rlpruner", graph, sensitive_problem(graph), budget=40, seed=0)
    state = json.loads(json.dumps(first.state_dict()))   # as a checkpoint stores it
    assert state["pd"] is not None and len(state["pd"]) == graph.num_groups

    restored = make_algorithm(CompressConfig(algo="rlpruner"))
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.pd, first.pd)

    a_search, a_eval, a = run_search("rlpruner", graph, sensitive_problem(graph), budget=40, seed=7, step=1,
                                     search=first)
    b_search, b_eval, b = run_search("rlpruner", graph, sensitive_problem(graph), budget=40, seed=7, step=1,
                                     search=restored)
    np.testing.assert_array_equal(a.distribution, b.distribution)
    assert a.reward == b.reward and a.index == b.index
    np.testing.assert_array_equal(a_search.pd, b_search.pd)
    assert [c.reward for c in a_eval.candidates] == [c.reward for c in b_eval.candidates]

    # the state matters: a fresh algorithm with the same rng does something else
    _, c_eval, _ = run_search("rlpruner", graph, sensitive_problem(graph), budget=40, seed=7, step=1)
    assert [c.reward for c in c_eval.candidates] != [c.reward for c in a_eval.candidates]

    empty = make_algorithm(CompressConfig(algo="rlpruner"))
    assert empty.state_dict() == {"pd": None}
    empty.load_state_dict({"pd": None})
    assert empty.pd is None


def test_rlpruner_restarts_from_initial_when_the_group_count_changes():
    search, _, _ = run_search("rlpruner", FakeGraph([16] * 8), sensitive_problem(FakeGraph([16] * 8)),
                              budget=20, seed=0)
    other = FakeGraph([16] * 5)
    seen = []

    def score(ds):
        seen.extend(ds)
        return [{"reward": 0.0, "accuracy": 0.0, "macs": 1.0, "params": 1.0,
                 "counts": np.zeros(5, np.int64)} for _ in ds]

    run_search("rlpruner", other, score, budget=5, seed=0, search=search)
    assert all(len(d) == 5 for d in seen)


# ---------------------------------------------------------------------- drop guard
def test_drop_guard_resets_the_distribution_when_accuracy_collapses():
    graph = FakeGraph([16] * 8)
    init = graph.initial_distribution()
    # accuracy collapsed: 0.85 < (1 - 0.1) * 1.0
    collapsed, _, _ = run_search("rlpruner", graph, sensitive_problem(graph, accuracy=lambda d: 0.85),
                                 budget=50, seed=0, reference=1.0, drop_guard=0.1)
    np.testing.assert_array_equal(collapsed.pd, init)
    # a small drop, within the guard: the distribution keeps what it learned
    fine, _, _ = run_search("rlpruner", graph, sensitive_problem(graph, accuracy=lambda d: 0.95),
                            budget=50, seed=0, reference=1.0, drop_guard=0.1)
    assert not np.allclose(fine.pd, init)
    assert fine.pd[SENSITIVE] < init[SENSITIVE]
    # guard disabled, or no reference (first step): no reset either
    for kw in (dict(reference=1.0, drop_guard=0.0), dict(reference=None, drop_guard=0.1)):
        free, _, _ = run_search("rlpruner", graph, sensitive_problem(graph, accuracy=lambda d: 0.1),
                                budget=50, seed=0, **kw)
        assert not np.allclose(free.pd, init)


def test_drop_guard_only_fires_on_collapsed_accuracy():
    # accuracy collapses only where the sensitive group is pruned hard: the guard
    # must not reset while the step's best accuracy is fine
    graph = FakeGraph([16] * 8)
    init = graph.initial_distribution()
    acc = lambda d: 0.95 if d[SENSITIVE] < 0.2 else 0.3   # noqa: E731
    search, evaluator, _ = run_search("rlpruner", graph, sensitive_problem(graph, accuracy=acc), budget=50,
                                      seed=0, reference=1.0, drop_guard=0.1)
    assert evaluator.best.accuracy == 0.95
    assert not np.allclose(search.pd, init)


def test_drop_guard_looks_at_the_best_candidate_not_the_worst_elite():
    # every new best candidate keeps its accuracy, all others collapse: the step's
    # best is fine, so no reset although most of the elite buffer collapsed
    graph = FakeGraph([16] * 8)
    init = graph.initial_distribution()
    best = [-math.inf]

    def acc(d):
        r = 1.0 - 5.0 * d[SENSITIVE] - 10.0 * float(np.sum((d - init) ** 2))
        if r >= best[0]:
            best[0] = r
            return 0.95
        return 0.3

    search, evaluator, _ = run_search("rlpruner", graph, sensitive_problem(graph, accuracy=acc), budget=50,
                                      seed=0, reference=1.0, drop_guard=0.1)
    assert evaluator.best.accuracy == 0.95
    assert sum(c.accuracy == 0.3 for c in evaluator.candidates) > 25
    assert not np.allclose(search.pd, init)


# ---------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", ["no-such-algorithm", "rlprunerx"])
def test_make_algorithm_unknown_name_raises_config_error(name):
    with pytest.raises(ConfigError):
        make_algorithm(CompressConfig(algo=name))


@pytest.mark.parametrize("algo", NATIVE)
def test_make_algorithm_native_names(algo):
    search = make_algorithm(CompressConfig(algo=algo.upper() if algo == "random" else algo))
    assert search.name == algo


# ---------------------------------------------------------------------- Ray evaluation pool
@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """The project's own private local Ray (loopback, token auth, nothing in ~/.ray)."""
    import ray
    from rlpruner_ray.runtime import init_ray
    if ray.is_initialized():
        pytest.skip("Ray already initialised by another test")
    init_ray(None, tmp_path_factory.mktemp("ray_pool"), num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


def _same(pool_results, local_results):
    assert len(pool_results) == len(local_results)
    for p, q in zip(pool_results, local_results):
        assert p["reward"] == q["reward"] and p["accuracy"] == q["accuracy"]
        assert p["macs"] == pytest.approx(q["macs"]) and p["params"] == pytest.approx(q["params"])
        np.testing.assert_array_equal(p["counts"], q["counts"])
        assert p["version"] == q["version"]


@pytest.mark.slow
def test_evaluation_pool_matches_the_local_env_and_follows_new_bases(real, local_ray):
    ray = local_ray
    from rlpruner_ray.search.workers import EvaluationPool, start_store

    graph, config = real["graph"], real["config"]
    store, store_name = start_store()
    pool = None
    try:
        assert ray.get(store.publish.remote(real["payload"])) == 0
        pool = EvaluationPool(config, store_name)
        assert len(pool.workers) == 2
        rng = np.random.default_rng(0)
        init = graph.initial_distribution()
        distributions = [init] + list(rng.dirichlet(init * graph.num_groups + 1e-3, size=6))
        local = LayerPruningEnv(real["settings"])
        _same(pool.evaluate(distributions, 0), [local.evaluate_distribution(d) for d in distributions])
        # an Evaluator on the pool sees candidates in submission order
        evaluator = Evaluator(lambda ds: pool.evaluate(ds, 0), 5)
        out = evaluator(distributions[:5], 0)
        assert [c.reward for c in out] == [local.evaluate_distribution(d)["reward"] for d in distributions[:5]]

        # a new base model: physically pruned, published as version 1
        plan = local.evaluate_distribution(init)["counts"]
        small = graph.prune(plan).eval()
        graph2 = build_graph(config, small, real["data"], "cpu")
        ctx2 = make_context(graph2, step=1, original=real["context"]["original"],
                            num_filters=int(0.1 * graph.total_channels))
        payload2 = make_payload(small, graph2, ctx2, version=1)
        assert ray.get(store.publish.remote(payload2)) == 1
        local.set_base(payload2)
        new = [graph2.initial_distribution()] + list(rng.dirichlet(np.ones(graph2.num_groups), size=3))
        _same(pool.evaluate(new, 1), [local.evaluate_distribution(d) for d in new])
        described = pool.describe()
        assert len(described) == 2 and len({d["pid"] for d in described}) == 2
        for d in described:
            assert d["version"] == 1
            assert d["channels"] == graph2.channels.tolist()
        assert graph2.channels.tolist() != graph.channels.tolist()
    finally:
        if pool is not None:
            pool.close()
        ray.kill(store)
