"""Tests for envs.layer_pruning.LayerPruningEnv on a real (tiny, briefly trained) model.

Everything runs locally: the env gets its base model from a ``payload`` dict, no Ray.
"""

import copy

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from envs import ENV_ID, LayerPruningEnv
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.pipeline import build_graph
from rlpruner_ray.search.workers import env_settings, make_payload


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def make_context(graph, *, step=0, num_filters=None, original=None, **extra):
    original = original or graph.sizes()
    ctx = {"step": step, "num_steps": 5, "original": original,
           "num_filters": int(0.2 * graph.total_channels) if num_filters is None else num_filters}
    ctx.update(extra)
    return ctx


@pytest.fixture(scope="module")
def base(one_thread, digits16, quick_resnet8):
    data, model = digits16, copy.deepcopy(quick_resnet8)
    config = CompressConfig(reward_samples=144, image_size=16)
    graph = build_graph(config, model, data, "cpu")
    context = make_context(graph)
    payload = make_payload(model, graph, context, version=0)
    settings = env_settings(config)
    settings["payload"] = payload
    return {"data": data, "model": model, "config": config, "graph": graph, "context": context,
            "payload": payload, "settings": settings}


def new_env(base, **changes):
    settings = dict(base["settings"])
    settings.update(changes)
    return LayerPruningEnv(settings)


@pytest.fixture(scope="module")
def env(base):
    return new_env(base)


def reward_of_action(env, action):
    env.reset()
    _, reward, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32))
    assert terminated and not truncated
    return reward, info


def assert_same_outcome(env, a, b) -> None:
    """Actions ``a`` and ``b`` give the same reward and the same filter counts."""
    r_a, i_a = reward_of_action(env, a)
    r_b, i_b = reward_of_action(env, b)
    assert r_a == r_b
    np.testing.assert_array_equal(i_a["counts"], i_b["counts"])


# ---------------------------------------------------------------------- API conformance
def test_check_env_passes(env):
    check_env(env.unwrapped, skip_render_check=True)


def test_registered_id_works_with_gymnasium_make(base):
    assert ENV_ID == "rlpruner/LayerPruning-v0" and ENV_ID in gymnasium.registry
    env = gymnasium.make(ENV_ID, config=base["settings"])
    try:
        assert isinstance(env.unwrapped, envs.LayerPruningEnv)
        obs, info = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        assert info["version"] == 0
        g = base["graph"].num_groups
        assert env.action_space.shape == (g,)
        obs, reward, terminated, truncated, info = env.step(np.zeros(g, np.float32))
        assert terminated and not truncated
        assert 0.0 <= reward <= 1.0
        assert env.observation_space.contains(obs)
    finally:
        env.close()


def test_spaces_shapes(env, base):
    g = base["graph"].num_groups
    assert env.action_space.shape == (g,)
    assert float(env.action_space.low.min()) == -1.0 and float(env.action_space.high.max()) == 1.0
    assert env.observation_space.shape == (g * 5 + 4,)


# ---------------------------------------------------------------------- actions
def test_same_action_twice_gives_same_reward(env, base):
    rng = np.random.default_rng(0)
    action = rng.uniform(-1, 1, base["graph"].num_groups)
    assert_same_outcome(env, action, action)


def test_action_zero_is_initial_distribution(env, base):
    g = base["graph"].num_groups
    np.testing.assert_allclose(env.action_to_distribution(np.zeros(g)), base["graph"].initial_distribution(),
                               rtol=0, atol=1e-12)
    _, info = reward_of_action(env, np.zeros(g))
    np.testing.assert_allclose(info["distribution"], base["graph"].initial_distribution(), atol=1e-12)


def test_action_scale_shapes_the_distribution(env, base):
    g = base["graph"].num_groups
    init = base["graph"].initial_distribution()
    a = np.zeros(g)
    a[0] = 1.0
    d = env.action_to_distribution(a)
    # d_0 / d_1 == init_0 / init_1 * exp(action_scale)
    scale = base["settings"]["action_scale"]
    assert d[0] / d[1] == pytest.approx(init[0] / init[1] * np.exp(scale))
    assert d.sum() == pytest.approx(1.0)


def test_a_centre_makes_action_zero_its_distribution_until_the_base_changes(base):
    env, graph = new_env(base), base["graph"]
    g, scale = graph.num_groups, base["settings"]["action_scale"]
    centre = np.linspace(1.0, 2.0, g)
    centre /= centre.sum()
    env.set_centre(centre)
    np.testing.assert_allclose(env.action_to_distribution(np.zeros(g)), centre, rtol=1e-12)
    _, info = reward_of_action(env, np.zeros(g))          # what is scored is that distribution
    np.testing.assert_allclose(info["distribution"], centre, rtol=1e-12)
    a = np.zeros(g)
    a[0] = 0.5
    d = env.action_to_distribution(a)
    assert d[0] / d[1] == pytest.approx(centre[0] / centre[1] * np.exp(0.5 * scale))
    for bad in (centre[:-1], -centre, np.full(g, np.nan), np.zeros(g)):
        with pytest.raises(ValueError):
            env.set_centre(bad)
    env.set_base(base["payload"])                           # a new base: the initial distribution again
    np.testing.assert_allclose(env.action_to_distribution(np.zeros(g)), graph.initial_distribution(), atol=1e-12)
    env.set_centre(centre)
    env.set_centre(None)
    np.testing.assert_allclose(env.action_to_distribution(np.zeros(g)), graph.initial_distribution(), atol=1e-12)


def test_out_of_box_actions_are_clipped(env, base):
    g = base["graph"].num_groups
    wild = np.array([5.0, -7.0, 0.3, 100.0, -0.2, -1e6][:g] + [0.0] * max(0, g - 6))
    clipped = np.clip(wild, -1, 1)
    np.testing.assert_allclose(env.action_to_distribution(wild), env.action_to_distribution(clipped))
    assert_same_outcome(env, wild, clipped)


def test_nan_entries_count_as_zero(env, base):
    g = base["graph"].num_groups
    action = np.linspace(-0.8, 0.8, g)
    with_nan = action.copy()
    with_nan[[0, g - 1]] = np.nan
    as_zero = action.copy()
    as_zero[[0, g - 1]] = 0.0
    np.testing.assert_allclose(env.action_to_distribution(with_nan), env.action_to_distribution(as_zero))
    r_nan, i_nan = reward_of_action(env, with_nan)
    r_zero, _ = reward_of_action(env, as_zero)
    assert np.isfinite(r_nan) and r_nan == r_zero
    assert np.all(np.isfinite(i_nan["distribution"]))


@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_action_length_raises(env, base, delta):
    env.reset()
    with pytest.raises(ValueError):
        env.step(np.zeros(base["graph"].num_groups + delta, np.float32))


# ---------------------------------------------------------------------- rewards
def test_concentrating_on_a_sensitive_group_lowers_the_reward(env, base):
    g = base["graph"].num_groups
    uniform, _ = reward_of_action(env, np.zeros(g))
    concentrated = {}
    for k in range(g):
        a = -np.ones(g)
        a[k] = 1.0
        concentrated[k], info = reward_of_action(env, a)
        # the concentrated group takes the largest share of the removed filters
        assert info["counts"][k] / base["graph"].channels[k] == pytest.approx(
            max(info["counts"] / base["graph"].channels))
    worst = min(concentrated.values())
    assert worst < uniform - 0.1, (uniform, concentrated)


def test_info_contents(env, base):
    g = base["graph"].num_groups
    _, info = reward_of_action(env, np.zeros(g))
    for key in ("accuracy", "macs", "params", "distribution", "counts", "reward"):
        assert key in info
    assert int(np.sum(info["counts"])) == base["context"]["num_filters"]
    assert np.all(info["counts"] >= 0)
    assert np.all(info["counts"] <= base["graph"].channels - base["graph"].floors)
    assert info["macs"] < base["graph"].base_macs
    assert info["params"] < base["graph"].base_params
    assert 0.0 <= info["accuracy"] <= 1.0
    assert info["reward"] == info["accuracy"]          # reward="acc" (default)
    assert info["distribution"].shape == (g,) and info["distribution"].sum() == pytest.approx(1.0)


def test_flops_reward(base):
    env = new_env(base, reward="flops", reward_coef=0.25)
    rng = np.random.default_rng(1)
    for _ in range(3):
        reward, info = reward_of_action(env, rng.uniform(-1, 1, base["graph"].num_groups))
        expected = info["accuracy"] + 0.25 * (1.0 - info["macs"] / base["graph"].base_macs)
        assert reward == pytest.approx(expected, abs=1e-12)
        assert reward > info["accuracy"]


def test_bn_recalibration_is_deterministic_and_restores_buffers(base):
    env = new_env(base, bn_recalibration_batches=2)
    model = env.scorer.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    g = base["graph"].num_groups
    action = np.linspace(-0.5, 0.5, g)
    r1, i1 = reward_of_action(env, action)
    r2, i2 = reward_of_action(env, action)
    assert r1 == r2
    after = {k: v for k, v in model.state_dict().items()}
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert [m.momentum for m in bns] == momenta
    assert not any(m.training for m in model.modules())
    # recalibration really ran: it changes the pruned model's outputs. Compared on a
    # continuous measure (the mean cross-entropy): top-1 over 144 validation images
    # can come out equal with and without it, and did on another CPU.
    recalibrated, _ = reward_of_action(new_env(base, bn_recalibration_batches=2, reward_metric="loss"), action)
    plain, _ = reward_of_action(new_env(base, reward_metric="loss"), action)
    assert recalibrated != plain


# ---------------------------------------------------------------------- budget mode, horizon
def test_hard_budget_macs_target(base):
    graph = base["graph"]
    target = 0.7 * graph.base_macs
    ctx = make_context(graph, num_filters=None, cost_target={"kind": "macs", "value": target})
    ctx["num_filters"] = None
    env = new_env(base, payload=make_payload(base["model"], graph, ctx, version=0))
    for action in (np.zeros(graph.num_groups), np.linspace(-1, 1, graph.num_groups)):
        _, info = reward_of_action(env, action)
        assert info["macs"] <= target
        assert info["macs"] > 0.6 * graph.base_macs
        assert graph.cost(info["counts"])[0] == pytest.approx(info["macs"])


def test_horizon_three_substeps(base):
    graph = base["graph"]
    env = new_env(base, horizon=3)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    action = np.linspace(-0.3, 0.3, graph.num_groups)
    previous = np.zeros(graph.num_groups, np.int64)
    flags = []
    progress = []
    for t in range(3):
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs)
        assert not truncated
        flags.append(terminated)
        progress.append(obs[-1])
        counts = np.asarray(info["counts"])
        # the observation follows the episode: the widths left after its cuts, its last reward
        g = graph.num_groups
        np.testing.assert_allclose(obs[:g], (graph.channels - counts) / graph.channels, rtol=1e-6)
        assert obs[-4] == pytest.approx(reward, rel=1e-6)
        assert np.all(counts >= previous), (t, previous, counts)
        assert counts.sum() > previous.sum()
        previous = counts
    assert flags == [False, False, True]
    assert int(previous.sum()) == base["context"]["num_filters"]
    assert np.all(previous <= graph.channels - graph.floors)
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])
    # a new episode starts from nothing again
    obs, _ = env.reset()
    assert obs[-4] == 0.0 and np.allclose(obs[:graph.num_groups], 1.0)
    _, _, terminated, _, info = env.step(action)
    assert not terminated and info["counts"].sum() == pytest.approx(base["context"]["num_filters"] / 3, abs=1)


# ---------------------------------------------------------------------- new base model
def test_set_base_with_a_pruned_model(base):
    graph, config = base["graph"], base["config"]
    env = new_env(base)
    obs_space = env.observation_space
    size_before = env.observation_space.shape
    obs0, _ = env.reset()
    plan = env.evaluate_distribution(graph.initial_distribution())["counts"]
    small = graph.prune(plan)
    small.eval()
    graph2 = build_graph(config, small, base["data"], "cpu")
    assert graph2.keys == graph.keys
    np.testing.assert_array_equal(graph2.channels, graph.channels - plan)
    ctx2 = make_context(graph2, step=1, original=base["context"]["original"],
                        num_filters=int(0.1 * graph.total_channels))
    env.set_base(make_payload(small, graph2, ctx2, version=1))

    assert env.observation_space is obs_space and env.observation_space.shape == size_before
    np.testing.assert_array_equal(env.scorer.graph.channels, graph2.channels)
    assert env.scorer.version == 1
    obs, info = env.reset()
    assert info["version"] == 1
    assert env.observation_space.contains(obs)
    g = graph.num_groups
    original = graph.channels.astype(np.float64)
    np.testing.assert_allclose(obs[:g], graph2.channels / original, rtol=1e-6)
    assert not np.allclose(obs[:g], obs0[:g])
    # sparsity reached so far counts what the earlier step removed
    assert obs[-3] == pytest.approx(plan.sum() / graph.total_channels, rel=1e-6)
    assert obs[-2] == pytest.approx(1 / 5)
    _, reward, _, _, info = env.step(np.zeros(g))
    assert int(info["counts"].sum()) == ctx2["num_filters"]
    assert np.all(info["counts"] <= graph2.channels - graph2.floors)
    assert info["macs"] < graph2.base_macs < graph.base_macs
    assert 0.0 <= reward <= 1.0


def test_set_base_refuses_a_different_group_count(base):
    env = new_env(base)
    payload = copy.copy(base["payload"])
    payload["keys"] = list(payload["keys"])[:-1]
    with pytest.raises(ValueError):
        env.set_base(payload)


def test_observations_inside_space(base):
    env = new_env(base, horizon=2)
    rng = np.random.default_rng(3)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        assert obs.dtype == np.float32
        assert env.observation_space.contains(obs)
        done = False
        while not done:
            obs, _, done, _, _ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            assert env.observation_space.contains(obs), obs
            assert np.all(np.isfinite(obs))


# ---------------------------------------------------------------------- made on its own
def test_make_with_no_arguments_gives_a_small_default_problem():
    from envs.defaults import standalone_settings
    env = gymnasium.make(ENV_ID)
    try:
        check_env(env.unwrapped, skip_render_check=True)
        env.reset(seed=0)
        g = env.action_space.shape[0]
        _, reward, terminated, _, info = env.step(np.zeros(g, np.float32))
        assert terminated and 0.3 < reward <= 1.0                    # a trained model, 10% of its filters gone
        total = env.unwrapped.scorer.graph.total_channels
        assert int(info["counts"].sum()) == round(0.1 * total)
    finally:
        env.close()
    assert standalone_settings()["payload"] is standalone_settings()["payload"]   # made once per process


def test_make_with_documented_keyword_arguments(base_checkpoint):
    env = gymnasium.make(ENV_ID, base_checkpoint=str(base_checkpoint), sparsity=0.2, reward="flops",
                         criterion="l1")
    try:
        env.reset(seed=0)
        _, reward, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
        graph = env.unwrapped.scorer.graph
        assert int(info["counts"].sum()) == round(0.2 * graph.total_channels)
        assert reward == pytest.approx(info["accuracy"] + 0.25 * (1 - info["macs"] / graph.base_macs))
        unpruned = env.unwrapped.scorer.score(np.zeros(graph.num_groups, np.int64))["accuracy"]
        assert unpruned > 0.5                                        # the checkpoint's trained model
    finally:
        env.close()


@pytest.mark.parametrize("options, error, words", [
    ({"sparsty": 0.3}, "ConfigError", ["sparsty", "known", "sparsity"]),
    ({"sparsity": 1.5}, "ConfigError", ["sparsity must be < 1"]),
    ({"model": "nope"}, "ModelError", ["unknown model 'nope'"]),
    ({"reward": "speed"}, "ConfigError", ["reward must be one of"]),
])
def test_make_refuses_bad_arguments_in_one_line(options, error, words):
    with pytest.raises(Exception) as info:
        gymnasium.make(ENV_ID, **options)
    assert type(info.value).__name__ == error
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_config_and_keyword_options_together_are_refused(base):
    with pytest.raises(TypeError, match="not both"):
        LayerPruningEnv(base["settings"], sparsity=0.3)
