"""What a sweep leaves behind: results.parquet (and for a comparison
comparison.parquet), the plots, the tables printed on stdout, and ``rlpruner
report``, which rebuilds all of them from a (partial) sweep folder."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from .plan import SweepPlan, load_plan
from .plots import write_comparison_plot, write_pareto
from .storage import (OUTPUT_FILES, PAIRED_CSV, PAIRED_FILE, collect_rows, publish, trial_files, trial_name,
                      trial_status)

# a pair of methods whose achieved reductions differ by more than this (points) is
# flagged: about as much accuracy as the differences being measured
SIZE_GAP_PTS = 0.5
# the final-row column holding what the target counts (kept fraction, or removed for filters)
_TARGET_KEPT = {"macs": "final_macs_kept", "params": "final_params_kept"}

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
    comparison.png, paired.parquet + paired.csv), then the table(s) on stdout.
    Before any trial finished there is nothing to plot, rank or pair: only
    results.parquet (the steps so far) is written."""
    from ..report import write_table
    rows = collect_rows(plan)
    write_table(plan.root / "results.parquet", results_table(rows))
    if not any(r.get("final") for r in rows):
        publish(plan, ["results.parquet"])
        return rows
    write_pareto(plan, rows, plan.root / "pareto.png")
    if echo:
        print_sweep_table(plan, rows)
    if plan.kind == "compare":
        comp = comparison_rows(plan, rows)
        write_table(plan.root / "comparison.parquet", comparison_table(comp))
        write_comparison_plot(plan, rows, comp, plan.root / "comparison.png")
        paired = paired_rows(plan, rows)
        write_table(plan.root / PAIRED_FILE, paired_table(paired))
        _write_csv(plan.root / PAIRED_CSV, paired_table(paired))
        if echo:
            print_ranking(plan, rows)
            print_paired(plan, paired)
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


def _write_csv(path, table) -> None:
    import io
    import pyarrow.csv as pacsv
    from ..checkpoint import atomic_write_bytes
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def _target_reduction(plan: SweepPlan, r: dict) -> float:
    """Points of the target's measure (MACs, params or filters) a finished trial removed."""
    kept = _TARGET_KEPT.get(plan.base.get("target"))
    return 100.0 * (1.0 - r[kept]) if kept else 100.0 * r["final_filters_sparsity"]


def paired_rows(plan: SweepPlan, rows: list[dict]) -> list[dict]:
    """One row per algorithm: its means over finished seeds (test top-1, achieved
    reduction, compute, wall time) and its paired difference in test top-1 against
    the reference on the seeds both finished (Student t interval, ``stats``), with
    the largest gap between the pair's achieved reductions and its flag."""
    import numpy as np
    from ..stats import CONFIDENCE, paired_difference
    reference = plan.reference
    finals = {(r["algo"], r["seed"]): r for r in rows if r.get("final")}
    out = []
    for algo in plan.grid["algo"]:
        mine = [finals[(algo, s)] for s in plan.grid["seed"] if (algo, s) in finals]
        compute = [r.get("compute_forward_equivalents") for r in mine]
        row = {"algo": algo, "reference": reference, "seeds_finished": len(mine),
               "seeds_asked": len(plan.grid["seed"]), "target": plan.base.get("target"),
               "test_top1": _mean([r["test_top1"] for r in mine]),
               "target_reduction_pts": _mean([_target_reduction(plan, r) for r in mine]),
               "macs_reduction_pts": _mean([100.0 * (1.0 - r["final_macs_kept"]) for r in mine]),
               "compute_forward_equivalents": None if not compute or None in compute else _mean(compute),
               "wall_s": _mean([r["wall_seconds"] for r in mine]), "pairs": 0, "diff_pts": None,
               "diff_low": None, "diff_high": None, "p_value": None, "confidence": CONFIDENCE,
               "separated": None, "reduction_gap_pts": None, "unequal_size": None}
        if algo != reference:
            seeds = [s for s in plan.grid["seed"] if (algo, s) in finals and (reference, s) in finals]
            if seeds:
                mine_, ref_ = [finals[(algo, s)] for s in seeds], [finals[(reference, s)] for s in seeds]
                d = paired_difference([r["test_top1"] for r in mine_], [r["test_top1"] for r in ref_], scale=100)
                gap = float(np.max(np.abs([_target_reduction(plan, a) - _target_reduction(plan, b)
                                           for a, b in zip(mine_, ref_)])))
                row.update(pairs=d.n, diff_pts=d.mean, diff_low=_finite(d.low), diff_high=_finite(d.high),
                           p_value=_finite(d.p_value), separated=d.separated() if d.n >= 2 else None,
                           reduction_gap_pts=gap, unequal_size=gap > SIZE_GAP_PTS)
        out.append(row)
    return out


def _mean(values) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _finite(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def paired_table(rows: list[dict]):
    import pyarrow as pa
    f, i, b, t = pa.float64(), pa.int64(), pa.bool_(), pa.string()
    schema = pa.schema([("algo", t), ("reference", t), ("seeds_finished", i), ("seeds_asked", i), ("target", t),
                        ("test_top1", f), ("target_reduction_pts", f), ("macs_reduction_pts", f),
                        ("compute_forward_equivalents", f), ("wall_s", f), ("pairs", i), ("diff_pts", f),
                        ("diff_low", f), ("diff_high", f), ("p_value", f), ("confidence", f), ("separated", b),
                        ("reduction_gap_pts", f), ("unequal_size", b)])
    return pa.Table.from_pylist(rows, schema)


def print_paired(plan: SweepPlan, paired: list[dict]) -> None:
    """The answer to "which is better": each method's test top-1 minus the
    reference's, paired by seed, with its t interval, beside its size and cost."""
    level = f"{100 * paired[0]['confidence']:.0f}%" if paired else ""
    body = []
    for r in paired:
        if r["algo"] == plan.reference:
            diff = "(reference)"
        elif r["pairs"] == 0:
            diff = "no finished pair"
        elif r["diff_low"] is None:
            diff = f"{r['diff_pts']:+.2f} (1 pair: no interval)"
        else:
            diff = f"{r['diff_pts']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}]" + \
                   (" separated" if r["separated"] else "")
        size = _fmt(r["target_reduction_pts"], ".1f") + ("  !" if r["unequal_size"] else "")
        body.append([r["algo"], f"{r['seeds_finished']}/{r['seeds_asked']}", _fmt(r["test_top1"], ".4f"), diff,
                     size, _fmt(r["macs_reduction_pts"], ".1f"), _fmt(r["compute_forward_equivalents"], ".0f", "n/a"),
                     _fmt(r["wall_s"], ".0f")])
    print(f"paired difference in test top-1 (points) against {plan.reference}, same seeds, {level} Student t "
          f"interval; target: {plan.grid['sparsity'][0]:g} of the {plan.base.get('target')}:")
    _print_rows(["algo", "seeds", "test top-1", f"vs {plan.reference} [{level} t]",
                 f"{plan.base.get('target')} removed %", "MACs removed %", "compute (fwd eq.)", "wall s"], body)
    flagged = [r["algo"] for r in paired if r["unequal_size"]]
    if flagged:
        print(f"! achieved reductions differ from {plan.reference}'s by more than {SIZE_GAP_PTS:g} points for "
              f"{', '.join(flagged)}: those differences compare models of different sizes")


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


def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def _print_rows(header: list[str], body: list[list[str]]) -> None:
    width = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    for row in [header, *body]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip())
