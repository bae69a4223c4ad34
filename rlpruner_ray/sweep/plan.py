"""What a sweep runs: the grid, validated up front, and the settings saved as
``sweep.json`` that ``--resume`` and ``report`` read back."""
from __future__ import annotations

from pathlib import Path

from ..config import CompressConfig
from ..errors import ConfigError
from .storage import (EXPERIMENT, SWEEP_FILE, TRIALS_DIR, is_uri, local_dir_for, read_sweep_file,
                      resolve_location, trial_name)

GRID_KEYS = ("sparsity", "algo", "reward", "criterion", "seed")
COMPARE_ALGOS = ("rlpruner", "random", "uniform", "global", "tp-uniform", "tp-global")
# one MACs target for every compared algorithm: an accuracy ranking of models of
# different sizes says nothing (a filter count leaves each method's MACs free)
COMPARE_TARGET = "macs"


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values, one dict per trial."""
    points = [{}]
    for key in GRID_KEYS:
        points = [{**p, key: v} for p in points for v in grid[key]]
    return points


class SweepPlan:
    """Everything a sweep needs, saved as ``sweep.json`` (``--resume`` and
    ``report`` read it back)."""

    def __init__(self, kind: str, out_dir: str, storage_path: str, name: str, base: dict, grid: dict,
                 max_concurrent: int | None = None, max_failures: int = 2, fit_workers: bool = False,
                 reference: str | None = None):
        self.kind, self.out_dir, self.storage_path, self.name = kind, out_dir, storage_path, name
        self.base, self.grid = base, grid
        # (compare) the method every other is paired against; default the first --algo
        self.reference = reference or grid["algo"][0]
        self.max_concurrent, self.max_failures = max_concurrent, max_failures
        # --num-workers not given: run.fit_default_workers sizes it before the sweep
        # starts (the sized value is what sweep.json keeps)
        self.fit_workers = fit_workers

    def to_dict(self) -> dict:
        return {"kind": self.kind, "out_dir": self.out_dir, "storage_path": self.storage_path, "name": self.name,
                "base": self.base, "grid": self.grid, "max_concurrent": self.max_concurrent,
                "max_failures": self.max_failures, "reference": self.reference}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepPlan":
        try:
            return cls(d["kind"], d["out_dir"], d["storage_path"], d["name"], d["base"], d["grid"],
                       d.get("max_concurrent"), d.get("max_failures", 2), reference=d.get("reference"))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed {SWEEP_FILE}: missing {exc}") from None

    @property
    def root(self) -> Path:
        """The local folder: the out dir itself, or for a URI out dir a local
        staging folder whose result files are uploaded to the URI."""
        return local_dir_for(self.out_dir)

    @property
    def remote(self) -> bool:
        return is_uri(self.out_dir)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def grid_points(self) -> list[dict]:
        return grid_points(self.grid)

    def trial_config(self, params: dict, out_dir: str | None = None) -> CompressConfig:
        values = {**self.base, **{k: params[k] for k in GRID_KEYS}}
        values.update(out_dir=out_dir or str(self.root / TRIALS_DIR / trial_name(params)),
                      resume=False, overwrite=False, ray_address=None)
        return CompressConfig.from_dict(values)


def plan_from_args(args, make_config) -> SweepPlan:
    """Validate the whole grid up front (one line on the first bad value)."""
    kind = args.sweep_kind
    grid: dict = {}
    if kind == "sweep":
        grid["sparsity"] = _dedupe(getattr(args, "grid_sparsity", [0.5]))
        grid["reward"] = _dedupe(getattr(args, "grid_reward", ["acc"]))
        grid["criterion"] = _dedupe(getattr(args, "grid_criterion", [CompressConfig.criterion]))
        grid["algo"] = _dedupe(a.lower() for a in getattr(args, "grid_algo", ["rlpruner"]))
    else:
        grid["algo"] = _dedupe(a.lower() for a in getattr(args, "grid_algo", list(COMPARE_ALGOS)))
        if not hasattr(args, "target"):
            args.target = COMPARE_TARGET
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
    reference = getattr(args, "reference", None)
    if reference is not None and reference.lower() not in grid["algo"]:
        raise ConfigError(f"--reference {reference} is not one of the compared --algo "
                          f"({', '.join(grid['algo'])})")
    _resolve_paths(args)
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
    from ..search.registry import check_algorithm
    for point in grid_points(grid):
        check_algorithm(base_cfg.replace(**point))    # range checks of every grid value, known algorithm
    from ..pipeline import check_inputs
    for sparsity in grid["sparsity"]:                 # data, base checkpoint, reachable target: before any trial
        check_inputs(base_cfg.replace(sparsity=sparsity))
    out = resolve_location(getattr(args, "out_dir", args.default_out_dir))
    storage = getattr(args, "storage_path", None)
    if storage is None:
        storage, name = out, EXPERIMENT
    else:
        storage = resolve_location(storage)
        name = EXPERIMENT if storage == out else (out.rstrip("/").rsplit("/", 1)[-1] or EXPERIMENT)
    base = {k: v for k, v in base_cfg.to_dict().items()
            if k not in GRID_KEYS + ("out_dir", "resume", "overwrite", "ray_address")}
    return SweepPlan(kind, out, storage, name, base, grid, max_concurrent, max_failures,
                     fit_workers=not hasattr(args, "num_workers"),
                     reference=reference.lower() if reference else None)


# settings naming a local file or folder: trials run in folders of their own, so a
# relative path is taken from the folder the command was started in
_PATH_SETTINGS = ("base_checkpoint", "data_dir")


def _resolve_paths(args) -> None:
    for key in _PATH_SETTINGS:
        value = getattr(args, key, None)
        if value and not is_uri(value):
            setattr(args, key, str(Path(value).expanduser().resolve()))


def _dedupe(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def plan_for_resume(args) -> SweepPlan:
    """The saved plan of ``--resume DIR`` (which takes no other settings)."""
    given = sorted(k for k in vars(args) if k not in
                   ("command", "quiet", "verbose", "resume_dir", "ray_address", "sweep_kind", "default_seed_count",
                    "default_out_dir"))
    if given:
        raise ConfigError(f"--resume DIR uses the settings saved in DIR/{SWEEP_FILE}; drop "
                          f"--{given[0].replace('grid_', '').replace('_', '-')}")
    where = args.resume_dir
    if read_sweep_file(where) is None:
        raise ConfigError(f"nothing to resume in {where} (no {SWEEP_FILE})")
    plan = load_plan(where)
    if plan.kind != args.sweep_kind:
        raise ConfigError(f"{where} holds a {plan.kind}; resume it with rlpruner {plan.kind} --resume")
    return plan


def load_plan(where) -> SweepPlan:
    where = str(where)
    saved = read_sweep_file(where)
    if saved is None:
        raise ConfigError(f"{where} is not a sweep folder (no {SWEEP_FILE})")
    plan = SweepPlan.from_dict(saved)
    if not is_uri(where):
        root = resolve_location(where)
        if plan.out_dir != root:            # the folder was moved: follow it
            if plan.storage_path == plan.out_dir:
                plan.storage_path = root
            plan.out_dir = root
    return plan
