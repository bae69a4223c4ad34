"""Running a sweep: refuse what cannot fit before Ray starts, then run (or
continue) the grid as Ray Tune trials and write the result files."""
from __future__ import annotations

import logging
import os
import sys

from ..errors import ConfigError
from .outputs import write_outputs
from .plan import GRID_KEYS, SweepPlan
from .storage import SWEEP_FILE, clear, publish, read_sweep_file, trial_error, trial_name, trial_status
from .trial import resources_fn, run_trial, trial_bundles

log = logging.getLogger("rlpruner_ray")


def run_sweep(plan: SweepPlan, *, ray_address: str | None = None, quiet: bool = False, resume: bool = False,
              overwrite: bool = False, verbose: bool = False) -> int:
    """Check, then run (or continue) the sweep; write the result files; print the table.
    Ray's and Tune's own output (Tune's progress tables) goes to ``log.txt`` in the
    sweep's folder unless ``verbose``; the terminal gets ``[rlpruner]`` lines and a
    progress bar over trials. Returns 0 when every trial finished, 1 otherwise."""
    import contextlib
    from .. import console
    with (contextlib.nullcontext() if verbose else console.foreign_output_to_log(plan.root)):
        _run(plan, ray_address=ray_address, quiet=quiet, resume=resume, overwrite=overwrite)
    return _finish(plan)


def _run(plan: SweepPlan, *, ray_address, quiet: bool, resume: bool, overwrite: bool) -> None:
    import ray
    from ..checkpoint import atomic_write_json
    from ..cluster_offer import has_autoscaler
    from .. import console
    from ..runtime import init_ray, local_offer, private_ray_running, shutdown_ray

    root = plan.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir {root} exists and is not a folder")
    if not resume and not overwrite and read_sweep_file(plan.out_dir) is not None:
        raise ConfigError(f"{plan.out_dir} already holds a {plan.kind}; continue it with --resume "
                          f"{plan.out_dir} or pass --overwrite")
    own_ray = not ray.is_initialized()
    if own_ray and not ray_address:
        fit_default_workers(plan, local_offer())
        check_trials_fit(plan, local_offer())      # refuse before Ray starts or anything is written
    try:
        init_ray(ray_address, root)
        if not private_ray_running() and not has_autoscaler():
            fit_default_workers(plan, ray.cluster_resources())
        check_trials_fit(plan, None)               # what the cluster really offers (or its autoscaler will)
        if overwrite and not resume:
            clear(plan)
        root.mkdir(parents=True, exist_ok=True)
        console.attach_log(root)
        if not resume or not (root / SWEEP_FILE).is_file():
            atomic_write_json(root / SWEEP_FILE, plan.to_dict())
            publish(plan, [SWEEP_FILE])
        _fit(plan, quiet=quiet, resume=resume)
    finally:
        if own_ray:
            shutdown_ray()


def _finish(plan: SweepPlan) -> int:
    """Write the result files and tables; say what did not finish. Exit code."""
    rows = write_outputs(plan)
    status = trial_status(plan, rows)
    errors = [n for n, st in status.items() if st == "error"]
    if status and not any(st == "done" for st in status.values()):
        first = f"; {errors[0]}: {trial_error(plan, errors[0])}" if errors else ""
        log_file = plan.root / "log.txt"
        print(f"rlpruner: none of the {len(status)} trials finished{first}; nothing to rank or plot"
              + (f" (see {log_file})" if log_file.is_file() else ""), file=sys.stderr)
        return 1
    for name in errors:
        print(f"rlpruner: trial {name}: {trial_error(plan, name)}", file=sys.stderr)
    unfinished = [n for n, st in status.items() if st not in ("done", "error")]
    if unfinished:
        print(f"rlpruner: {len(unfinished)} of {len(status)} trials did not finish ({', '.join(unfinished)}); "
              f"see {plan.experiment_path} and continue with rlpruner {plan.kind} --resume {plan.out_dir}",
              file=sys.stderr)
    return 1 if unfinished or "error" in status.values() else 0


def check_trials_fit(plan: SweepPlan, offered: dict | None) -> None:
    """Refuse a grid point whose trial can never fit the cluster (or this machine).
    On a cluster whose autoscaler must first add nodes, wait (up to
    ``--autoscale-timeout``) until the largest such trial fits: Tune's placement
    groups then ask the autoscaler for the rest."""
    from ..cluster_offer import check_request, total, wait_for_request
    waiting = []
    for params in plan.grid_points():
        bundles = trial_bundles(plan.trial_config(params))
        what = f"one trial ({trial_name(params)})"
        if not check_request(bundles, what, offered=offered):
            waiting.append((bundles, what, params))
    if waiting:
        def size(w):
            need = total(w[0])
            return need.get("GPU", 0.0), need.get("CPU", 0.0)
        bundles, what, params = max(waiting, key=size)
        wait_for_request(bundles, what, timeout_s=plan.trial_config(params).autoscale_timeout)


def fit_default_workers(plan: SweepPlan, offered: dict) -> None:
    """Without ``--num-workers``, give each trial as many evaluation actors (at most
    the default) as let one trial fit what a fixed cluster or this machine offers,
    and say so in one line; an explicit request is checked as given."""
    from ..cluster_offer import describe, shortfall, total
    if not plan.fit_workers:
        return
    default = plan.base["num_workers"]

    def fits(n: int) -> bool:
        plan.base["num_workers"] = n
        return all(shortfall(total(trial_bundles(plan.trial_config(p))), offered) is None
                   for p in plan.grid_points())

    chosen = next((n for n in range(default, 0, -1) if fits(n)), default)
    plan.base["num_workers"] = chosen
    if chosen != default:
        log.info("each trial gets %d evaluation actor(s) instead of the default %d, so that one trial fits the "
                 "%s on offer (--num-workers sets it)", chosen, default, describe(offered))


def _fit(plan: SweepPlan, *, quiet: bool, resume: bool) -> None:
    from ray import tune
    # num_to_keep forces an experiment snapshot per checkpoint: intended (the saved
    # state never names a deleted checkpoint), so no warning about it
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    plan_dict = plan.to_dict()
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan_dict),
                                    resources=resources_fn(plan_dict))
    if resume and tune.Tuner.can_restore(plan.experiment_path):
        tuner = tune.Tuner.restore(plan.experiment_path, trainable=trainable, resume_errored=True)
    else:
        if resume:
            log.info("no Tune state in %s: running the sweep again (finished trials are not redone)",
                     plan.experiment_path)
        tuner = tune.Tuner(
            trainable,
            param_space={k: tune.grid_search(plan.grid[k]) for k in GRID_KEYS},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, reuse_actors=False,
                                        trial_name_creator=_trial_label, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=plan.name, storage_path=plan.storage_path,
                failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[_trial_progress(len(plan.grid_points()))],
                verbose=0 if quiet else 1),
        )
    tuner.fit()


def _trial_progress(total: int):
    """A Tune callback: a progress bar over trials on the terminal, and one
    ``[rlpruner]`` line per trial that ends (Tune's own tables go to log.txt)."""
    from ray.tune import Callback
    from .. import console

    class TrialProgress(Callback):
        def __init__(self):
            self.bar = None      # made on first use: Tune pickles its callbacks, a bar holds a stream

        def __getstate__(self):
            return {**self.__dict__, "bar": None}

        def setup(self, **info):
            self.bar = console.Progress(total, "trials")

        def _ended(self, trial, how: str) -> None:
            if self.bar is None:       # (not set up: a restored experiment)
                self.bar = console.Progress(total, "trials")
            self.bar.update()
            log.info("trial %s %s (%d of %d)", trial_name(trial.config), how, self.bar.done, total)

        def on_trial_complete(self, iteration, trials, trial, **info):
            error = (trial.last_result or {}).get("error")
            self._ended(trial, f"refused its settings: {error}" if error else "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "failed")

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def _trial_label(trial) -> str:
    return trial_name(trial.config)


def _trial_dirname(trial) -> str:
    return f"{trial_name(trial.config)}_{trial.trial_id}"
