"""One grid point as a Ray Tune trial: the resources it asks for, the function
trainable that runs :func:`rlpruner_ray.pipeline.compress` in the trial's folder
and reports after every step, and the checkpoints that let a retry continue after
the last finished step."""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from pathlib import Path

from ..config import RESULT_KEYS, CompressConfig
from ..errors import RLPrunerError
from .plan import GRID_KEYS, SweepPlan
from .storage import ERROR_FILE, ROWS_FILE, TRIAL_FILE, TRIALS_DIR, read_json, read_rows, temp_dir_for, trial_name

# Test hook: a trial raises once right after reporting this step (retry tests).
FAIL_ENV = "RLPRUNER_TEST_FAIL_AFTER_STEP"
# Keys of a step record (or of the final summary) that go into a result row.
_STEP_KEYS = ("filters_removed", "macs", "params", "macs_reduction", "params_reduction", "chosen_reward",
              "chosen_accuracy", "chosen_source", "best_reward", "evaluations", "val_top1_before_finetune",
              "val_top1", "finetune_best_epoch", "search_seconds", "step_seconds")


# ---------------------------------------------------------------------- resources
def trial_bundles(config: CompressConfig) -> list[dict]:
    """Placement-group bundles of one trial: the trial's own process (1 CPU, plus a
    GPU share when it fine-tunes on a GPU), then what its search asks for."""
    from ..search.registry import native_names, planned_resources
    gpu_driver = config.device.startswith("cuda") or (config.device == "auto" and config.gpus_per_worker > 0)
    head = {"CPU": 1.0, "GPU": min(1.0, config.gpus_per_worker or 1.0) if gpu_driver else 0.0}
    if config.algo.lower() in native_names():
        rest = [{"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker}] * config.num_workers
    else:
        try:
            from ..search.rllib import rllib_bundles
            driver, *rest = rllib_bundles(config)          # the driver learns when there are no learners
            head["GPU"] = max(head["GPU"], float(driver.get("GPU", 0.0)))
        except ImportError:
            rest = [planned_resources(config)]
    bundles = [{k: float(v) for k, v in b.items() if v and v > 0} for b in [head, *rest]]
    return [b for b in bundles if b]


def resources_fn(plan_dict: dict):
    """Tune's per-trial resources: the placement group of the trial's grid point."""
    def resources(params: dict):
        from ray.tune import PlacementGroupFactory
        plan = SweepPlan.from_dict(plan_dict)
        return PlacementGroupFactory(trial_bundles(plan.trial_config(params)))
    return resources


# ---------------------------------------------------------------------- the trainable
def run_trial(params: dict, plan: dict) -> None:
    """Tune function trainable: one compress run, reporting after every step."""
    from ray import tune
    from ray.tune import Checkpoint
    from ..checkpoint import atomic_write_json
    from ..pipeline import compress

    plan_obj = SweepPlan.from_dict(plan)
    params = {k: params[k] for k in GRID_KEYS}
    name = trial_name(params)
    work = _trial_work_dir(plan_obj, name)
    cfg = plan_obj.trial_config(params, out_dir=str(work))
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()

    attempts = int(read_json(work / TRIAL_FILE).get("attempts", 0))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            attempts = max(attempts, int(read_json(Path(d) / TRIAL_FILE).get("attempts", 0)))
            if not _local_is_ahead(work, Path(d), cfg):   # e.g. the retry runs on another node
                _restore_into(Path(d), work)
    attempt = attempts + 1
    where = _where_this_runs()
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / TRIAL_FILE, {"name": name, "params": params, "trial_id": trial_id,
                                         "attempts": attempt, "kind": plan_obj.kind, "pid": os.getpid(), **where})
    rows = []
    if (work / "config.json").is_file():
        same = _same_settings(work, cfg)
        cfg = cfg.replace(resume=True) if same else cfg.replace(overwrite=True)
        rows = read_rows(work / ROWS_FILE) if same else []
    base_row = {"trial": name, "trial_id": trial_id, **params, "attempt": attempt, **where}

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
                rows.append({**base_row, **_step_row(record), "attempt": None, "node_id": None, "host": None})
        rows.sort(key=lambda r: r["step"])
        rows[-1] = {**rows[-1], **_final_row(summary)}
        _write_rows(work / ROWS_FILE, rows)
        report(rows[-1], final=True)

    if cfg.resume and (work / "summary.json").is_file():
        summary = read_json(work / "summary.json")
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


def _where_this_runs() -> dict:
    """The Ray node and host of this attempt: each result row names where its step
    ran (after a node is lost, the retried steps name the node that took over)."""
    import socket
    import ray
    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}


def _trial_work_dir(plan: SweepPlan, name: str) -> Path:
    """The trial's compress folder: ``<out_dir>/trials/<name>`` (named by the grid
    point, so retries, restores and fresh restarts find the same folder); a
    temporary folder on a node where that path cannot be created."""
    work = plan.root / TRIALS_DIR / name
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError:
        work = temp_dir_for(str(work), "rlpruner-trial")
        work.mkdir(parents=True, exist_ok=True)
    return work


def _same_settings(work: Path, cfg: CompressConfig) -> bool:
    from ..pipeline import _norm
    saved = read_json(work / "config.json")
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


# ---------------------------------------------------------------------- rows and metrics
def _write_rows(path: Path, rows: list[dict]) -> None:
    from ..checkpoint import atomic_write_bytes
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def _step_row(record: dict) -> dict:
    row = {"step": int(record["step"]), "final": False, "filters_sparsity": float(record["sparsity"])}
    row.update({k: record[k] for k in _STEP_KEYS if k in record})
    row["macs_kept"] = 1.0 - float(record["macs_reduction"])
    row["params_kept"] = 1.0 - float(record["params_reduction"])
    return row


def _final_row(summary: dict) -> dict:
    b, p, r = summary["base"], summary["pruned"], summary["reductions"]
    return {"final": True, "test_top1": p["test_top1"], "test_top5": p.get("test_top5"),
            "final_val_top1": p["val_top1"], "final_macs": p["macs"], "final_params": p["params"],
            "final_macs_kept": 1.0 - r["macs"], "final_params_kept": 1.0 - r["params"],
            "final_filters_sparsity": r["filters"], "latency_ms_cpu_b1": p.get("latency_ms_cpu_b1"),
            "base_test_top1": b["test_top1"], "base_val_top1": b["val_top1"], "base_macs": b["macs"],
            "base_params": b["params"], "base_latency_ms_cpu_b1": b.get("latency_ms_cpu_b1"),
            "total_evaluations": summary["evaluations"], "wall_seconds": summary["wall_seconds"],
            # what the trial executed (compute.Ledger) and its wall time, for comparisons at equal compute
            "compute_macs": summary["compute"]["macs"],
            "compute_forward_equivalents": summary["compute"]["forward_equivalents"],
            "wall_s": summary["compute"]["wall_s"],
            "selection_top1": p.get("selection_top1")}


def _metrics(row: dict) -> dict:
    """What goes to tune.report: scalars only, none of Tune's reserved names."""
    return {k: v for k, v in row.items() if k != "trial_id" and (v is None or isinstance(v, (int, float, str, bool)))}


# ---------------------------------------------------------------------- checkpoints
def _by_step(folder: Path, suffix: str) -> dict[int, Path]:
    """The ``step_NNN<suffix>`` files of a folder by step number (none when it is missing)."""
    if not folder.is_dir():
        return {}
    pattern = re.compile(rf"step_(\d+){re.escape(suffix)}$")
    return {int(m.group(1)): p for p in folder.glob(f"step_*{suffix}") if (m := pattern.match(p.name))}


def _step_files(folder: Path) -> list[int]:
    """The steps with a checkpoint in ``folder/steps``, in order."""
    return sorted(_by_step(folder / "steps", ".pt"))


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
    from ..pipeline import RESULT_FILES
    stage = work / ".tune_checkpoint"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    names = ["config.json", "base_model.pt", ROWS_FILE, TRIAL_FILE] + (list(RESULT_FILES) if final else [])
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
    from ..pipeline import RESULT_FILES
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
        for n in RESULT_FILES:
            (work / n).unlink(missing_ok=True)


def _drop_steps_after(work: Path, last: int) -> None:
    """Delete the step checkpoints, algorithm state and history of steps > ``last``."""
    for step in _step_files(work):
        if step > last:
            (work / "steps" / f"step_{step:03d}.pt").unlink(missing_ok=True)
            shutil.rmtree(work / "steps" / f"step_{step:03d}_algo", ignore_errors=True)
    for step, f in _by_step(work / "history", ".parquet").items():
        if step > last:
            f.unlink(missing_ok=True)
