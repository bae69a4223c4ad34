"""Every default a command's --help states is what the command does without the
flag: parsed from the help text itself, compared with the value the command then
uses (the config a run would get, or a sweep's plan)."""
from __future__ import annotations

import argparse
import re

import pytest

from rlpruner_ray.cli import _config, build_parser
from rlpruner_ray.config import CompressConfig

DEFAULT = re.compile(r"\(default:? ([^()]*(?:\([^()]*\)[^()]*)*)\)")
# defaults that describe a behaviour rather than state a value
DESCRIBED = {("verbose", "in log.txt in the output folder"),
             ("max_concurrent", "as many as the cluster fits"), ("rl_num_env_runners", "num_workers"),
             ("step_fraction", "all of --sparsity in one step; paper: 0.01"),
             ("image_size", "the dataset's"), ("finetune_batch_size", "--batch-size"),
             ("candidates_per_pass", "from free GPU memory, 8 on a CPU"),
             ("split_seed", "--seed"),
             ("finetune_batches", "--finetune-epochs whole epochs; set, it replaces --finetune-epochs")}
POSITIONALS = {"evaluate": ["model.pt"], "report": ["somewhere"]}


def _subparsers():
    parser = build_parser()
    return parser, parser._subparsers._group_actions[0].choices


def _stated(action) -> str | None:
    found = DEFAULT.search(" ".join((action.help or "").split()))
    return found.group(1) if found else None


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _effective(command: str, dest: str, args: argparse.Namespace):
    """The value ``command`` uses for ``dest`` when the flag is left out."""
    if command in ("sweep", "compare"):
        from rlpruner_ray.sweep import plan_from_args
        from rlpruner_ray.sweep.storage import resolve_location
        plan = plan_from_args(args, _config)
        grid = {"grid_sparsity": "sparsity", "grid_algo": "algo", "grid_reward": "reward",
                "grid_criterion": "criterion"}
        if dest == "out_dir":   # made absolute by the plan: compare with the stated folder made so
            return plan.out_dir, resolve_location
        if dest in grid:
            return plan.grid[grid[dest]], None
        if dest == "seed_count":
            return len(plan.grid["seed"]), None
        if dest == "max_failures":
            return plan.max_failures, None
        if dest == "reference":   # stated as "the first --algo": the first of the default algorithms
            return plan.reference, lambda stated: plan.grid["algo"][0] if stated == "the first --algo" else stated
        return getattr(plan.trial_config({k: v[0] for k, v in plan.grid.items()}), dest), None
    if hasattr(args, dest):       # an argparse default the command reads as it is
        return getattr(args, dest), None
    return getattr(_config(args), dest), None


@pytest.mark.parametrize("command", ["compress", "train", "evaluate", "prune", "sweep", "compare"])
def test_help_defaults_are_what_the_command_does_without_the_flag(command):
    parser, subs = _subparsers()
    checked = 0
    for action in subs[command]._actions:
        stated = _stated(action)
        if stated is None or (action.dest, stated) in DESCRIBED:
            continue
        args = parser.parse_args([command, *POSITIONALS.get(command, [])])
        value, normalise = _effective(command, action.dest, args)
        assert _shown(value) == (normalise(stated) if normalise else stated), (command, action.dest)
        checked += 1
    assert checked >= 3, command


def test_every_described_default_is_still_in_some_help():
    """(the list above stays honest: a default that stopped being described is checked)"""
    parser, subs = _subparsers()
    found = {(a.dest, _stated(a)) for p in [parser, *subs.values()] for a in p._actions if _stated(a)}
    assert DESCRIBED <= found, DESCRIBED - found


def test_sweep_and_compare_get_their_own_folder_without_out_dir():
    from rlpruner_ray.sweep import plan_from_args
    from rlpruner_ray.sweep.storage import resolve_location
    parser, _ = _subparsers()
    for command, folder in (("sweep", "runs/sweep"), ("compare", "runs/compare")):
        plan = plan_from_args(parser.parse_args([command]), _config)
        assert plan.out_dir == resolve_location(folder) != resolve_location(CompressConfig().out_dir)


def test_env_examples_help_is_complete():
    """scripts/env_examples.py --help: the whole description (not a sentence cut at its
    first line) and help, with its default, for every option."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "env_examples.py"
    spec = importlib.util.spec_from_file_location("env_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    text = parser.format_help()
    assert " ".join(module.__doc__.split()) in " ".join(text.split())
    for action in parser._actions:
        assert action.help, action.dest
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(action.help.split()), action.dest
