"""``rlpruner sweep`` / ``compare`` / ``report``: many compress runs as Ray Tune trials.

A *sweep* is a grid over target sparsity, search algorithm, reward, importance
criterion and seed; a *comparison* is the same machinery over algorithm x seed
at one sparsity. Every grid point is one Tune trial that runs
:func:`rlpruner_ray.pipeline.compress` in its own folder and, after each pruning
step, reports the step's metrics with a checkpoint of the run's resumable state
(``config.json``, ``base_model.pt``, the latest ``steps/step_NNN.pt``,
``history/``). A trial that fails is retried (``--max-failures``) and continues
after its last finished step; an interrupted sweep continues with
``--resume DIR`` (``Tuner.restore``), without redoing finished trials.

Layout of a sweep folder (``--out-dir``)::

    sweep.json            what was asked: base config, grid, storage, Tune settings
    trials/<name>/        each trial's compress folder (name from its grid point)
    tune/                 Ray Tune's experiment folder (unless --storage-path elsewhere)
    results.parquet       one row per trial and step; final test metrics on the last row
    pareto.png            test accuracy vs fraction of MACs kept, one curve per algorithm
    comparison.parquet    (compare) one row per algorithm, seed, step and evaluation
    comparison.png        (compare) best reward vs evaluations; test accuracy vs MACs
    paired.parquet/.csv   (compare) each algorithm against --reference: paired t interval of
                          the test top-1 difference, achieved reduction, compute, wall time
    log.txt               Ray's and Tune's own output (progress tables); -v shows it instead

Modules: ``plan`` (the grid, its checks, ``sweep.json``), ``trial`` (the Tune
trainable, its checkpoints and resources), ``run`` (the Tune run), ``storage``
(folder layout, URIs, reading trials back), ``outputs`` (tables, ``report``),
``plots``. This one holds the two hooks ``rlpruner_ray.cli`` calls.
"""
from __future__ import annotations

import argparse

from ..config import CRITERIA, REWARDS, CompressConfig
from .outputs import report_command
from .plan import COMPARE_ALGOS, COMPARE_TARGET, SweepPlan, load_plan, plan_for_resume, plan_from_args
from .run import run_sweep
from .storage import ROWS_FILE, SWEEP_FILE, local_dir_for, trial_name
from .trial import FAIL_ENV, trial_bundles
from .trial import _restore_into, _stage_checkpoint  # noqa: F401  (tests/test_sweep.py uses them)

__all__ = ["add_subcommand", "run_subcommand", "SweepPlan", "plan_from_args", "load_plan", "run_sweep",
           "report_command", "trial_name", "trial_bundles", "local_dir_for", "SWEEP_FILE", "ROWS_FILE",
           "FAIL_ENV"]

# each command's own output folder when --out-dir is left out (not compress's runs/default:
# a sweep there would sit among a compress run's files)
DEFAULT_OUT_DIRS = {"sweep": "runs/sweep", "compare": "runs/compare"}

_CONFIG_GROUPS = ["model", "data", "train", "target", "search", "rlpruner", "rllib", "workers", "finetune", "run"]


def add_subcommand(sub, name: str, add_fields) -> None:
    """Register ``sweep``, ``compare`` or ``report`` on the ``rlpruner`` parser."""
    if name == "report":
        p = sub.add_parser("report", help="rebuild the tables and plots of a (partial) sweep or comparison")
        p.add_argument("sweep_dir", metavar="DIR", help="the sweep's --out-dir")
        return
    if name == "sweep":
        p = sub.add_parser("sweep", help="Ray Tune sweep of compress runs over sparsity, algorithm, reward, "
                           "criterion and seed (one trial per grid point)")
        add_fields(p, _CONFIG_GROUPS, skip=("sparsity", "algo", "reward", "criterion", "seed", "resume"),
                   overrides=_out_dir_help(name))
        p.add_argument("--sparsity", dest="grid_sparsity", type=float, nargs="+", metavar="S",
                       default=argparse.SUPPRESS, help="target sparsities, one trial each (default 0.5)")
        p.add_argument("--algo", dest="grid_algo", nargs="+", metavar="ALGO", default=argparse.SUPPRESS,
                       help="search algorithms: rlpruner, random, uniform, global, ppo, sac, ... (default rlpruner)")
        p.add_argument("--reward", dest="grid_reward", nargs="+", choices=REWARDS, default=argparse.SUPPRESS,
                       help="rewards (default acc)")
        p.add_argument("--criterion", dest="grid_criterion", nargs="+", choices=CRITERIA,
                       default=argparse.SUPPRESS, help=f"importance criteria (default {CompressConfig.criterion})")
        default_seeds = 1
    elif name == "compare":
        p = sub.add_parser("compare", help="compare search algorithms over seeds at one sparsity (Ray Tune "
                           "trials): best reward per evaluation, test accuracy, MACs, wall time")
        # (plan_from_args gives compare its own default target, macs)
        add_fields(p, _CONFIG_GROUPS, skip=("algo", "seed", "resume"),
                   overrides={**_out_dir_help(name),
                              "target": {"help": f"what the sparsity counts: macs (every algorithm at one "
                                                 f"MACs target), params or filters (default: {COMPARE_TARGET})"}})
        p.add_argument("--algo", dest="grid_algo", nargs="+", metavar="ALGO", default=argparse.SUPPRESS,
                       help=f"algorithms to compare (default {' '.join(COMPARE_ALGOS)})")
        p.add_argument("--reference", dest="reference", metavar="ALGO", default=argparse.SUPPRESS,
                       help="the algorithm every other is paired against, seed by seed (default: the first "
                            "--algo)")
        default_seeds = 3
    else:
        raise ValueError(f"unknown sweep subcommand {name!r}")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", dest="seed_count", type=int, metavar="N", default=argparse.SUPPRESS,
                       help=f"run seeds 0..N-1 (default {default_seeds})")
    seeds.add_argument("--seed-list", dest="seed_list", type=int, nargs="+", metavar="SEED",
                       default=argparse.SUPPRESS, help="run exactly these seeds")
    p.add_argument("--storage-path", dest="storage_path", default=argparse.SUPPRESS, metavar="URI",
                   help="where Ray Tune keeps trial results and checkpoints: a local folder or any URI Tune "
                        "accepts (s3://, gs://, ...); default the --out-dir")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="at most N trials at once (default: as many as the cluster fits)")
    p.add_argument("--max-failures", dest="max_failures", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="retries of a failed trial, each from its last checkpoint (default 2)")
    p.add_argument("--resume", dest="resume_dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="continue the interrupted sweep in DIR with its saved settings")
    p.set_defaults(sweep_kind=name, default_seed_count=default_seeds, default_out_dir=DEFAULT_OUT_DIRS[name])


def _out_dir_help(name: str) -> dict:
    return {"out_dir": {"help": f"output folder of the {name}: trial folders, tables, plots "
                                f"(default: {DEFAULT_OUT_DIRS[name]})"}}


def run_subcommand(args, make_config) -> int:
    """Run the parsed ``sweep``, ``compare`` or ``report`` command; its exit code."""
    quiet = bool(getattr(args, "quiet", False))
    verbose = bool(getattr(args, "verbose", False))
    if args.command == "report":
        return report_command(args.sweep_dir)
    if hasattr(args, "resume_dir"):
        plan = plan_for_resume(args)
        return run_sweep(plan, ray_address=getattr(args, "ray_address", None), quiet=quiet, resume=True,
                         verbose=verbose)
    plan = plan_from_args(args, make_config)
    return run_sweep(plan, ray_address=getattr(args, "ray_address", None), quiet=quiet, resume=False,
                     overwrite=bool(getattr(args, "overwrite", False)), verbose=verbose)
