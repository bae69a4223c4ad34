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
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .config import CRITERIA, REWARDS, CompressConfig, RESULT_KEYS
from .errors import ConfigError, RLPrunerError

log = logging.getLogger("rlpruner_ray")

GRID_KEYS = ("sparsity", "algo", "reward", "criterion", "seed")
SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
ROWS_FILE = "rows.jsonl"
TRIAL_FILE = "trial.json"
ERROR_FILE = "error.json"
EXPERIMENT = "tune"
COMPARE_ALGOS = ("rlpruner", "random", "uniform", "global")
# Final outputs of compress(), carried by a trial's last checkpoint.
FINAL_FILES = ("summary.json", "history.parquet", "pruned_model.pt", "report.png")
# Test hook: a trial raises once right after reporting this step (retry tests).
FAIL_ENV = "RLPRUNER_TEST_FAIL_AFTER_STEP"
# Keys of a step record (or of the final summary) that go into a result row.
_STEP_KEYS = ("filters_removed", "macs", "params", "macs_reduction", "params_reduction", "chosen_reward",
              "chosen_accuracy", "chosen_source", "best_reward", "evaluations", "val_top1_before_finetune",
              "val_top1", "finetune_best_epoch", "search_seconds", "step_seconds")
_CONFIG_GROUPS = ["model", "data", "train", "target", "search", "rlpruner", "rllib", "workers", "finetune", "run"]


# ====================================================================== CLI hooks
def add_subcommand(sub, name: str, add_fields) -> None:
    """Register ``sweep``, ``compare`` or ``report`` on the ``rlpruner`` parser."""
    if name == "report":
        p = sub.add_parser("report", help="rebuild the tables and plots of a (partial) sweep or comparison")
        p.add_argument("sweep_dir", metavar="DIR", help="the sweep's --out-dir")
        return
    if name == "sweep":
        p = sub.add_parser("sweep", help="Ray Tune sweep of compress runs over sparsity, algorithm, reward, "
                           "criterion and seed (one trial per grid point)")
        add_fields(p, _CONFIG_GROUPS, skip=("sparsity", "algo", "reward", "criterion", "seed", "resume"))
        p.add_argument("--sparsity", dest="grid_sparsity", type=float, nargs="+", metavar="S",
                       default=argparse.SUPPRESS, help="target sparsities, one trial each (default 0.5)")
        p.add_argument("--algo", dest="grid_algo", nargs="+", metavar="ALGO", default=argparse.SUPPRESS,
                       help="search algorithms: rlpruner, random, uniform, global, ppo, sac, ... (default rlpruner)")
        p.add_argument("--reward", dest="grid_reward", nargs="+", choices=REWARDS, default=argparse.SUPPRESS,
                       help="rewards (default acc)")
        p.add_argument("--criterion", dest="grid_criterion", nargs="+", choices=CRITERIA,
                       default=argparse.SUPPRESS, help="importance criteria (default taylor)")
        default_seeds = 1
    elif name == "compare":
        p = sub.add_parser("compare", help="compare search algorithms over seeds at one sparsity (Ray Tune "
                           "trials): best reward per evaluation, test accuracy, MACs, wall time")
        add_fields(p, _CONFIG_GROUPS, skip=("algo", "seed", "resume"))
        p.add_argument("--algo", dest="grid_algo", nargs="+", metavar="ALGO", default=argparse.SUPPRESS,
                       help=f"algorithms to compare (default {' '.join(COMPARE_ALGOS)})")
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
    p.set_defaults(sweep_kind=name, default_seed_count=default_seeds)


def run_subcommand(args, make_config) -> int:
    quiet = bool(getattr(args, "quiet", False))
    if args.command == "report":
        return report_command(args.sweep_dir)
    if hasattr(args, "resume_dir"):
        plan = _plan_for_resume(args)
        return run_sweep(plan, ray_address=getattr(args, "ray_address", None), quiet=quiet, resume=True)
    plan = plan_from_args(args, make_config)
    return run_sweep(plan, ray_address=getattr(args, "ray_address", None), quiet=quiet, resume=False,
                     overwrite=bool(getattr(args, "overwrite", False)))


# ====================================================================== the plan
def _is_uri(path: str) -> bool:
    return "://" in str(path)


def _dedupe(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def local_dir_for(out_dir: str) -> Path:
    if not _is_uri(out_dir):
        return Path(out_dir)
    digest = hashlib.sha1(out_dir.rstrip("/").encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"rlpruner-sweep-{digest}"


def trial_name(params: dict) -> str:
    """A readable folder name for one grid point (stable across retries and resumes)."""
    raw = (f"{params['algo']}-s{float(params['sparsity'])!r}-{params['reward']}-{params['criterion']}"
           f"-seed{params['seed']}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", raw)


class SweepPlan:
    """Everything a sweep needs, saved as ``sweep.json`` (``--resume`` and
    ``report`` read it back)."""

    def __init__(self, kind: str, out_dir: str, storage_path: str, name: str, base: dict, grid: dict,
                 max_concurrent: int | None = None, max_failures: int = 2):
        self.kind, self.out_dir, self.storage_path, self.name = kind, out_dir, storage_path, name
        self.base, self.grid = base, grid
        self.max_concurrent, self.max_failures = max_concurrent, max_failures

    def to_dict(self) -> dict:
        return {"kind": self.kind, "out_dir": self.out_dir, "storage_path": self.storage_path, "name": self.name,
                "base": self.base, "grid": self.grid, "max_concurrent": self.max_concurrent,
                "max_failures": self.max_failures}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepPlan":
        try:
            return cls(d["kind"], d["out_dir"], d["storage_path"], d["name"], d["base"], d["grid"],
                       d.get("max_concurrent"), d.get("max_failures", 2))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed {SWEEP_FILE}: missing {exc}") from None

    @property
    def root(self) -> Path:
        """The local folder: the out dir itself, or for a URI out dir a local
        staging folder whose result files are uploaded to the URI."""
        return local_dir_for(self.out_dir)

    @property
    def remote(self) -> bool:
        return _is_uri(self.out_dir)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def grid_points(self) -> list[dict]:
        points = [{}]
        for key in GRID_KEYS:
            points = [{**p, key: v} for p in points for v in self.grid[key]]
        return points

    def trial_config(self, params: dict, out_dir: str | None = None) -> CompressConfig:
        values = {**self.base, **{k: params[k] for k in GRID_KEYS}}
        values.update(out_dir=out_dir or str(self.root / TRIALS_DIR / trial_name(params)),
                      resume=False, overwrite=False, ray_address=None)
        return CompressConfig.from_dict(values)


def plan_from_args(args, make_config) -> SweepPlan:
    """Validate the whole grid up front (one line on the first bad value)."""
    kind = args.sweep_kind
    if not hasattr(args, "out_dir"):
        raise ConfigError(f"rlpruner {kind} needs --out-dir (or --resume DIR)")
    grid: dict = {}
    if kind == "sweep":
        grid["sparsity"] = _dedupe(getattr(args, "grid_sparsity", [0.5]))
        grid["reward"] = _dedupe(getattr(args, "grid_reward", ["acc"]))
        grid["criterion"] = _dedupe(getattr(args, "grid_criterion", ["taylor"]))
        grid["algo"] = _dedupe(a.lower() for a in getattr(args, "grid_algo", ["rlpruner"]))
    else:
        grid["algo"] = _dedupe(a.lower() for a in getattr(args, "grid_algo", list(COMPARE_ALGOS)))
    if hasattr(args, "seed_list"):
        seeds = _dedupe(args.seed_list)
    else:
        count = getattr(args, "seed_count", args.default_seed_count)
        if count < 1:
            raise ConfigError(f"--seeds must be at least 1, got {count}")
        seeds = list(range(count))
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be >= 0, got {seeds}")
    grid["seed"] = seeds
    first = {k: v[0] for k, v in grid.items()}
    base_cfg = make_config(args, **first)          # validates every single-valued option
    for key in GRID_KEYS:                          # compare: sparsity, reward, criterion are single values
        grid.setdefault(key, [getattr(base_cfg, key)])
    max_concurrent = getattr(args, "max_concurrent", None)
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1, got {max_concurrent}")
    max_failures = getattr(args, "max_failures", 2)
    if max_failures < -1:
        raise ConfigError(f"--max-failures must be >= 0 (or -1: retry forever), got {max_failures}")
    for point in [dict(zip(GRID_KEYS, p)) for p in _product(grid)]:
        _check_algorithm(base_cfg.replace(**point))    # range checks of every grid value, known algorithm
    out = args.out_dir.rstrip("/") if _is_uri(args.out_dir) else str(Path(args.out_dir).expanduser().resolve())
    storage = getattr(args, "storage_path", None)
    if storage is None:
        storage, name = out, EXPERIMENT
    else:
        storage = storage.rstrip("/") if _is_uri(storage) else str(Path(storage).expanduser().resolve())
        name = EXPERIMENT if storage == out else (out.rstrip("/").rsplit("/", 1)[-1] or EXPERIMENT)
    base = {k: v for k, v in base_cfg.to_dict().items()
            if k not in GRID_KEYS + ("out_dir", "resume", "overwrite", "ray_address")}
    return SweepPlan(kind, out, storage, name, base, grid, max_concurrent, max_failures)


def _check_algorithm(config: CompressConfig) -> None:
    from .search import base
    if hasattr(base, "check_algorithm"):       # the algorithm and the settings it needs
        base.check_algorithm(config)
    else:
        base.check_algorithm_name(config.algo)


def _product(grid: dict):
    points = [()]
    for key in GRID_KEYS:
        points = [p + (v,) for p in points for v in grid[key]]
    return points


def _plan_for_resume(args) -> SweepPlan:
    given = sorted(k for k in vars(args) if k not in
                   ("command", "quiet", "resume_dir", "ray_address", "sweep_kind", "default_seed_count"))
    if given:
        raise ConfigError(f"--resume DIR uses the settings saved in DIR/{SWEEP_FILE}; drop "
                          f"--{given[0].replace('grid_', '').replace('_', '-')}")
    where = args.resume_dir
    if _read_sweep_file(where) is None:
        raise ConfigError(f"nothing to resume in {where} (no {SWEEP_FILE})")
    plan = load_plan(where)
    if plan.kind != args.sweep_kind:
        raise ConfigError(f"{where} holds a {plan.kind}; resume it with rlpruner {plan.kind} --resume")
    return plan


def _read_sweep_file(where: str) -> dict | None:
    """``sweep.json`` of a local folder or a URI (None when there is none)."""
    if _is_uri(where):
        fs, path = _fs(where.rstrip("/"))
        if fs is None:
            raise ConfigError(f"cannot open {where}: unknown scheme or no access")
        text = _read_text(fs, f"{path}/{SWEEP_FILE}")
        return json.loads(text) if text else None
    path = Path(where).expanduser().resolve() / SWEEP_FILE
    return _safe_json(path) if path.is_file() else None


def load_plan(where) -> SweepPlan:
    where = str(where)
    saved = _read_sweep_file(where)
    if saved is None:
        raise ConfigError(f"{where} is not a sweep folder (no {SWEEP_FILE})")
    plan = SweepPlan.from_dict(saved)
    if not _is_uri(where):
        root = str(Path(where).expanduser().resolve())
        if plan.out_dir != root:            # the folder was moved: follow it
            if plan.storage_path == plan.out_dir:
                plan.storage_path = root
            plan.out_dir = root
    return plan


# ====================================================================== resources
def trial_bundles(config: CompressConfig) -> list[dict]:
    """Placement-group bundles of one trial: the trial's own process (1 CPU, plus a
    GPU share when it fine-tunes on a GPU), then what its search asks for."""
    from .search.base import native_names, planned_resources
    from .search import baselines, rlpruner  # noqa: F401  (register the native algorithms)
    gpu_driver = config.device.startswith("cuda") or (config.device == "auto" and config.gpus_per_worker > 0)
    head = {"CPU": 1.0, "GPU": min(1.0, config.gpus_per_worker or 1.0) if gpu_driver else 0.0}
    if config.algo.lower() in native_names():
        rest = [{"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker}] * config.num_workers
    else:
        try:
            from .search.rllib import rllib_bundles
            driver, *rest = rllib_bundles(config)          # the driver learns when there are no learners
            head["GPU"] = max(head["GPU"], float(driver.get("GPU", 0.0)))
        except ImportError:
            rest = [planned_resources(config)]
    bundles = [{k: float(v) for k, v in b.items() if v and v > 0} for b in [head, *rest]]
    return [b for b in bundles if b]


def _resources_fn(plan_dict: dict):
    def resources(params: dict):
        from ray.tune import PlacementGroupFactory
        plan = SweepPlan.from_dict(plan_dict)
        return PlacementGroupFactory(trial_bundles(plan.trial_config(params)))
    return resources


def check_trials_fit(plan: SweepPlan, offered: dict | None) -> None:
    from .runtime import check_resources
    for params in plan.grid_points():
        need: dict[str, float] = {}
        for b in trial_bundles(plan.trial_config(params)):
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        check_resources(need, f"one trial ({trial_name(params)})", offered=offered)


# ====================================================================== the trainable
def run_trial(params: dict, plan: dict) -> None:
    """Tune function trainable: one compress run, reporting after every step."""
    from ray import tune
    from ray.tune import Checkpoint
    from .checkpoint import atomic_write_json
    from .pipeline import compress

    plan_obj = SweepPlan.from_dict(plan)
    params = {k: params[k] for k in GRID_KEYS}
    name = trial_name(params)
    work = _trial_work_dir(plan_obj, name)
    cfg = plan_obj.trial_config(params, out_dir=str(work))
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()

    attempts = 0
    if (work / TRIAL_FILE).is_file():
        attempts = int(_safe_json(work / TRIAL_FILE).get("attempts", 0))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            attempts = max(attempts, int(_safe_json(Path(d) / TRIAL_FILE).get("attempts", 0)))
            if not _local_is_ahead(work, Path(d), cfg):   # e.g. the retry runs on another node
                _restore_into(Path(d), work)
    attempt = attempts + 1
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / TRIAL_FILE, {"name": name, "params": params, "trial_id": trial_id,
                                         "attempts": attempt, "kind": plan_obj.kind})
    rows = _read_rows(work / ROWS_FILE)
    if (work / "config.json").is_file():
        same = _same_settings(work, cfg)
        cfg = cfg.replace(resume=True) if same else cfg.replace(overwrite=True)
        rows = rows if same else []
    else:
        rows = []
    base_row = {"trial": name, "trial_id": trial_id, **params, "attempt": attempt}

    def report(row: dict, final: bool) -> None:
        stage = _stage_checkpoint(work, final=final)
        try:
            tune.report(_metrics(row), checkpoint=Checkpoint.from_directory(str(stage)))
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def finish(summary: dict) -> None:
        done = {r["step"] for r in rows}
        for record in summary["steps"]:      # steps whose report was lost (killed between checkpoint and report)
            if record["step"] not in done:
                rows.append({**base_row, **_step_row(record), "attempt": None})
        rows.sort(key=lambda r: r["step"])
        rows[-1] = {**rows[-1], **_final_row(summary)}
        _write_rows(work / ROWS_FILE, rows)
        report(rows[-1], final=True)

    if cfg.resume and (work / "summary.json").is_file():
        summary = _safe_json(work / "summary.json")
        if summary.get("steps"):             # finished before (killed before Tune heard of it)
            finish(summary)
            return
    def on_step(record: dict, run) -> None:
        row = {**base_row, **_step_row(record)}
        rows[:] = [r for r in rows if r["step"] != row["step"]] + [row]
        _write_rows(work / ROWS_FILE, rows)
        report(row, final=False)
        fail_at = os.environ.get(FAIL_ENV)
        marker = work / f".injected_failure_step{record['step']}"
        if fail_at is not None and fail_at == str(record["step"]) and not marker.exists():
            marker.write_text("1")
            raise RuntimeError(f"injected failure after step {record['step']} ({FAIL_ENV})")

    (work / ERROR_FILE).unlink(missing_ok=True)
    try:
        summary = compress(cfg, on_step=on_step)
    except RLPrunerError as exc:     # bad settings for this grid point: retrying cannot help
        message = str(exc).splitlines()[0]
        atomic_write_json(work / ERROR_FILE, {"error": message, "type": type(exc).__name__})
        tune.report({"trial": name, "error": message})
        return
    finish(summary)


def _same_settings(work: Path, cfg: CompressConfig) -> bool:
    saved = _safe_json(work / "config.json")
    return bool(saved) and all(_norm(saved.get(k)) == _norm(getattr(cfg, k)) for k in RESULT_KEYS)


def _local_is_ahead(work: Path, ckpt_dir: Path, cfg: CompressConfig) -> bool:
    """The trial's own folder already holds this run at least as far as the
    checkpoint (a retry on the same node): keep it rather than step back."""
    if not (work / "config.json").is_file() or not _same_settings(work, cfg):
        return False
    if (work / "summary.json").is_file():
        return True
    local, saved = _step_files(work), _step_files(ckpt_dir)
    return bool(local) and local[-1] >= (saved[-1] if saved else -1)


def _trial_work_dir(plan: SweepPlan, name: str) -> Path:
    """The trial's compress folder: ``<out_dir>/trials/<name>`` (named by the grid
    point, so retries, restores and fresh restarts find the same folder); a
    temporary folder on a node where that path cannot be created."""
    work = plan.root / TRIALS_DIR / name
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError:
        digest = hashlib.sha1(str(work).encode()).hexdigest()[:10]
        work = Path(tempfile.gettempdir()) / f"rlpruner-trial-{digest}"
        work.mkdir(parents=True, exist_ok=True)
    return work


def _safe_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _read_rows(path: Path) -> list[dict]:
    rows = []
    try:
        text = Path(path).read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    from .checkpoint import atomic_write_bytes
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def _step_row(record: dict) -> dict:
    row = {"step": int(record["step"]), "final": False, "filters_sparsity": float(record["sparsity"])}
    row.update({k: record[k] for k in _STEP_KEYS if k in record})
    row["macs_kept"] = 1.0 - float(record["macs_reduction"])
    row["params_kept"] = 1.0 - float(record["params_reduction"])
    return row


def _final_row(summary: dict) -> dict:
    b, p, r = summary["base"], summary["pruned"], summary["reductions"]
    out = {"final": True, "test_top1": p["test_top1"], "test_top5": p.get("test_top5"),
           "final_val_top1": p["val_top1"], "final_macs": p["macs"], "final_params": p["params"],
           "final_macs_kept": 1.0 - r["macs"], "final_params_kept": 1.0 - r["params"],
           "final_filters_sparsity": r["filters"], "latency_ms_cpu_b1": p.get("latency_ms_cpu_b1"),
           "base_test_top1": b["test_top1"], "base_val_top1": b["val_top1"], "base_macs": b["macs"],
           "base_params": b["params"], "base_latency_ms_cpu_b1": b.get("latency_ms_cpu_b1"),
           "total_evaluations": summary["evaluations"], "wall_seconds": summary["wall_seconds"]}
    return out


def _metrics(row: dict) -> dict:
    """What goes to tune.report: scalars only, none of Tune's reserved names."""
    return {k: v for k, v in row.items() if k != "trial_id" and (v is None or isinstance(v, (int, float, str, bool)))}


def _step_files(folder: Path) -> list[int]:
    steps = folder / "steps"
    if not steps.is_dir():
        return []
    return sorted(int(m.group(1)) for p in steps.glob("step_*.pt") if (m := re.match(r"step_(\d+)\.pt$", p.name)))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_checkpoint(work: Path, *, final: bool) -> Path:
    """A folder with the run's resumable state (hard links, so it costs no copy):
    config.json, base_model.pt, the latest step and its algorithm state, history/,
    the trial's rows; at the end also the result files."""
    stage = work / ".tune_checkpoint"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    names = ["config.json", "base_model.pt", ROWS_FILE, TRIAL_FILE] + (list(FINAL_FILES) if final else [])
    for n in names:
        if (work / n).is_file():
            _link_or_copy(work / n, stage / n)
    steps = _step_files(work)
    if steps:
        last = f"step_{steps[-1]:03d}"
        _link_or_copy(work / "steps" / f"{last}.pt", stage / "steps" / f"{last}.pt")
        extra = work / "steps" / f"{last}_algo"
        if extra.is_dir():
            for f in extra.rglob("*"):
                if f.is_file():
                    _link_or_copy(f, stage / "steps" / f"{last}_algo" / f.relative_to(extra))
    for f in sorted((work / "history").glob("step_*.parquet")) if (work / "history").is_dir() else []:
        _link_or_copy(f, stage / "history" / f.name)
    return stage


def _restore_into(ckpt_dir: Path, work: Path) -> None:
    """Make the trial folder hold exactly the checkpoint's state: copy its files
    (an identical file already there is left untouched) and drop steps, history
    and results that come after it."""
    work.mkdir(parents=True, exist_ok=True)
    for f in ckpt_dir.rglob("*"):
        if not f.is_file():
            continue
        dst = work / f.relative_to(ckpt_dir)
        if dst.is_file() and filecmp.cmp(f, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.restore")
        shutil.copyfile(f, tmp)
        os.replace(tmp, dst)
    kept = _step_files(ckpt_dir)
    _drop_steps_after(work, kept[-1] if kept else -1)
    if not (ckpt_dir / "summary.json").is_file():
        for n in FINAL_FILES:
            (work / n).unlink(missing_ok=True)


def _drop_steps_after(work: Path, last: int) -> None:
    """Delete the step checkpoints, algorithm state and history of steps > ``last``."""
    for step in _step_files(work):
        if step > last:
            (work / "steps" / f"step_{step:03d}.pt").unlink(missing_ok=True)
            shutil.rmtree(work / "steps" / f"step_{step:03d}_algo", ignore_errors=True)
    if (work / "history").is_dir():
        for f in (work / "history").glob("step_*.parquet"):
            m = re.match(r"step_(\d+)\.parquet$", f.name)
            if m and int(m.group(1)) > last:
                f.unlink(missing_ok=True)


# ====================================================================== running
def run_sweep(plan: SweepPlan, *, ray_address: str | None = None, quiet: bool = False, resume: bool = False,
              overwrite: bool = False) -> int:
    """Check, then run (or continue) the sweep; write the result files; print the table.
    Returns 0 when every trial finished, 1 otherwise."""
    import ray
    from .checkpoint import atomic_write_json
    from .runtime import init_ray, local_offer, shutdown_ray

    root = plan.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out_dir {root} exists and is not a folder")
    if not resume and not overwrite and _read_sweep_file(plan.out_dir) is not None:
        raise ConfigError(f"{plan.out_dir} already holds a {plan.kind}; continue it with --resume "
                          f"{plan.out_dir} or pass --overwrite")
    own_ray = not ray.is_initialized()
    if own_ray and not ray_address:
        check_trials_fit(plan, local_offer())      # refuse before Ray starts or anything is written
    try:
        init_ray(ray_address, root)
        check_trials_fit(plan, None)               # what the cluster really offers
        if overwrite and not resume:
            _clear(plan)
        root.mkdir(parents=True, exist_ok=True)
        if not resume or not (root / SWEEP_FILE).is_file():
            atomic_write_json(root / SWEEP_FILE, plan.to_dict())
            _publish(plan, [SWEEP_FILE])
        _fit(plan, quiet=quiet, resume=resume)
    finally:
        if own_ray:
            shutdown_ray()
    rows = write_outputs(plan)
    status = _trial_status(plan, rows)
    for name in [n for n, st in status.items() if st == "error"]:
        print(f"rlpruner: trial {name}: {trial_error(plan, name)}", file=sys.stderr)
    unfinished = [n for n, st in status.items() if st not in ("done", "error")]
    if unfinished:
        print(f"rlpruner: {len(unfinished)} of {len(status)} trials did not finish ({', '.join(unfinished)}); "
              f"see {plan.experiment_path} and continue with rlpruner {plan.kind} --resume {plan.out_dir}",
              file=sys.stderr)
    return 1 if unfinished or "error" in status.values() else 0


OUTPUT_FILES = ("results.parquet", "pareto.png", "comparison.parquet", "comparison.png")


def _clear(plan: SweepPlan) -> None:
    """--overwrite: remove what an earlier sweep in this out dir wrote (only that)."""
    root = plan.root
    for n in (SWEEP_FILE, *OUTPUT_FILES):
        (root / n).unlink(missing_ok=True)
    shutil.rmtree(root / TRIALS_DIR, ignore_errors=True)
    fs, base = _fs(plan.out_dir) if plan.remote else (None, None)
    if fs is not None:
        for n in (SWEEP_FILE, *OUTPUT_FILES):
            try:
                fs.delete_file(f"{base}/{n}")
            except OSError:
                pass
    fs, exp = _fs(plan.experiment_path)
    if fs is not None:
        try:
            fs.delete_dir(exp)
        except OSError:
            pass


def _publish(plan: SweepPlan, names) -> None:
    """Copy result files of the local staging folder to a URI out dir."""
    if not plan.remote:
        return
    fs, base = _fs(plan.out_dir)
    if fs is None:
        raise ConfigError(f"cannot write to {plan.out_dir}: unknown scheme or no access")
    try:
        fs.create_dir(base, recursive=True)
        for n in names:
            if (plan.root / n).is_file():
                with fs.open_output_stream(f"{base}/{n}") as f:
                    f.write((plan.root / n).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot write to {plan.out_dir}: {str(exc).splitlines()[0]}") from None


def _fit(plan: SweepPlan, *, quiet: bool, resume: bool) -> None:
    from ray import tune
    # num_to_keep forces an experiment snapshot per checkpoint: intended (the saved
    # state never names a deleted checkpoint), so no warning about it
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    plan_dict = plan.to_dict()
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan_dict),
                                    resources=_resources_fn(plan_dict))
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
                verbose=0 if quiet else 1),
        )
    tuner.fit()


def _trial_label(trial) -> str:
    return trial_name(trial.config)


def _trial_dirname(trial) -> str:
    return f"{trial_name(trial.config)}_{trial.trial_id}"


# ====================================================================== results
def collect_rows(plan: SweepPlan) -> list[dict]:
    """One row per trial and step, from each trial's own folder, else from its
    latest checkpoint or Tune's result.json in the experiment folder."""
    by_trial: dict[str, list[dict]] = {}
    for params in plan.grid_points():
        name = trial_name(params)
        rows = _read_rows(plan.root / TRIALS_DIR / name / ROWS_FILE)
        if not rows:
            rows = _rows_from_storage(plan, name)
        merged: dict[int, dict] = {}
        for r in rows:
            merged[int(r["step"])] = {**merged.get(int(r["step"]), {}), **r}
        by_trial[name] = [{**params, **merged[s], "trial": name} for s in sorted(merged)]
    return [r for name in by_trial for r in by_trial[name]]


def _trial_storage_dirs(plan: SweepPlan, name: str) -> list[str]:
    """The trial's folders in the experiment folder (newest last)."""
    fs, base = _fs(plan.experiment_path)
    if fs is None:
        return []
    from pyarrow import fs as pafs
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    dirs = [i for i in infos if i.type == pafs.FileType.Directory and Path(i.path).name.startswith(name + "_")]
    return [i.path for i in sorted(dirs, key=lambda i: i.mtime_ns or 0)]


def _fs(uri: str):
    """(pyarrow filesystem, path in it) of a local path or URI; (None, None) when
    the scheme is unknown or the storage cannot be reached."""
    from pyarrow import fs as pafs
    try:
        if _is_uri(uri):
            return pafs.FileSystem.from_uri(uri)
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    except Exception:          # noqa: BLE001 (no credentials / unknown scheme)
        return None, None


def _read_text(fs, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except Exception:          # noqa: BLE001
        return None


def _latest_checkpoint(fs, trial_dir: str) -> str | None:
    from pyarrow import fs as pafs
    try:
        infos = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    except OSError:
        return None
    ckpts = sorted(i.path for i in infos if i.type == pafs.FileType.Directory
                   and Path(i.path).name.startswith("checkpoint_"))
    return ckpts[-1] if ckpts else None


# What Tune adds to every reported result (not ours to keep in results.parquet).
_TUNE_KEYS = {"config", "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
              "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
              "iterations_since_restore", "experiment_tag"}


def _rows_from_storage(plan: SweepPlan, name: str) -> list[dict]:
    """Rows of a trial without a local folder: Tune's result.json, overlaid by the
    rows file of its latest checkpoint."""
    fs, _ = _fs(plan.experiment_path)
    for trial_dir in reversed(_trial_storage_dirs(plan, name)):
        rows = []
        for line in (_read_text(fs, f"{trial_dir}/result.json") or "").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "step" in r and "trial" in r:
                rows.append({k: v for k, v in r.items() if k not in _TUNE_KEYS})
        ck = _latest_checkpoint(fs, trial_dir)
        text = _read_text(fs, f"{ck}/{ROWS_FILE}") if ck else None
        rows += [json.loads(line) for line in (text or "").splitlines() if line.strip()]
        if rows:
            return rows
    return []


def _trial_files(plan: SweepPlan, name: str, scratch: Path) -> Path | None:
    """A local folder holding the trial's summary.json / history (its own folder,
    else its latest checkpoint, downloaded when the storage is remote)."""
    work = plan.root / TRIALS_DIR / name
    if (work / "summary.json").is_file() or (work / "history").is_dir():
        return work
    fs, _ = _fs(plan.experiment_path)
    for trial_dir in reversed(_trial_storage_dirs(plan, name)):
        ck = _latest_checkpoint(fs, trial_dir)
        if ck is None:
            continue
        if not _is_uri(plan.experiment_path):
            return Path(ck)
        from pyarrow import fs as pafs
        local = scratch / name
        try:
            pafs.copy_files(ck, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return local
        except Exception:      # noqa: BLE001
            continue
    return None


def _trial_status(plan: SweepPlan, rows: list[dict]) -> dict[str, str]:
    """done, partial (some steps), pending (none), or error (refused its settings)."""
    status = {trial_name(p): "pending" for p in plan.grid_points()}
    for r in rows:
        if r.get("final"):
            status[r["trial"]] = "done"
        elif status.get(r["trial"]) == "pending":
            status[r["trial"]] = "partial"
    for name, s in status.items():
        if s != "done" and trial_error(plan, name):
            status[name] = "error"
    return status


def trial_error(plan: SweepPlan, name: str) -> str | None:
    return _safe_json(plan.root / TRIALS_DIR / name / ERROR_FILE).get("error")


_FIRST_COLUMNS = ("trial", "algo", "sparsity", "reward", "criterion", "seed", "step", "final", "attempt")


def rows_table(rows: list[dict]):
    import pyarrow as pa
    keys = list(_FIRST_COLUMNS)
    for r in rows:
        keys += [k for k in r if k not in keys]
    cols = {}
    for k in keys:
        values = [r.get(k) for r in rows]
        try:
            cols[k] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols[k] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(cols) if rows else pa.table({k: pa.array([], pa.null()) for k in _FIRST_COLUMNS})


def write_outputs(plan: SweepPlan, *, echo: bool = True) -> list[dict]:
    """results.parquet + pareto.png (and for a comparison comparison.parquet +
    comparison.png), then the table(s) on stdout."""
    from .report import write_table
    rows = collect_rows(plan)
    write_table(plan.root / "results.parquet", rows_table(rows))
    write_pareto(plan, rows, plan.root / "pareto.png")
    if echo:
        print_sweep_table(plan, rows)
    if plan.kind == "compare":
        comp = comparison_rows(plan, rows)
        write_table(plan.root / "comparison.parquet", rows_table_compare(comp))
        write_comparison_plot(plan, rows, comp, plan.root / "comparison.png")
        if echo:
            print_ranking(plan, rows)
    _publish(plan, OUTPUT_FILES)
    return rows


def report_command(sweep_dir) -> int:
    plan = load_plan(sweep_dir)
    rows = write_outputs(plan)
    status = _trial_status(plan, rows)
    done = sum(s == "done" for s in status.values())
    print(f"{done} of {len(status)} trials finished; results in {plan.out_dir}")
    return 0


# ---------------------------------------------------------------------- tables
def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _print_rows(header: list[str], body: list[list[str]]) -> None:
    width = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    for row in [header, *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip())


def _last_rows(plan: SweepPlan, rows: list[dict]) -> dict[str, dict]:
    last: dict[str, dict] = {}
    for r in rows:
        if r["trial"] not in last or r["step"] >= last[r["trial"]]["step"]:
            last[r["trial"]] = r
    return last


def print_sweep_table(plan: SweepPlan, rows: list[dict]) -> None:
    last = _last_rows(plan, rows)
    status = _trial_status(plan, rows)
    body = []
    for params in plan.grid_points():
        name = trial_name(params)
        r = last.get(name, {})
        body.append([params["algo"], f"{params['sparsity']:g}", params["reward"], params["criterion"],
                     str(params["seed"]), status[name], str(r["step"] + 1) if r else "0",
                     _fmt(r.get("filters_sparsity"), ".3f"), _fmt(r.get("macs_kept"), ".3f"),
                     _fmt(r.get("val_top1"), ".4f"), _fmt(r.get("test_top1"), ".4f"),
                     _fmt(r.get("base_test_top1"), ".4f")])
    _print_rows(["algo", "sparsity", "reward", "criterion", "seed", "status", "steps", "filters", "MACs kept",
                 "val top-1", "test top-1", "base test"], body)


def print_ranking(plan: SweepPlan, rows: list[dict]) -> None:
    import numpy as np
    finals = [r for r in rows if r.get("final")]
    body = []
    for algo in plan.grid["algo"]:
        rs = [r for r in finals if r["algo"] == algo]
        acc = np.array([r["test_top1"] for r in rs], dtype=float)
        kept = np.array([r["final_macs_kept"] for r in rs], dtype=float)
        wall = np.array([r["wall_seconds"] for r in rs], dtype=float)
        evals = np.array([r["total_evaluations"] for r in rs], dtype=float)
        body.append((acc.mean() if len(acc) else -1.0, [
            algo, f"{len(rs)}/{len(plan.grid['seed'])}",
            f"{acc.mean():.4f} ± {acc.std():.4f}" if len(acc) else "-",
            f"{kept.mean():.3f}" if len(kept) else "-", f"{evals.mean():.0f}" if len(evals) else "-",
            f"{wall.mean():.0f}" if len(wall) else "-"]))
    body.sort(key=lambda x: -x[0])
    print(f"ranking by final test top-1 (mean ± std over seeds), sparsity {plan.grid['sparsity'][0]:g}:")
    _print_rows(["rank", "algo", "seeds", "test top-1", "MACs kept", "evaluations", "wall s"],
                [[str(i + 1), *b] for i, (_, b) in enumerate(body)])


# ---------------------------------------------------------------------- comparison data
def comparison_rows(plan: SweepPlan, rows: list[dict]) -> list[dict]:
    """One row per algorithm, seed, step and evaluation, from each trial's
    history (every candidate scored) and step records."""
    with tempfile.TemporaryDirectory(prefix="rlpruner-ckpt-") as scratch:
        return _comparison_rows(plan, rows, Path(scratch))


def _comparison_rows(plan: SweepPlan, rows: list[dict], scratch: Path) -> list[dict]:
    import pyarrow.parquet as pq
    step_info = {(r["trial"], r["step"]): r for r in rows}
    final = {r["trial"]: r for r in rows if r.get("final")}
    out = []
    for params in plan.grid_points():
        name = trial_name(params)
        folder = _trial_files(plan, name, scratch)
        if folder is None:
            continue
        parts = ([folder / "history.parquet"] if (folder / "history.parquet").is_file()
                 else sorted((folder / "history").glob("step_*.parquet")))
        if not parts:
            continue
        cand = [c for p in parts for c in pq.read_table(p, columns=["step", "evaluation", "reward", "accuracy",
                                                                     "macs", "params", "seconds",
                                                                     "chosen"]).to_pylist()]
        cand.sort(key=lambda c: (c["step"], c["evaluation"]))
        spent, wall, best, cur_step, step_start = 0, 0.0, None, None, 0.0
        elapsed_steps = 0.0
        for c in cand:
            if c["step"] != cur_step:
                prev = step_info.get((name, cur_step)) if cur_step is not None else None
                if prev is not None:
                    elapsed_steps += float(prev.get("step_seconds") or 0.0)
                    wall = elapsed_steps
                cur_step, best = c["step"], None
            spent += 1
            wall += float(c["seconds"] or 0.0)
            best = c["reward"] if best is None else max(best, c["reward"])
            info = step_info.get((name, c["step"]), {})
            out.append({"algo": params["algo"], "seed": params["seed"], "trial": name, "step": c["step"],
                        "evaluation": c["evaluation"], "evaluations_spent": spent, "reward": c["reward"],
                        "best_reward": best, "accuracy": c["accuracy"], "macs": c["macs"], "params": c["params"],
                        "chosen": c["chosen"], "wall_seconds": wall,
                        "step_val_top1": info.get("val_top1"), "step_macs": info.get("macs"),
                        "test_top1": final.get(name, {}).get("test_top1")})
    return out


def rows_table_compare(rows: list[dict]):
    import pyarrow as pa
    schema = pa.schema([("algo", pa.string()), ("seed", pa.int64()), ("trial", pa.string()), ("step", pa.int32()),
                        ("evaluation", pa.int32()), ("evaluations_spent", pa.int64()), ("reward", pa.float64()),
                        ("best_reward", pa.float64()), ("accuracy", pa.float64()), ("macs", pa.float64()),
                        ("params", pa.float64()), ("chosen", pa.bool_()), ("wall_seconds", pa.float64()),
                        ("step_val_top1", pa.float64()), ("step_macs", pa.float64()), ("test_top1", pa.float64())])
    return pa.Table.from_pylist(rows, schema)


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    from .checkpoint import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _curve_label(plan: SweepPlan, r: dict) -> str:
    parts = [r["algo"]]
    for key in ("reward", "criterion"):
        if len(plan.grid[key]) > 1:
            parts.append(str(r[key]))
    return " ".join(parts)


def write_pareto(plan: SweepPlan, rows: list[dict], path) -> None:
    """Test top-1 vs the fraction of MACs kept: one curve per algorithm (mean over
    seeds at each sparsity), every trial as a faint dot, the base model as a star."""
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    finals = [r for r in rows if r.get("final")]
    curves: dict[str, dict[float, list]] = {}
    for r in finals:
        curves.setdefault(_curve_label(plan, r), {}).setdefault(r["sparsity"], []).append(r)
    for label, by_s in curves.items():
        pts = sorted((np.mean([r["final_macs_kept"] for r in rs]), np.mean([r["test_top1"] for r in rs]))
                     for rs in by_s.values())
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        allr = [r for rs in by_s.values() for r in rs]
        ax.scatter([r["final_macs_kept"] for r in allr], [r["test_top1"] for r in allr], s=12, alpha=0.35,
                   color=line.get_color())
    if finals:
        ax.plot([1.0], [float(np.mean([r["base_test_top1"] for r in finals]))], "*", color="black",
                markersize=14, label="base model")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="fraction of MACs kept", ylabel="test top-1",
           title=f"{plan.base.get('model')} on {plan.base.get('dataset')}: accuracy vs MACs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_comparison_plot(plan: SweepPlan, rows: list[dict], comp: list[dict], path) -> None:
    """Left: best reward so far vs evaluations spent in a step (mean over the
    trial's steps; mean line and min/max band over seeds). Right: final test
    top-1 vs MACs, one marker per trial."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for algo in plan.grid["algo"]:
        curves = []
        for seed in plan.grid["seed"]:
            cs = [c for c in comp if c["algo"] == algo and c["seed"] == seed]
            if not cs:
                continue
            per_step: dict[int, list[float]] = {}
            for c in cs:
                per_step.setdefault(c["step"], []).append(c["best_reward"])
            n = min(len(v) for v in per_step.values())
            curves.append(np.mean([v[:n] for v in per_step.values()], axis=0))
        if not curves:
            continue
        n = min(len(c) for c in curves)
        arr = np.array([c[:n] for c in curves])
        x = np.arange(1, n + 1)
        mean, lo, hi = arr.mean(axis=0), arr.min(axis=0), arr.max(axis=0)
        label = f"{algo} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        if n > 1:
            line, = ax1.plot(x, mean, "-", label=label)
            ax1.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        else:                   # one evaluation per step (uniform, global): a point with its range
            ax1.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=4, label=label)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set(xlabel="evaluations spent in a step", ylabel="best reward so far (mean over steps)",
            title="Search efficiency")
    ax1.grid(alpha=0.3)
    if comp:
        ax1.legend(fontsize=8)
    finals = [r for r in rows if r.get("final")]
    for algo in plan.grid["algo"]:
        rs = [r for r in finals if r["algo"] == algo]
        if rs:
            ax2.scatter([r["final_macs"] / 1e6 for r in rs], [r["test_top1"] for r in rs], label=algo, s=30)
    if finals:
        ax2.plot([float(np.mean([r["base_macs"] for r in finals])) / 1e6],
                 [float(np.mean([r["base_test_top1"] for r in finals]))], "*", color="black", markersize=14,
                 label="base model")
        ax2.legend(fontsize=8)
    ax2.set(xlabel="MACs (M)", ylabel="final test top-1", title="Accuracy vs MACs (one marker per trial)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{plan.base.get('model')} on {plan.base.get('dataset')}, sparsity "
                 f"{plan.grid['sparsity'][0]:g}, {plan.base.get('evaluations_per_step')} evaluations per step")
    fig.tight_layout()
    _save(fig, path)
