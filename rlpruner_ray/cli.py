"""The ``rlpruner`` command. The only module that prints for humans and sets exit
codes: bad input gives one line on stderr and exit code 2, nothing written."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import warnings

from . import console
from .config import CRITERIA, CompressConfig, field_groups
from .errors import RLPrunerError, StepFailed

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        message = " ".join(str(message).splitlines())   # argparse quotes stray arguments raw
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# titles of the config's field groups in --help
SECTION_TITLES = {"data": "data", "model": "model", "train": "base training", "target": "target",
                  "search": "search", "rlpruner": "rlpruner algorithm", "rllib": "RLlib policies (--algo ppo, ...)",
                  "workers": "workers", "finetune": "fine-tuning", "run": "run"}


def _help_with_default(f: dataclasses.Field) -> str:
    """The field's help plus its default (defaults are the config's, not argparse's:
    options left out are left out of the config too)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None or default is False or default == ():
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {default:g})" if isinstance(default, float) \
        else f"{f.metadata['help']} (default: {default})"


def _add_fields(parser: argparse.ArgumentParser, groups, *, skip=(), overrides=None) -> None:
    overrides = overrides or {}
    fields = field_groups()
    for group in groups:
        section = parser.add_argument_group(SECTION_TITLES.get(group, group))
        for f in fields[group]:
            if f.name in skip:
                continue
            opt = "--" + f.name.replace("_", "-")
            meta = f.metadata
            kind = f.type.replace(" | None", "")
            kwargs = dict(help=_help_with_default(f), dest=f.name, default=argparse.SUPPRESS)
            kwargs.update(overrides.get(f.name, {}))
            if kind == "bool":
                # a flag that is on by default needs its --no- form to be turned off
                action = argparse.BooleanOptionalAction if f.default is True else "store_true"
                section.add_argument(opt, action=action, **kwargs)
            elif kind == "tuple":
                section.add_argument(opt, nargs="*", metavar="NAME", **kwargs)
            else:
                conv = {"int": int, "float": float, "str": str}[kind]
                kwargs.setdefault("type", conv)
                if meta.get("choices") and "choices" not in kwargs:
                    kwargs["choices"] = meta["choices"]
                section.add_argument(opt, **kwargs)


def _config(args, **extra) -> CompressConfig:
    names = {f.name for f in dataclasses.fields(CompressConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    return CompressConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}).validate()


_USAGE = "%(prog)s [options]"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlpruner", description="Structured filter pruning of CNNs, with the pruning "
                "distribution across layers learned by reinforcement learning on Ray.")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    loudness.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help=f"also show the output of Ray, RLlib and other libraries (default: in "
                               f"{console.LOG_FILE} in the output folder)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", usage=_USAGE, help="prune step by step with a learned distribution (the main job)")
    _add_fields(c, ["data", "model", "train", "target", "search", "rlpruner", "rllib", "workers", "finetune", "run"])

    t = sub.add_parser("train", usage=_USAGE, help="train a base model and save it")
    _add_fields(t, ["data", "model", "train", "run"], skip=("base_checkpoint", "resume", "max_batches_per_epoch"))

    e = sub.add_parser("evaluate", help="accuracy, MACs, params and latency of a model file")
    e.add_argument("model_file")
    e.add_argument("--model", dest="model", default=argparse.SUPPRESS, metavar="PKG.MODULE:FACTORY",
                   help="allow a model file built by this user factory to import it (never done unless named)")
    e.add_argument("--split", choices=("val", "test"), default="test", help="split to evaluate on (default: test)")
    _add_fields(e, ["data"])
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    e.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: 0)")

    pr = sub.add_parser("prune", usage=_USAGE, help="one-shot pruning with a non-learned strategy (baselines)")
    _add_fields(pr, ["data", "model", "train", "target", "finetune", "run"], skip=("resume", "step_fraction"))
    pr.add_argument("--algo", dest="algo", choices=("uniform", "global", "random", "tp-uniform", "tp-global"),
                    default="uniform",
                    help="how the filters to remove are spread across groups (default: uniform)")
    pr.add_argument("--criterion", choices=CRITERIA, default="l1",
                    help="filter importance criterion (default: l1); tp-magnitude: Torch-Pruning's group L1 "
                         "magnitude, the channel ranking tp-global prunes by")
    pr.add_argument("--export", choices=("torchscript", "onnx"), help="also export the pruned model")
    for name in ("sweep", "compare", "report"):
        _register_later(sub, name)
    return p


def _register_later(sub, name: str) -> None:
    try:
        from . import sweep
    except ImportError:
        return
    sweep.add_subcommand(sub, name, _add_fields)


def _setup_logging(quiet: bool, verbose: bool) -> None:
    console.setup_logging(quiet=quiet, verbose=verbose)
    if not verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not console.is_terminal(sys.stderr):
        # Ray wraps each worker line in colour codes (and a reset, \x1b[0m) whatever the
        # stream; in a pipe, a file or log.txt they are stray bytes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


# commands whose foreign output (Ray, RLlib, libraries) goes to the log file; a
# sweep's trials run in Tune's processes, and Tune's own table is its progress
_LOGGED_COMMANDS = ("compress", "train", "prune", "evaluate")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)    # (absent unless given: sweep --resume takes no settings)
    _setup_logging(args.quiet, verbose)
    try:
        if args.command not in _LOGGED_COMMANDS:
            from . import sweep
            return sweep.run_subcommand(args, _config)
        if verbose:
            result = _work(args)
        else:
            with console.foreign_output_to_log(getattr(args, "out_dir", None) or _default_out_dir(args.command)):
                result = _work(args)
        _show(args.command, result)      # (after the redirect: results go to stdout, not the log)
        return 0
    except RLPrunerError as exc:
        print(f"rlpruner: error: {as_flags(str(exc).splitlines()[0])}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StepFailed as exc:   # not bad input: exit 1, one line, the traceback in the run's log.txt
        print(f"rlpruner: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlpruner: interrupted; resume with --resume", file=sys.stderr)
        return 130


def as_flags(message: str) -> str:
    """A refusal in the words a command-line user typed: the config's field names
    (``evaluations_per_step``) as their flags (``--evaluations-per-step``). Names
    with an underscore are never ordinary words; a one-word name (``seed``,
    ``sparsity``) only where the message is about its value (``seed must be ...``).
    A name inside a path or already a flag is left alone."""
    for f in dataclasses.fields(CompressConfig):
        flag = "--" + f.name.replace("_", "-")
        after = r"\b" if "_" in f.name else r"(?= must\b)"
        message = re.sub(rf"(?<![\w/.-]){f.name}{after}(?![/.-]\w)", flag, message)
    return message


def _default_out_dir(command: str) -> str | None:
    return None if command == "evaluate" else CompressConfig().out_dir


def _work(args) -> dict:
    from . import commands, pipeline
    if args.command == "compress":
        return pipeline.compress(_gpu_pool(args, _config(args)))
    if args.command == "train":
        return commands.train_command(_config(args))
    if args.command == "evaluate":
        return commands.evaluate_command(args.model_file, _config(args, device=args.device, seed=args.seed),
                                         split=args.split)
    out = commands.prune_command(_config(args, algo=args.algo, criterion=args.criterion), export=args.export)
    out.pop("config")
    return out


def _show(command: str, result: dict) -> None:
    if command == "compress":
        _print_summary(result)
    else:
        print(json.dumps(result, indent=2))


def _gpu_pool(args, config):
    """On a GPU machine, with neither --num-workers nor --gpus-per-worker given and
    no cluster to join, evaluation actors get a GPU each (one per GPU)."""
    if hasattr(args, "num_workers") or hasattr(args, "gpus_per_worker") or config.ray_address:
        return config
    import torch

    from .cluster_offer import gpu_pool_layout
    layout = gpu_pool_layout(config.device, torch.cuda.device_count())
    if layout is None:
        return config
    logging.getLogger("rlpruner_ray").info("evaluation on the GPU: %d actor(s), 1 GPU each (--num-workers, "
                                           "--gpus-per-worker to choose)", layout[0])
    return config.replace(num_workers=layout[0], gpus_per_worker=layout[1])


def _print_summary(s: dict) -> None:
    b, p, r = s["base"], s["pruned"], s["reductions"]
    rows = [("", "base", "pruned"),
            ("test top-1", f"{b['test_top1']:.4f}", f"{p['test_top1']:.4f}"),
            ("val top-1", f"{b['val_top1']:.4f}", f"{p['val_top1']:.4f}"),
            ("MACs", f"{b['macs'] / 1e6:.2f}M", f"{p['macs'] / 1e6:.2f}M (-{100 * r['macs']:.1f}%)"),
            ("params", f"{b['params'] / 1e6:.3f}M", f"{p['params'] / 1e6:.3f}M (-{100 * r['params']:.1f}%)"),
            ("latency b1 (CPU, 1 thread)", _latency(b), _latency(p) + _ratio(p))]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width)))
    steps = len(s["steps"])
    print(f"{s['evaluations']} evaluations, {steps} step{'' if steps == 1 else 's'}, {s['wall_seconds']:.0f} s; "
          f"results in {s['config']['out_dir']}")


def _ratio(measured: dict) -> str:
    ratio = measured.get("latency_ratio_cpu_b1")
    return f", {ratio:.2f}x base" if ratio else ""


def _latency(measured: dict) -> str:
    """Median and interquartile range of the interleaved timings."""
    q1, q3 = measured.get("latency_ms_cpu_b1_quartiles") or (None, None)
    spread = f" ({q1:.2f}-{q3:.2f})" if q1 is not None else ""
    return f"{measured['latency_ms_cpu_b1']:.2f} ms{spread}"


# ---------------------------------------------------------------- cluster entries
_TOP_LEVEL_FLAGS = ("-q", "--quiet", "-v", "--verbose")   # options of `rlpruner` itself: before the subcommand


def cluster_argv(command: str, user_args: list[str]) -> list[str]:
    """argv for :func:`main` from a cluster entry script (``scripts/*.py``):
    ``command`` and the user's arguments, joining the running cluster
    (``--ray-address auto``) unless the user gave ``--ray-address``."""
    top = [a for a in user_args if a in _TOP_LEVEL_FLAGS]
    rest = [a for a in user_args if a not in _TOP_LEVEL_FLAGS]
    given = any(a == "--ray-address" or a.startswith("--ray-address=") for a in rest)
    return [*top, command, *([] if given else ["--ray-address", "auto"]), *rest]


def cluster_main(command: str, user_args: list[str]) -> int:
    return main(cluster_argv(command, user_args))


if __name__ == "__main__":
    raise SystemExit(main())
