"""RLlib policies as search algorithms: full runs, exact budgets, new base models
reaching every env runner, env runner restarts, and fast refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from rlpruner_ray.config import CompressConfig


def _cli(args):
    return subprocess.run([sys.executable, "-m", "rlpruner_ray", "-q", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "sac"])
def test_full_compress_with_rllib(tmp_path, base_checkpoint, algo):
    out = tmp_path / algo
    r = _cli(["compress", "--out-dir", str(out), "--base-checkpoint", str(base_checkpoint), "--algo", algo,
              "--sparsity", "0.2", "--step-fraction", "0.1", "--evaluations-per-step", "11", "--rl-batch-size", "10",
              "--num-workers", "2", "--finetune-epochs", "1", "--max-batches-per-epoch", "3", "--incumbent-rule"])
    assert r.returncode == 0, r.stderr
    for name in ("summary.json", "history.parquet", "pruned_model.pt", "report.png"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [s["evaluations"] for s in summary["steps"]] == [11, 11]
    rows = pq.read_table(out / "history.parquet").to_pylist()
    assert len(rows) == 22
    for step in (1, 2):
        mine = [row for row in rows if row["step"] == step]
        assert sorted(row["evaluation"] for row in mine) == list(range(11))   # none lost or duplicated
        assert sum(row["chosen"] for row in mine) == 1
        assert [row["source"] for row in mine].count("policy") == 1          # the deterministic action
        # the starting candidates every search shares, scored on the driver first
        assert [row["source"] for row in sorted(mine, key=lambda r: r["evaluation"])[:3]] == [
            "uniform", "global", "tp-global"]
        # the best by reward, unless the incumbent rule kept the best starting candidate
        starting = sorted(mine, key=lambda r: r["evaluation"])[:3]
        applied = summary["steps"][step - 1]["incumbent_rule"]["applied"]
        best = max(row["reward"] for row in (mine if applied == "challenger" else starting))
        assert [row for row in mine if row["chosen"]][0]["reward"] == best
    assert all(row["algo"] == algo for row in rows)
    assert any(row["learner_stats"] for row in rows if row["source"] == "sample")
    assert (out / "steps" / "step_002_algo").is_dir()                        # RLlib checkpoint in the step state
    assert not (tmp_path / "ray_results").exists()


@pytest.fixture(scope="module")
def rllib_setup(tmp_path_factory, ray_session, base_checkpoint, digits16):
    """A model store on the shared Ray with the base model, and its graph."""
    ray = ray_session
    from rlpruner_ray.checkpoint import load_pruned
    from rlpruner_ray.pipeline import build_graph
    from rlpruner_ray.search.workers import make_payload, start_store
    out = tmp_path_factory.mktemp("rl")
    # (the ticket mechanics these tests exercise: no starting candidates on the driver)
    config = CompressConfig(algo="ppo", num_workers=2, evaluations_per_step=201, rl_batch_size=10,
                            out_dir=str(out), image_size=16, include_baselines=False)
    model = load_pruned(base_checkpoint)
    graph = build_graph(config, model, digits16, "cpu")
    original = graph.sizes()
    store, name = start_store()

    def publish(m, g, version):
        ctx = {"step": version, "num_steps": 3, "original": original,
               "num_filters": int(0.1 * original["total_channels"])}
        ray.get(store.publish.remote(make_payload(m, g, ctx, version)))

    publish(model, graph, 0)
    yield {"config": config, "model": model, "graph": graph, "store": store, "name": name,
           "publish": publish, "digits": digits16}
    ray.kill(store)


def _search(setup, step, budget, rows):
    from rlpruner_ray.search.base import Evaluator, StepContext
    from rlpruner_ray.search.rllib import RLlibSearch

    class Recording(RLlibSearch):
        def _record(self, evaluate, row, stats):
            rows.append(row)
            super()._record(evaluate, row, stats)
    return Recording, Evaluator(lambda ds: None, budget), StepContext(step, 3, setup["graph"],
                                                                     np.random.default_rng(step))


def test_a_spent_budget_releases_synchronous_env_runners_unscored(rllib_setup):
    """Every ticket recorded: a synchronous algorithm's environment answers at once,
    unscored, with the step's mean reward; an asynchronous one waits until closed."""
    import ray
    import envs
    from rlpruner_ray.search.workers import env_settings
    store = rllib_setup["store"]
    env = envs.LayerPruningEnv({**env_settings(rllib_setup["config"], store=rllib_setup["name"], device="cpu"),
                                "budgeted": True})
    obs, _ = env.reset(seed=0)
    version = ray.get(store.version.remote())
    action = np.zeros(env.action_space.shape, np.float32)
    ray.get(store.begin_step.remote(version, 2, 60.0, release_when_spent=True))
    rewards = [env.step(action)[1] for _ in range(2)]                    # the two tickets: scored
    deadline = time.time() + 30                                          # records are fire-and-forget
    while ray.get(store.status.remote())["ready"] < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    assert ray.get(store.status.remote()) == {"available": 0, "outstanding": 0, "ready": 2}
    _, reward, terminated, _, info = env.step(action)
    assert info == {"unscored": True} and terminated
    assert reward == pytest.approx(np.mean(rewards))
    assert ray.get(store.status.remote())["ready"] == 2                  # nothing recorded, nothing scored

    ray.get(store.begin_step.remote(version, 0, 60.0, release_when_spent=False))
    answer = []
    waiter = threading.Thread(target=lambda: answer.append(env.step(action)))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive() and not answer                              # asynchronous: waits for tickets
    ray.get(store.close.remote())
    waiter.join(timeout=30)
    assert answer and answer[0][4] == {"closed": True}


def test_budgeted_envs_take_the_steps_centre_from_the_store(rllib_setup):
    """Around the incumbent, the driver gives the store the step's centre: a budgeted
    env's action 0 is scored as that distribution, and only for that base version."""
    import ray
    import envs
    from rlpruner_ray.search.workers import env_settings
    store, graph = rllib_setup["store"], rllib_setup["graph"]
    env = envs.LayerPruningEnv({**env_settings(rllib_setup["config"], store=rllib_setup["name"], device="cpu"),
                                "budgeted": True})
    env.reset(seed=0)
    version = ray.get(store.version.remote())
    centre = np.linspace(1.0, 3.0, graph.num_groups)
    centre = (centre / centre.sum()).tolist()
    ray.get(store.begin_step.remote(version, 1, 60.0, release_when_spent=True, centre=centre))
    assert ray.get(store.centre.remote(version)) == centre and ray.get(store.centre.remote(version + 1)) is None
    # the centre comes with the tickets, in one call; no ticket, no centre
    ray.get(store.begin_step.remote(version, 1, 60.0, release_when_spent=True, centre=centre))
    tickets, got = ray.get(store.take_tickets_and_centre.remote(version, 2))
    assert len(tickets) == 1 and got == centre
    assert ray.get(store.take_tickets_and_centre.remote(version + 1, 1)) == (None, None)
    ray.get(store.begin_step.remote(version, 1, 60.0, release_when_spent=True, centre=centre))
    _, _, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
    np.testing.assert_allclose(info["distribution"], centre, rtol=1e-12)
    deadline = time.time() + 30
    while ray.get(store.status.remote())["ready"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    row, = ray.get(store.drain.remote())
    np.testing.assert_allclose(row["distribution"], centre, rtol=1e-12)
    ray.get(store.begin_step.remote(version, 0, 60.0))            # a step without a centre: none


def test_a_vector_env_takes_its_tickets_at_once(rllib_setup):
    """Three sub-envs, two tickets left: both are taken in one call and scored in one
    batch, the third sub-env answers unscored; a runner never holds part of what it
    needs while waiting for the rest."""
    import ray
    from envs.vector import LayerPruningVectorEnv
    from rlpruner_ray.search.workers import env_settings
    store = rllib_setup["store"]
    vec = LayerPruningVectorEnv({**env_settings(rllib_setup["config"], store=rllib_setup["name"], device="cpu"),
                                 "budgeted": True}, num_envs=3)
    vec.reset(seed=0)
    version = ray.get(store.version.remote())
    ray.get(store.begin_step.remote(version, 5, 60.0, release_when_spent=True))
    assert len(ray.get(store.take_tickets.remote(version, 3))) == 3          # three at once
    assert ray.get(store.status.remote())["available"] == 2
    ray.get(store.begin_step.remote(version, 2, 60.0, release_when_spent=True))
    actions = np.zeros((3, *vec.single_action_space.shape), np.float32)
    _, rewards, terminated, _, _ = vec.step(actions)
    assert terminated.all()
    deadline = time.time() + 30
    while ray.get(store.status.remote())["ready"] < 2:
        assert time.time() < deadline
        time.sleep(0.05)
    status = ray.get(store.status.remote())
    assert status == {"available": 0, "outstanding": 0, "ready": 2}
    assert rewards[2] == pytest.approx(np.mean(rewards[:2]))            # unscored: the step's mean


@pytest.mark.slow
def test_env_runners_follow_new_base_and_survive_a_kill(rllib_setup, monkeypatch):
    import ray
    from rlpruner_ray.pipeline import build_graph
    from rlpruner_ray.search import rllib as rl
    monkeypatch.setattr(rl, "TICKET_TIMEOUT_S", 5.0)
    setup = rllib_setup
    rows: list[dict] = []
    cls, evaluator, ctx = _search(setup, 0, 21, rows)
    search = cls(setup["config"], store_name=setup["name"])
    try:
        search.search(ctx, evaluator)
        assert evaluator.used == 21 and len(rows) == 20
        assert search.batches == [(10, 10), (10, 10)]         # the plan, as RLlib sampled it
        pids = {row["pid"] for row in rows}
        assert len(pids) == 2                                     # both env runners evaluated

        # -- an outer step: a physically smaller base model, published as version 1
        plan = setup["graph"].plan(setup["graph"].initial_distribution(), int(0.1 * setup["graph"].total_channels))
        small = setup["graph"].prune(plan)
        graph1 = build_graph(setup["config"], small, setup["digits"], "cpu")
        setup["publish"](small, graph1, 1)
        rows.clear()
        _, evaluator, ctx = _search(setup, 1, 201, rows)
        ctx.graph = graph1

        # -- kill one env runner while the step's search runs
        done = threading.Event()
        worker = threading.Thread(target=lambda: (search.search(ctx, evaluator), done.set()))
        worker.start()
        deadline = time.time() + 120
        store = setup["store"]
        # mid-train (rows recorded but not yet drained): RLlib then loses the victim's
        # steps and asks for more samples than tickets are left
        while len(rows) < 10 or ray.get(store.status.remote())["ready"] < 1:
            assert time.time() < deadline and worker.is_alive()
            time.sleep(0.01)
        victim = rows[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        worker.join(timeout=400)
        assert done.is_set(), "search did not finish after an env runner was killed"
        assert evaluator.used == 201
        assert sorted(c.index for c in evaluator.candidates) == list(range(201))
        assert all(row["version"] == 1 for row in rows)
        assert all(row["channels"] == graph1.channels.tolist() for row in rows)   # every runner: new base
        restarted = {row["pid"] for row in rows} - pids
        assert restarted, "no restarted env runner evaluated"
    finally:
        search.close()


def test_unsupported_algorithm_and_unmeetable_resources_fail_fast(tmp_path, capsys):
    from rlpruner_ray.cli import main
    out = tmp_path / "run"
    for extra, needle in [(["--algo", "dqn"], "continuous"),
                          (["--algo", "ppo", "--rl-num-learners", "4"], "CPU"),
                          (["--algo", "appo", "--gpus-per-worker", "0.5"], "GPU"),
                          (["--algo", "ppo", "--evaluations-per-step", "2"], "--evaluations-per-step")]:
        start = time.time()
        code = main(["-q", "compress", "--out-dir", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        line = [ln for ln in err.splitlines() if ln.startswith("rlpruner")]
        assert len(line) == 1 and needle in line[0], (extra, err)
        assert time.time() - start < 60
        assert not out.exists()


@pytest.mark.slow
def test_policy_checkpoint_restores_the_policy(rllib_setup, tmp_path):
    """What --resume relies on: the step state's RLlib checkpoint brings the policy back."""
    import ray
    import torch
    from rlpruner_ray.search.base import Evaluator, StepContext
    from rlpruner_ray.search.rllib import RLlibSearch
    setup = rllib_setup
    version = ray.get(setup["store"].version.remote())
    config = setup["config"].replace(evaluations_per_step=15)    # 14 tickets: batches of 10 and 4
    first = RLlibSearch(config, store_name=setup["name"])
    try:
        ctx = StepContext(version, 3, setup["graph"], np.random.default_rng(0))
        first.search(ctx, Evaluator(lambda ds: None, 15))
        assert first.batches == [(10, 10), (4, 4)]          # RLlib sampled the plan, short batch last
        first.save_extra(tmp_path / "algo")
        trained = {k: v.clone() for k, v in first.algo.get_module().state_dict().items()}
    finally:
        first.close()
    second = RLlibSearch(config, store_name=setup["name"])
    try:
        fresh = second.algo.get_module().state_dict()
        assert any(not torch.equal(fresh[k], trained[k]) for k in trained)   # learning changed the policy
        second.load_extra(tmp_path / "algo")
        restored = second.algo.get_module().state_dict()
        assert all(torch.equal(restored[k], trained[k]) for k in trained)
    finally:
        second.close()


@pytest.mark.slow
def test_ppo_with_learning_rate_0_proposes_without_learning(rllib_setup):
    """The null baseline: the same proposal as PPO (samples of the initial policy),
    and the policy's weights never change. Its starting candidates are scored on
    the driver through the step's evaluator, inside the budget."""
    import ray
    import torch
    from rlpruner_ray.search.base import Evaluator, StepContext
    from rlpruner_ray.search.rllib import RLlibSearch
    setup = rllib_setup
    # the setup's own model and graph as this step's base (an earlier test may have published another)
    version = ray.get(setup["store"].version.remote()) + 1
    setup["publish"](setup["model"], setup["graph"], version)
    config = setup["config"].replace(evaluations_per_step=15, rl_lr=0.0, include_baselines=True, rl_batch_size=4)
    search = RLlibSearch(config, store_name=setup["name"])
    try:
        before = {k: v.clone() for k, v in search.algo.get_module().state_dict().items()}
        evaluator = Evaluator(search.score, 15)
        extras = {"num_filters": int(0.1 * setup["graph"].total_channels)}     # the published step's target
        search.search(StepContext(version, 3, setup["graph"], np.random.default_rng(0), extras=extras), evaluator)
        assert search.iteration >= 2                                          # it did train
        after = search.algo.get_module().state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
    finally:
        search.close()
    assert evaluator.used == 15
    assert [c.source for c in evaluator.candidates[:3]] == ["uniform", "global", "tp-global"]
    samples = [c.distribution for c in evaluator.candidates if c.source == "sample"]
    assert len(samples) >= 4 and not np.allclose(samples[0], samples[1])    # it still explores


def test_batch_plan_keeps_the_asked_batch_except_the_last():
    """Every budget from 3 to 400 on several env layouts and batch sizes: the batches
    spend exactly the env runners' tickets in whole rounds, none is below the asked
    size but the last, and the rollout fragment divides every batch."""
    from rlpruner_ray.errors import ConfigError
    from rlpruner_ray.search.rllib import batch_plan
    base = CompressConfig(algo="ppo")
    for runners, envs in [(1, 1), (2, 1), (3, 1), (2, 2), (3, 3)]:
        n_envs = runners * envs
        for asked in (1, 5, 20, 32):
            config = base.replace(num_workers=runners, rl_envs_per_env_runner=envs, rl_batch_size=asked)
            for budget in range(3, 401):
                if budget <= n_envs:
                    with pytest.raises(ConfigError, match="evaluations_per_step"):
                        batch_plan(config.replace(evaluations_per_step=budget))
                    continue
                plan = batch_plan(config.replace(evaluations_per_step=budget))
                assert plan.tickets == (budget - 1) // n_envs * n_envs
                assert sum(plan.batches) == plan.tickets
                assert all(b % n_envs == 0 and b > 0 for b in plan.batches)
                assert all(b >= asked for b in plan.batches[:-1]), (runners, envs, asked, budget, plan)
                assert all(b == plan.full for b in plan.batches[:-1])
                assert plan.full - n_envs < asked <= plan.full                # asked, rounded up to rounds
                assert all(b % (plan.fragment * n_envs) == 0 for b in plan.batches)
    issue = batch_plan(base.replace(num_workers=2, evaluations_per_step=40, rl_batch_size=20))
    assert issue.batches == (20, 18) and issue.fragment == 1


def test_the_training_loop_sets_each_iterations_batch():
    """The loop's batch for a synchronous algorithm, fed the tickets left after each
    iteration, walks the plan; RLlib's config gets it (and PPO's minibatch follows)."""
    from rlpruner_ray.search.rllib import RLlibSearch, batch_plan, build_algorithm_config
    config = CompressConfig(algo="ppo", num_workers=2, evaluations_per_step=40, rl_batch_size=20)
    plan = batch_plan(config)
    search = RLlibSearch.__new__(RLlibSearch)
    search.config, search.plan = config, plan
    search.algo = type("Algo", (), {})()
    search.algo.config = build_algorithm_config(config, {})
    search.algo.config.freeze()
    left, seen = plan.tickets, []
    while left:
        seen.append(search._next_batch(left))
        assert search.algo.config.train_batch_size_per_learner == seen[-1]
        assert search.algo.config.minibatch_size == min(seen[-1], 32)
        left -= seen[-1]
    assert tuple(seen) == plan.batches == (20, 18)
    assert search.algo.config.rollout_fragment_length == plan.fragment


@pytest.mark.parametrize("budget", [8, 11, 40, 41, 201])
def test_the_built_config_passes_rllibs_batch_check_on_short_budgets(budget):
    """RLlib checks the train batch against the rollout fragment when it builds the
    algorithm; a budget below one full batch (11 evaluations, 3 of them starting
    candidates, --rl-batch-size 10) must still build."""
    from rlpruner_ray.search.rllib import batch_plan, build_algorithm_config
    config = CompressConfig(algo="ppo", num_workers=2, evaluations_per_step=budget, rl_batch_size=10)
    built = build_algorithm_config(config, {})
    built.validate_train_batch_size_vs_rollout_fragment_length()       # raises when they disagree
    assert built.train_batch_size_per_learner == batch_plan(config).batches[0]
