"""What a sweep leaves behind: results.parquet (and for a comparison
comparison.parquet), the plots, the tables printed on stdout, and ``rlpruner
report``, which rebuilds all of them from a (partial) sweep folder."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from .plan import SweepPlan, load_plan
from .plots import write_comparison_plot, write_pareto
from .storage import OUTPUT_FILES, collect_rows, publish, trial_files, trial_name, trial_status

_FIRST_COLUMNS = ("trial", "algo", "sparsity", "reward", "criterion", "seed", "step", "final", "attempt")


def report_command(sweep_dir) -> int:
    plan = load_plan(sweep_dir)
    rows = write_outputs(plan)
    status = trial_status(plan, rows)
    done = sum(s == "done" for s in status.values())
    print(f"{done} of {len(status)} trials finished; results in {plan.out_dir}")
    return 0


def write_outputs(plan: SweepPlan, *, echo: bool = True) -> list[dict]:
    """results.parquet + pareto.png (and for a comparison comparison.parquet +
    comparison.png), then the table(s) on stdout."""
    from ..report import write_table
    rows = collect_rows(plan)
    write_table(plan.root / "results.parquet", results_table(rows))
    write_pareto(plan, rows, plan.root / "pareto.png")
    if echo:
        print_sweep_table(plan, rows)
    if plan.kind == "compare":
        comp = comparison_rows(plan, rows)
        write_table(plan.root / "comparison.parquet", comparison_table(comp))
        write_comparison_plot(plan, rows, comp, plan.root / "comparison.png")
        if echo:
            print_ranking(plan, rows)
    publish(plan, OUTPUT_FILES)
    return rows


# ---------------------------------------------------------------------- parquet tables
def results_table(rows: list[dict]):
    """results.parquet: one row per trial and step (a column of mixed types as strings)."""
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


def comparison_table(rows: list[dict]):
    import pyarrow as pa
    schema = pa.schema([("algo", pa.string()), ("seed", pa.int64()), ("trial", pa.string()), ("step", pa.int32()),
                        ("evaluation", pa.int32()), ("evaluations_spent", pa.int64()), ("reward", pa.float64()),
                        ("best_reward", pa.float64()), ("accuracy", pa.float64()), ("macs", pa.float64()),
                        ("params", pa.float64()), ("chosen", pa.bool_()), ("wall_seconds", pa.float64()),
                        ("step_val_top1", pa.float64()), ("step_macs", pa.float64()), ("test_top1", pa.float64()),
                        ("compute_forward_equivalents", pa.float64()), ("wall_s", pa.float64())])
    return pa.Table.from_pylist(rows, schema)


def comparison_rows(plan: SweepPlan, rows: list[dict]) -> list[dict]:
    """One row per algorithm, seed, step and evaluation, from each trial's
    history (every candidate scored) and step records."""
    import pyarrow.parquet as pq
    step_info = {(r["trial"], r["step"]): r for r in rows}
    final = {r["trial"]: r for r in rows if r.get("final")}
    out = []
    with tempfile.TemporaryDirectory(prefix="rlpruner-ckpt-") as scratch:
        for params in plan.grid_points():
            name = trial_name(params)
            folder = trial_files(plan, name, Path(scratch))
            if folder is None:
                continue
            parts = ([folder / "history.parquet"] if (folder / "history.parquet").is_file()
                     else sorted((folder / "history").glob("step_*.parquet")))
            cand = [c for p in parts for c in pq.read_table(p, columns=["step", "evaluation", "reward", "accuracy",
                                                                         "macs", "params", "seconds",
                                                                         "chosen"]).to_pylist()]
            cand.sort(key=lambda c: (c["step"], c["evaluation"]))
            spent, wall, best, cur_step, elapsed_steps = 0, 0.0, None, None, 0.0
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
                            "best_reward": best, "accuracy": c["accuracy"], "macs": c["macs"],
                            "params": c["params"], "chosen": c["chosen"], "wall_seconds": wall,
                            "step_val_top1": info.get("val_top1"), "step_macs": info.get("macs"),
                            "test_top1": final.get(name, {}).get("test_top1"),
                            # the trial's totals, like test_top1 (compute.Ledger's summary)
                            "compute_forward_equivalents": final.get(name, {}).get("compute_forward_equivalents"),
                            "wall_s": final.get(name, {}).get("wall_s")})
    return out


# ---------------------------------------------------------------------- printed tables
def print_sweep_table(plan: SweepPlan, rows: list[dict]) -> None:
    last: dict[str, dict] = {}
    for r in rows:
        if r["trial"] not in last or r["step"] >= last[r["trial"]]["step"]:
            last[r["trial"]] = r
    status = trial_status(plan, rows)
    body = []
    for params in plan.grid_points():
        name = trial_name(params)
        r = last.get(name, {})
        body.append([params["algo"], f"{params['sparsity']:g}", params["reward"], params["criterion"],
                     str(params["seed"]), status[name], str(r["step"]) if r else "0",
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


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _print_rows(header: list[str], body: list[list[str]]) -> None:
    width = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    for row in [header, *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip())
