"""Where a sweep keeps things: its folder layout, local folders and URIs
(``s3://``, ``gs://``, ``file://``, through pyarrow filesystems), publishing result
files to a URI out dir, and reading the trials' rows back from their own folders
or from Ray Tune's storage."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError

SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
ROWS_FILE = "rows.jsonl"
TRIAL_FILE = "trial.json"
ERROR_FILE = "error.json"
EXPERIMENT = "tune"
PAIRED_FILE, PAIRED_CSV = "paired.parquet", "paired.csv"     # (compare) differences against --reference
OUTPUT_FILES = ("results.parquet", "pareto.png", "comparison.parquet", "comparison.png", PAIRED_FILE, PAIRED_CSV)
# What Tune adds to every reported result (not ours to keep in results.parquet).
_TUNE_KEYS = {"config", "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
              "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
              "iterations_since_restore", "experiment_tag"}


# ---------------------------------------------------------------------- names and places
def trial_name(params: dict) -> str:
    """A readable folder name for one grid point (stable across retries and resumes)."""
    raw = (f"{params['algo']}-s{float(params['sparsity'])!r}-{params['reward']}-{params['criterion']}"
           f"-seed{params['seed']}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", raw)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve_location(where: str) -> str:
    """A URI without its trailing slash; a local path made absolute."""
    return where.rstrip("/") if is_uri(where) else str(Path(where).expanduser().resolve())


def temp_dir_for(key: str, prefix: str) -> Path:
    """A folder under the system temp dir, the same for the same key."""
    return Path(tempfile.gettempdir()) / f"{prefix}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def local_dir_for(out_dir: str) -> Path:
    """The out dir itself, or for a URI the local staging folder of its files."""
    return temp_dir_for(out_dir.rstrip("/"), "rlpruner-sweep") if is_uri(out_dir) else Path(out_dir)


def open_fs(uri: str):
    """(pyarrow filesystem, path in it) of a local path or URI; (None, None) when
    the scheme is unknown or the storage cannot be reached."""
    from pyarrow import fs as pafs
    try:
        if is_uri(uri):
            return pafs.FileSystem.from_uri(uri)
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    except Exception:          # noqa: BLE001 (no credentials / unknown scheme)
        return None, None


def read_text(fs, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except Exception:          # noqa: BLE001
        return None


def read_json(path) -> dict:
    """A local JSON file, or {} when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def parse_rows(text: str | None) -> list[dict]:
    """The JSON lines of a rows file or of Tune's result.json (unreadable lines skipped)."""
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def read_rows(path) -> list[dict]:
    try:
        return parse_rows(Path(path).read_text())
    except OSError:
        return []


def read_sweep_file(where: str) -> dict | None:
    """``sweep.json`` of a local folder or a URI (None when there is none)."""
    if is_uri(where):
        fs, path = open_fs(resolve_location(where))
        if fs is None:
            raise ConfigError(f"cannot open {where}: unknown scheme or no access")
        text = read_text(fs, f"{path}/{SWEEP_FILE}")
        return json.loads(text) if text else None
    path = Path(resolve_location(where)) / SWEEP_FILE
    return read_json(path) if path.is_file() else None


# ---------------------------------------------------------------------- writing to the out dir
def publish(plan, names) -> None:
    """Copy result files of the local staging folder to a URI out dir."""
    if not plan.remote:
        return
    fs, base = open_fs(plan.out_dir)
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


def clear(plan) -> None:
    """--overwrite: remove what an earlier sweep in this out dir wrote (only that)."""
    root = plan.root
    for n in (SWEEP_FILE, *OUTPUT_FILES):
        (root / n).unlink(missing_ok=True)
    shutil.rmtree(root / TRIALS_DIR, ignore_errors=True)
    fs, base = open_fs(plan.out_dir) if plan.remote else (None, None)
    if fs is not None:
        for n in (SWEEP_FILE, *OUTPUT_FILES):
            try:
                fs.delete_file(f"{base}/{n}")
            except OSError:
                pass
    fs, exp = open_fs(plan.experiment_path)
    if fs is not None:
        try:
            fs.delete_dir(exp)
        except OSError:
            pass


# ---------------------------------------------------------------------- reading trials back
def collect_rows(plan) -> list[dict]:
    """One row per trial and step, from each trial's own folder, else from its
    latest checkpoint or Tune's result.json in the experiment folder."""
    by_trial: dict[str, list[dict]] = {}
    for params in plan.grid_points():
        name = trial_name(params)
        rows = read_rows(plan.root / TRIALS_DIR / name / ROWS_FILE) or _rows_from_storage(plan, name)
        merged: dict[int, dict] = {}
        for r in rows:
            merged[int(r["step"])] = {**merged.get(int(r["step"]), {}), **r}
        by_trial[name] = [{**params, **merged[s], "trial": name} for s in sorted(merged)]
    return [r for name in by_trial for r in by_trial[name]]


def trial_status(plan, rows: list[dict]) -> dict[str, str]:
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


def trial_error(plan, name: str) -> str | None:
    return read_json(plan.root / TRIALS_DIR / name / ERROR_FILE).get("error")


def trial_files(plan, name: str, scratch: Path) -> Path | None:
    """A local folder holding the trial's summary.json / history (its own folder,
    else its latest checkpoint, downloaded when the storage is remote)."""
    work = plan.root / TRIALS_DIR / name
    if (work / "summary.json").is_file() or (work / "history").is_dir():
        return work
    for fs, _, ck in _stored_attempts(plan, name):
        if ck is None:
            continue
        if not is_uri(plan.experiment_path):
            return Path(ck)
        from pyarrow import fs as pafs
        local = scratch / name
        try:
            pafs.copy_files(ck, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return local
        except Exception:      # noqa: BLE001
            continue
    return None


def _rows_from_storage(plan, name: str) -> list[dict]:
    """Rows of a trial without a local folder: Tune's result.json, overlaid by the
    rows file of its latest checkpoint."""
    for fs, trial_dir, ck in _stored_attempts(plan, name):
        rows = [{k: v for k, v in r.items() if k not in _TUNE_KEYS}
                for r in parse_rows(read_text(fs, f"{trial_dir}/result.json")) if "step" in r and "trial" in r]
        rows += parse_rows(read_text(fs, f"{ck}/{ROWS_FILE}") if ck else None)
        if rows:
            return rows
    return []


def _stored_attempts(plan, name: str):
    """(filesystem, folder, latest checkpoint or None) of each of the trial's
    folders in the experiment folder, newest first."""
    fs, base = open_fs(plan.experiment_path)
    if fs is None:
        return
    dirs = sorted(_subfolders(fs, base, name + "_"), key=lambda i: i.mtime_ns or 0)
    for info in reversed(dirs):
        ckpts = sorted(i.path for i in _subfolders(fs, info.path, "checkpoint_"))
        yield fs, info.path, (ckpts[-1] if ckpts else None)


def _subfolders(fs, folder: str, prefix: str) -> list:
    """File infos of the folders in ``folder`` whose name starts with ``prefix``."""
    from pyarrow import fs as pafs
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return []
    return [i for i in infos if i.type == pafs.FileType.Directory and Path(i.path).name.startswith(prefix)]
