"""scripts/bench.py --quick runs end to end and writes a well-formed report:
every section heading, parseable numbers in every table, and a rows file with
the expected columns."""
from __future__ import annotations

import importlib
import json
import importlib.util
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench.py"
# columns that hold names rather than numbers
TEXT_HEADERS = {"model", "method", "path", "what", "value", "reward", "spread over the candidates",
                "ray overhead per evaluation", "target masked <= 1.2x", "target >= 1.7x", "footing", "chosen on"}
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[+-]?\d+)?( ± (-?\d+(\.\d+)?|n/a))?[x%]?$")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables(text: str):
    """(header cells, data rows) of every Markdown table."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = (cells, [])
                tables.append(current)
            elif not all(set(c) <= set("-:") for c in cells):
                current[1].append(cells)
        else:
            current = None
    return tables


def test_sample_efficiency_helper():
    bench = _bench_module()
    assert bench.evals_to_fraction([0.5, 0.9, 0.95, 1.0], 0.95) == 3
    assert bench.evals_to_fraction([1.0, 0.2], 0.95) == 1
    assert bench.evals_to_fraction([0.1, 0.2, 0.3], 0.99) == 3


def test_cost_verdict_names_the_cheaper_path():
    verdict = _bench_module().cost_verdict
    # BENCHMARKS.md section 1: physical minus masked = 1.014 - 1.053 and 0.941 - 1.068
    assert "physical path is the cheaper one by 0.04x to 0.13x" in verdict([1.014 - 1.053, 0.941 - 1.068], 256)
    assert "masked path is the cheaper one by 0.20x to 0.30x" in verdict([0.2, 0.3], 256)
    assert "cost about the same" in verdict([0.05, -0.08], 256)
    assert "neither path is cheaper for every model" in verdict([0.3, -0.2], 256)


def _package(name: str):
    _bench_module()                       # puts scripts/ on the path
    return importlib.import_module(f"bench.{name}")


def test_paired_differences_carry_t_and_bootstrap_intervals():
    quality = _package("quality")

    def run(method, seed, top1):
        return {"method": method, "seed": seed, "summary": {"pruned": {"test_top1": top1}}}
    runs = {f"{m}_{s}": run(m, s, v) for m, s, v in [("rlpruner", 0, 0.80), ("rlpruner", 1, 0.82),
                                                      ("rlpruner", 2, 0.81), ("tp-global", 0, 0.79),
                                                      ("tp-global", 1, 0.80), ("uniform", 0, 0.70)]}
    paired = quality.paired_differences(runs, [["rlpruner", "tp-global"], ["rlpruner", "uniform"]], 1000)
    d = paired["rlpruner - tp-global"]
    assert d["seeds"] == [0, 1] and d["diffs"] == pytest.approx([0.01, 0.02])
    assert d["mean"] == pytest.approx(0.015) and d["low"] <= d["mean"] <= d["high"]
    # two seeds: the t interval is mean -+ t(0.95, 1) * sd / sqrt(2) = 0.015 -+ 6.314 * 0.005
    assert d["low"] == pytest.approx(0.015 - 6.3138 * 0.005, abs=1e-4)
    assert d["high"] == pytest.approx(0.015 + 6.3138 * 0.005, abs=1e-4)
    assert d["boot_low"] >= 0.01 and d["boot_high"] <= 0.02      # the bootstrap cannot leave the data
    assert paired["rlpruner - uniform"]["seeds"] == [0] and math.isnan(paired["rlpruner - uniform"]["low"])


def test_every_method_gets_the_same_fine_tuning_in_total(tmp_path):
    quality, report = _package("quality"), _package("report")
    args = _package("cli").parse_args(["--work-dir", str(tmp_path), "--data", str(tmp_path),
                                       "--base", str(tmp_path / "base.pt")])
    bench = report.Bench(args)
    assert bench.P["dataset"] == f"npz:{tmp_path.resolve()}" and bench.P["base"] == str(tmp_path / "base.pt")
    total = {}
    for method in bench.P["methods"]:
        cfg = quality.run_config(bench, method, 0, "base.pt")
        steps = quality.num_steps(bench.P, method)
        total[method] = cfg["finetune_epochs"] * steps
        assert cfg["target"] == "macs" and cfg["sparsity"] == 0.5
        assert cfg["max_batches_per_epoch"] == bench.P["finetune_batches"]
        one_step = quality.variant(method)[1].get("one_step", False)
        assert cfg["evaluations_per_step"] == bench.P["evals"] * (quality.search_steps(bench.P) if one_step else 1)
        assert (steps == 1) == (quality.algo_of(method) in quality.ONE_SHOT or one_step)
        # every search runs with an explicit reward metric: a changed default cannot pass for it
        assert cfg.get("reward_metric", "n/a") == ("n/a" if quality.algo_of(method) in quality.ONE_SHOT else
                                                  "kl" if method == "rlpruner-kl" else bench.P["reward_metric"])
        assert cfg["algo"] == quality.algo_of(method)
        # and an explicit criterion: the project's default (l1), the paper's (taylor) for
        # the paper's search, or what the variant names
        expected = "taylor" if method == "rlpruner-paper" or method.endswith("-taylor") else "l1"
        assert cfg["criterion"] == expected
        assert cfg["out_dir"].endswith(f"{method}_s0")
    assert set(total.values()) == {bench.P["finetune_total_epochs"]}, total
    assert {"rlpruner", "global", "tp-global"} <= set(bench.P["paired_methods"])
    assert len(bench.P["paired_seeds"]) >= 3 and bench.P["fid_samples"] >= 60


def test_the_gpu_section_is_kept_as_bench_gpu_wrote_it(tmp_path):
    report = _package("report")
    out = tmp_path / "B.md"
    assert "Not measured" in report._gpu_section(out)
    out.write_text("# Benchmarks\n\n## 6. Sample efficiency\n\nx\n\n## GPU\n\nH200 figures\n| a | 1 |\n")
    assert report._gpu_section(out) == "## GPU\n\nH200 figures\n| a | 1 |"


def test_cost_agreement_is_judged_on_outputs_with_a_tolerance():
    cost = _package("cost")
    models = ["resnet56", "mobilenetv3_large"]
    info = {m: {"masked_relative_gap": g, "masked_equals_physical": g <= cost.MASK_TOLERANCE}
            for m, g in zip(models, [3e-7, 7.5e-7])}
    text = cost._agreement({"info": info}, models, True)
    assert "same outputs on the reward batches: yes" in text and "mobilenetv3_large 7.5e-07" in text
    info["resnet56"]["masked_relative_gap"] = 0.2
    assert "**NO**" in cost._agreement({"info": info}, models, False)
    # a state from before the outputs were compared still renders its old verdict
    old = {m: {"masked_equals_physical": True} for m in models}
    assert "same reward-batch accuracy: yes" in cost._agreement({"info": old}, models, True)


def test_sections_not_rerun_are_carried_over_from_the_previous_state(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    common, report, cli = _package("common"), _package("report"), _package("cli")
    rows = tmp_path / "rows.parquet"
    previous = [common.row(k, "m", "v", "x", float(k)) for k in (1, 3, 4)]
    pq.write_table(pa.Table.from_pylist(previous), rows)
    state = {"profile": "quick", "sections": {"1": {"a": 1}, "3": {"b": 3}, "4": {"c": 4}},
             "seconds": {"1": 10.0, "3": 30.0, "4": 40.0}, "machine": {"date": "then"}, "command": "bench old"}
    (tmp_path / "rows_state.json").write_text(json.dumps(state))
    bench = report.Bench(cli.parse_args(["--quick", "--rows", str(rows), "--work-dir", str(tmp_path)]))
    bench.carry_over({3, 5, 6})
    assert bench.state["sections"] == {"1": {"a": 1}, "4": {"c": 4}}
    assert sorted(r["section"] for r in bench.rows) == [1, 4]
    assert "Section(s) 1, 4 are carried over unchanged from the run of then" in report._carried(bench.state)
    other = report.Bench(cli.parse_args(["--rows", str(rows), "--work-dir", str(tmp_path)]))   # full profile
    other.carry_over({3})
    assert other.state["sections"] == {} and other.rows == []


def test_merge_takes_only_the_sections_the_other_run_measured(tmp_path):
    """Quality and fidelity run side by side with their own --rows, then one report."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    common, report, cli = _package("common"), _package("report"), _package("cli")

    def write(name, sections, carried):
        rows = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist([common.row(int(k), name, "v", "x", 1.0) for k in sections]), rows)
        state = {"profile": "quick", "sections": {k: {"by": name} for k in sections},
                 "seconds": {k: 1.0 for k in sections}, "failed": {}, "machine": {"date": name},
                 "command": f"bench {name}", "total_seconds": 60.0, "profile_settings": {},
                 "carried": {"sections": carried, "date": "old", "command": "bench old"}}
        (tmp_path / f"{name}_state.json").write_text(json.dumps(state))
        return rows

    main = write("quality", ["1", "3", "4"], ["1", "4"])     # measured 3, carried an old 4
    side = write("fidelity", ["1", "3", "4"], ["1", "3"])    # measured 4 alone
    bench = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path)]))
    bench.load()
    bench.merge(side)
    assert {k: v["by"] for k, v in bench.state["sections"].items()} == {"1": "quality", "3": "quality",
                                                                      "4": "fidelity"}
    assert sorted((r["section"], r["item"]) for r in bench.rows) == [(1, "quality"), (3, "quality"),
                                                                    (4, "fidelity")]
    text = report._carried(bench.state)
    assert "Section(s) 1 are carried over" in text and "Section(s) 4 come from a run" in text
    # a later run of section 3 alone keeps section 4's origin (the merged run), and section 1's
    bench.state.update(machine={"date": "quality"}, command="bench quality")
    bench.save()
    again = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path)]))
    again.carry_over({3})
    assert again.state["carried"] == {"sections": ["1"], "date": "old", "command": "bench old",
                                     "version_mismatches": []}
    assert [m["sections"] for m in again.state["merged"]] == [["4"]]
    assert again.state["merged"][0]["command"] == "bench fidelity"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--merge", str(side), "--rows", str(main)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--merge only goes with --report-only" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--report-only", "--study", "x", "--rows", str(main)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "bench: --study only goes with --merge"
    before = main.read_bytes()
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--report-only", "--merge", str(tmp_path / "none"),
                        "--rows", str(main), "--out", str(tmp_path / "B.md")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"bench: no rows at {tmp_path / 'none'}"
    assert main.read_bytes() == before and not (tmp_path / "B.md").exists()     # nothing written


@pytest.mark.slow
def test_quick_benchmark_writes_a_well_formed_report(tmp_path):
    out, rows = tmp_path / "B.md", tmp_path / "rows.parquet"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--rows", str(rows),
                        "--work-dir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    text = out.read_text()
    bench = _bench_module()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    for title in [*bench.SECTIONS.values(), *bench.EXTRA_HEADINGS]:
        assert title in headings, title
    assert "FAILED" not in text
    # the masked path scores the model the physical path builds (outputs, not tie-prone top-1)
    assert "gave the same outputs on the reward batches: yes" in text
    assert "python scripts/bench.py --quick" in text                      # the exact command
    for word in ("CPU", "cores", "torch", "ray", "date (UTC)"):
        assert f"| {word} |" in text

    # every section has a table, and every cell outside a name column is a number
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for chunk in sections:
        title = chunk.splitlines()[0]
        if title in bench.SECTIONS.values():
            assert _tables(chunk), f"no table in section {title}"
    checked = 0
    for header, body in _tables(text):
        assert body, f"empty table {header}"
        for cells in body:
            assert len(cells) == len(header), cells
            for name, cell in zip(header, cells):
                if name.lower() in TEXT_HEADERS or name == header[0]:
                    continue
                assert cell == "n/a" or NUMBER.match(cell), f"{name}: {cell!r}"
                if cell != "n/a":
                    value = float(re.match(r"-?\d+(\.\d+)?(e[+-]?\d+)?", cell).group(0))
                    assert math.isfinite(value)
                    checked += 1
    assert checked > 50

    import pyarrow.parquet as pq
    table = pq.read_table(rows)
    assert tuple(table.column_names) == bench.ROW_COLUMNS
    data = table.to_pylist()
    assert {r["section"] for r in data} == set(bench.SECTIONS)
    assert all(isinstance(r["value"], float) for r in data)
    # the headline ratios are there and finite
    metrics = {(r["section"], r["metric"]) for r in data if math.isfinite(r["value"])}
    for key in [(1, "ratio_to_floor"), (2, "scaling_2_over_1"), (2, "ray_overhead_ms"), (3, "test_top1"),
                (5, "speedup"), (6, "evals_to_95pct")]:
        assert key in metrics, key
    assert any(r["section"] == 4 and r["metric"] == "rho" for r in data)   # NaN if every candidate ties


def _s3_run(method, seed, top1, curve=None):
    """A section-3 run record as the quality section keeps it (a made-up summary)."""
    s = {"base": {"test_top1": 0.85, "val_top1": 0.85, "macs": 4e7, "params": 2e5},
         "pruned": {"test_top1": top1, "test_top5": 0.99, "val_top1": top1, "macs": 2e7, "params": 1e5},
         "reductions": {"macs": 0.5, "params": 0.5}, "evaluations": len(curve or []) or 80, "wall_seconds": 100.0}
    run = {"method": method, "seed": seed, "dir": "d", "ok": True, "summary": s}
    if curve is not None:
        run["curve"] = list(curve)
    return f"{method}_s{seed}", run


def _s3_state(tmp_path, name, runs, methods, pairs, base="base.pt", **budgets):
    """Rows and state of a benchmark run that measured section 3 (and carried 4)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    common, quality = _package("common"), _package("quality")
    P = dict(common.PROFILES["quick"], methods=methods, paired_methods=methods, pairs=pairs, bootstrap=200, **budgets)
    st3 = {"base": {"file": base, "shared": True}, "runs": dict(runs)}
    st3["paired"] = quality.paired_differences(st3["runs"], pairs, 200)
    rows = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(quality.section_rows(st3) + [common.row(4, "x", "v", "y", 1.0)]), rows)
    state = {"profile": "quick", "sections": {"3": st3, "4": {}}, "seconds": {"3": 5.0, "4": 1.0},
             "failed": {}, "machine": {"date": name}, "command": f"bench {name}", "total_seconds": 60.0,
             "profile_settings": P, "carried": {"sections": ["4"], "date": "old", "command": "bench old"}}
    (tmp_path / f"{name}_state.json").write_text(json.dumps(state))
    return rows


def test_merge_adds_the_section_3_runs_of_a_run_that_measured_some_methods_only(tmp_path):
    """A new variant measured alone (--methods) joins the report run by run, and
    every pair is computed again over the union."""
    report, cli = _package("report"), _package("cli")
    run = _s3_run

    def write(*args, **kw):
        return _s3_state(tmp_path, *args, **kw)

    main = write("main", [run("a", 0, 0.80), run("a", 1, 0.81), run("b", 0, 0.70), run("b", 1, 0.71)],
                 ["a", "b"], [["a", "b"]])
    side = write("side", [run("b", 0, 0.72), run("b", 1, 0.73), run("c", 0, 0.90), run("c", 1, 0.92)],
                 ["b", "c"], [["c", "a"], ["c", "b"]])
    bench = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path)]))
    bench.load()
    bench.merge(side)
    st3 = bench.state["sections"]["3"]
    assert bench.P["methods"] == ["a", "b", "c"]
    assert {k: r["summary"]["pruned"]["test_top1"] for k, r in st3["runs"].items()} == {
        "a_s0": 0.80, "a_s1": 0.81, "b_s0": 0.72, "b_s1": 0.73, "c_s0": 0.90, "c_s1": 0.92}
    assert st3["paired"]["c - a"]["diffs"] == pytest.approx([0.10, 0.11])     # a pair across the two runs
    assert st3["paired"]["a - b"]["diffs"] == pytest.approx([0.08, 0.08])     # the newer b runs
    assert bench.state["carried"]["sections"] == ["4"]    # the side run carried 4 too: not taken from it
    diffs = {r["item"]: r["value"] for r in bench.rows if r["section"] == 3 and r["metric"] == "test_top1_diff_mean"}
    assert diffs == pytest.approx({"a - b": 0.08, "c - a": 0.105, "c - b": 0.185})
    assert sum(r["section"] == 4 for r in bench.rows) == 1
    assert "Section 3's runs of b, c come from a run" in report._carried(bench.state)
    assert [m.get("methods") for m in bench.state["merged"]] == [["b", "c"]]     # nothing else taken
    bench.save()
    again = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path)]))
    again.carry_over({1})            # a later run keeps the merged section 3 as this report's own
    assert "3" in again.state["carried"]["sections"]
    other = write("other", [run("c", 0, 0.9)], ["c"], [], base="another.pt")
    with pytest.raises(SystemExit, match="different base models"):
        bench.merge(other)


def test_a_search_only_study_names_each_pairs_seeds_when_they_differ(tmp_path):
    """ppo on 3 seeds, cmaes on 2: the summary must not say one count for both pairs."""
    report, cli = _package("report"), _package("cli")
    main = _s3_state(tmp_path, "main", [_s3_run("rlpruner", s, 0.80) for s in (0, 1)], ["rlpruner"], [])
    curves = {**{("ppo", s): [0.1, 0.3 + s / 10] for s in (0, 1, 2)},
              **{("random", s): [0.1, 0.2 + s / 20] for s in (0, 1, 2)},
              **{("cmaes", s): [0.2, 0.4] for s in (0, 1)}}
    search = _s3_state(tmp_path, "search", [_s3_run(m, s, 0.3, c) for (m, s), c in curves.items()],
                       ["ppo", "random", "cmaes"], [["ppo", "random"], ["cmaes", "random"]],
                       finetune_total_epochs=0, evals=2, step_fraction=0.5)
    bench = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path),
                                         "--out", str(tmp_path / "B.md")]))
    bench.load()
    bench.merge(search)
    _, summary = _package("quality").render_study(bench, "search only, 2 evaluations",
                                                  bench.state["studies"]["search only, 2 evaluations"])
    line = next(x for x in summary if x.startswith("Search-only study"))
    assert "points):" in line and "(3 seeds)" in line and "(2 seeds)" in line


def test_runs_with_other_budgets_join_the_report_as_studies_beside_the_headline(tmp_path):
    """The 3-epoch check and the search-only study (other --kd-epochs/--kd-batches/
    --evals-per-step) are merged as studies: their own tables and pairs, never the
    headline's; the search-only one pairs the best reward so far."""
    report, cli = _package("report"), _package("cli")
    main = _s3_state(tmp_path, "main", [_s3_run("rlpruner", s, 0.80 + s / 100) for s in (0, 1)]
                     + [_s3_run("tp-global", s, 0.81) for s in (0, 1)], ["rlpruner", "tp-global"],
                     [["rlpruner", "tp-global"]])
    longer = _s3_state(tmp_path, "longer", [_s3_run("rlpruner", s, 0.83 + s / 100) for s in (0, 1, 2)]
                       + [_s3_run("tp-global", s, 0.832) for s in (0, 1, 2)], ["rlpruner", "tp-global"],
                       [["rlpruner", "tp-global"]], finetune_total_epochs=3, finetune_batches=211)
    curves = {("ppo", 0): [0.1, 0.3, 0.5, 0.6], ("ppo", 1): [0.2, 0.2, 0.4, 0.7],
              ("random", 0): [0.1, 0.2, 0.2, 0.5], ("random", 1): [0.2, 0.2, 0.3, 0.6]}
    search = _s3_state(tmp_path, "search", [_s3_run(m, s, 0.3, c) for (m, s), c in curves.items()],
                       ["ppo", "random"], [["ppo", "random"]], finetune_total_epochs=0, evals=4, step_fraction=0.5)
    bench = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path),
                                         "--out", str(tmp_path / "B.md")]))
    bench.load()
    bench.merge(longer)
    bench.merge(search)
    # the same budgets at another commit: a study only when named so (else its runs would replace ours)
    later = _s3_state(tmp_path, "later", [_s3_run(m, s, a) for s in (0, 1) for m, a in (("rlpruner", 0.79),
                                                                                       ("tp-global", 0.81))],
                      ["rlpruner", "tp-global"],
                      [["rlpruner", "tp-global"]])
    bench.merge(later, study="at a later commit")
    st = bench.state
    assert sorted(st["studies"]) == ["3 KD epochs of 211 batches", "at a later commit", "search only, 4 evaluations"]
    assert set(st["sections"]["3"]["runs"]) == {"rlpruner_s0", "rlpruner_s1", "tp-global_s0", "tp-global_s1"}
    assert bench.P["finetune_total_epochs"] == 1 and "merged" not in st     # the headline is untouched
    items = {r["item"] for r in bench.rows if r["section"] == 3 and r["metric"] == "test_top1_diff_mean"}
    assert items == {"rlpruner - tp-global", "3 KD epochs of 211 batches: rlpruner - tp-global",
                     "search only, 4 evaluations: ppo - random", "at a later commit: rlpruner - tp-global"}
    bench.save()
    bench.state.update(machine=_package("common").machine(), load_start=0.0, load_end=0.0)
    bench.write()
    text = (tmp_path / "B.md").read_text()
    assert "### Check: 3 KD epochs of 211 batches" in text and "### Check: search only, 4 evaluations" in text
    # rlpruner - tp-global at 3 epochs: -0.2, +0.8, +1.8 points: not below
    assert "rlpruner - tp-global +0.80 pts at equal KD (interval spans 0): target (not below) met" in text
    # best so far after 1, 2 and 4 evaluations: ppo - random 0 and 0, +10 and 0, +10 and +10 points
    assert "| ppo - random | 2 | +0.00 [+0.00, +0.00] | +5.00 [-26.57, +36.57] | +10.00 [+10.00, +10.00] |" in text
    assert "Search-only study at 4 evaluations (best reward so far, paired, points, 2 seeds): ppo - random +10.00" \
        in text
    assert (tmp_path / "best_so_far_4evals.png").stat().st_size > 0
    assert "### Check: at a later commit" in text and "with the same budgets." in text
    assert "Check, at a later commit (2 seeds): rlpruner - tp-global" in text and "target MISSED" in text
    # a later run of another section keeps the studies; one on another footing is refused
    again = report.Bench(cli.parse_args(["--quick", "--rows", str(main), "--work-dir", str(tmp_path)]))
    again.carry_over({1})
    assert sorted(again.state["studies"]) == sorted(st["studies"])
    other = _s3_state(tmp_path, "other", [_s3_run("ppo", 0, 0.3, [0.1])], ["ppo"], [], finetune_total_epochs=0,
                      sparsity=0.3)
    with pytest.raises(SystemExit, match="differ in sparsity"):
        bench.merge(other)


def test_the_kd_budget_can_be_overridden_for_the_longer_fine_tuning_check(tmp_path, capsys):
    report, quality, cli = _package("report"), _package("quality"), _package("cli")
    bench = report.Bench(cli.parse_args(["--work-dir", str(tmp_path), "--data", str(tmp_path),
                                         "--kd-epochs", "3", "--kd-batches", "211"]))
    assert (bench.P["finetune_total_epochs"], bench.P["finetune_batches"]) == (3, 211)
    cfg = quality.run_config(bench, "tp-global", 0, "base.pt")
    assert (cfg["finetune_epochs"], cfg["max_batches_per_epoch"]) == (3, 211) and quality.kd_batches(bench.P) == 633
    # a search-only study: no fine-tuning, a larger budget
    study = report.Bench(cli.parse_args(["--work-dir", str(tmp_path), "--data", str(tmp_path), "--kd-epochs", "0",
                                         "--evals-per-step", "100"]))
    cfg = quality.run_config(study, "ppo", 0, "base.pt")
    assert (cfg["finetune_epochs"], cfg["evaluations_per_step"]) == (0, 200)
    for flag, bad in (("--kd-epochs", "-1"), ("--kd-epochs", "three"), ("--kd-batches", "0"),
                      ("--evals-per-step", "0")):
        with pytest.raises(SystemExit) as refused:
            cli.parse_args([flag, bad])
        assert refused.value.code == 2
        assert flag in capsys.readouterr().err


def test_retired_variants_stay_runnable_and_leave_the_full_profile():
    common = _package("common")
    full = common.PROFILES["full"]["methods"]
    assert set(common.RETIRED_VARIANTS) <= set(common.VARIANTS)          # --methods still runs them
    assert not set(common.RETIRED_VARIANTS) & set(full)
    # every search, the one-shot methods at equal KD and at equal compute (tp-uniform: --methods)
    assert {*common.SEARCHES, "uniform", "global", "tp-global", "tp-global@compute", "uniform@compute"} <= set(full)
    assert common.PROFILES["full"]["seeds"] == common.PROFILES["full"]["paired_seeds"] == [0, 1, 2, 3, 4]
    assert set(full) <= set(common.PROFILES["full"]["paired_methods"])
    cli = _package("cli")
    assert cli.parse_args(["--methods", "tp-uniform", "tp-uniform@compute", "ppo-lr0"]).methods
    # the project's default rlpruner settings (and the paper's) are measured by every full run
    assert {"rlpruner", "rlpruner-paper"} <= set(full)


def test_bench_rlpruner_is_the_project_default_search():
    """Section 3's rlpruner must be what `rlpruner compress` runs by default, and
    rlpruner-paper the paper's settings, so the headline pair is the product's."""
    import dataclasses
    from rlpruner_ray.config import CompressConfig
    quality, report = _package("quality"), _package("report")
    bench = report.Bench(_package("cli").parse_args(["--work-dir", "/tmp/unused", "--data", "/tmp/unused"]))
    default = CompressConfig()
    cfg = quality.run_config(bench, "rlpruner", 0, "base.pt")
    for name in ("criterion", "bn_recalibration_batches", "include_baselines", "epsilon", "guard_keep_best"):
        assert cfg[name] == getattr(default, name), name
    assert default.step_fraction is None and cfg["step_fraction"] == cfg["sparsity"]      # one step
    paper = quality.run_config(bench, "rlpruner-paper", 0, "base.pt")
    assert (paper["criterion"], paper["epsilon"], paper["include_baselines"], paper["guard_keep_best"],
            paper["bn_recalibration_batches"], paper["step_fraction"]) == ("taylor", 0.4, False, False, 0, 0.25)
    assert {f.name for f in dataclasses.fields(CompressConfig)} >= set(cfg) - {"one_step"}
    # every variant --methods accepts is a configuration compress accepts
    common = _package("common")
    for method in [*common.VARIANTS, *common.MATCHED]:
        changes = dict(quality.run_config(bench, method, 1, "base.pt"))
        CompressConfig(**changes).validate()


def test_fidelity_report_judges_the_default_reward_against_the_target():
    fidelity, common = _package("fidelity"), _package("common")
    P = dict(common.PROFILES["full"])
    names = fidelity.reward_names(P)
    assert fidelity.default_reward_name() in names     # the study measures what compress uses
    recs = [{"i": i, "acc_finetuned": 0.7 + i / 100, "acc_pruned": 0.1, **{n: float(i) for n in names}}
            for i in range(5)]

    def report(default_rho):
        rho = {n: {"rho": 0.3, "low": 0.1, "high": 0.5} for n in names + ["acc_pruned"]}
        rho[fidelity.default_reward_name()] = {"rho": default_rho, "low": 0.2, "high": 0.95}
        st = {"records": recs, "rho": rho, "held_out": 952, "kd_batches_per_epoch": 210, "steps": 1,
              "criterion": "l1"}
        return fidelity.render(types.SimpleNamespace(P=P), st)

    text, summary = report(0.91)
    assert "target >= 0.6 **met**" in text and "**met**" in summary[0]
    text, summary = report(0.45)
    assert "target >= 0.6 **missed**" in text and "**missed**" in summary[0]


# ---------------------------------------------------------------------- pinned versions
def test_versions_are_read_from_constraints_and_a_mismatch_is_found(tmp_path):
    common = _package("common")
    pins = tmp_path / "constraints.txt"
    pins.write_text("# pinned\ntorch==0.0.1\n\nnumpy==1.0 ; python_version >= '3'\nray[tune]==2.0  # extras\n")
    assert common.pinned_versions(pins) == {"torch": "0.0.1", "numpy": "1.0", "ray": "2.0"}
    found = common.version_mismatches({"torch": "0.0.1", "numpy": "1.0", "gone": "3"},
                                      {"torch": "2.14.1+cpu", "numpy": "1.0", "gone": None})
    assert found == [{"package": "torch", "pinned": "0.0.1", "installed": "2.14.1+cpu"},
                     {"package": "gone", "pinned": "3", "installed": None}]
    assert common.version_mismatches({"torch": "2.14.1"}, {"torch": "2.14.1+cpu"}) == []   # a local tag
    assert common.describe_mismatches(found) == ("torch 2.14.1+cpu (constraints.txt: 0.0.1), "
                                                 "gone not installed (constraints.txt: 3)")
    pins.write_text("torch>=2\n")
    with pytest.raises(ValueError, match="expected name==version"):
        common.pinned_versions(pins)
    # the checkout's own constraints.txt names every package the machine table records
    assert set(common.machine()["packages"]) == set(common.pinned_versions())


def _fake_pins(tmp_path, monkeypatch, common):
    """constraints.txt pinning a torch version that is not installed."""
    pins = tmp_path / "constraints.txt"
    pins.write_text(common.CONSTRAINTS.read_text().replace("torch==", "torch==0.0.1.dev0+was-"))
    monkeypatch.setattr(common, "CONSTRAINTS", pins)
    installed = common.installed_versions(["torch"])["torch"]
    return f"torch {installed} (constraints.txt: 0.0.1.dev0+was-"


def test_bench_refuses_other_versions_before_writing_anything(tmp_path, monkeypatch, capsys):
    common, cli = _package("common"), _package("cli")
    expected = _fake_pins(tmp_path, monkeypatch, common)
    out, rows, work = tmp_path / "B.md", tmp_path / "rows.parquet", tmp_path / "work"
    code = cli.main(["--quick", "--out", str(out), "--rows", str(rows), "--work-dir", str(work)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bench: installed versions differ from constraints.txt: ")
    assert expected in err and "--allow-version-mismatch" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not rows.exists() and not work.exists()


def test_bench_with_allowed_mismatch_says_so_at_the_top_of_the_report(tmp_path, monkeypatch):
    common, cli, report = _package("common"), _package("cli"), _package("report")
    expected = _fake_pins(tmp_path, monkeypatch, common)

    def measure(self, k):        # the check is what is tested, not a section's figures
        raise RuntimeError("not measured in this test")

    monkeypatch.setattr(report.Bench, "measure", measure)
    out, rows = tmp_path / "B.md", tmp_path / "rows.parquet"
    code = cli.main(["--quick", "--sections", "2", "--allow-version-mismatch", "--out", str(out),
                     "--rows", str(rows), "--work-dir", str(tmp_path / "work")])
    assert code == 1                                           # the one section "failed" (above)
    text = out.read_text()
    first = text.split("\n\n")[1]
    assert first.startswith("> **WARNING: NOT THE PINNED VERSIONS.**") and expected in first
    assert "| scikit-learn |" in text and "| torch-pruning |" in text     # every pinned package recorded
    state = json.loads(rows.with_name("rows_state.json").read_text())
    assert [m["package"] for m in state["version_mismatches"]] == ["torch"]
    # sections carried over or merged in from such a run keep the warning; pinned runs have none
    found = state["version_mismatches"]
    carried = report._version_warning({"carried": {"date": "then", "version_mismatches": found}})
    assert "carried-over sections (then)" in carried[0] and expected in carried[0]
    merged = report._version_warning({"merged": [{"sections": ["4"], "date": "x", "version_mismatches": found}]})
    assert "merged section(s) 4 (x)" in merged[0]
    assert report._version_warning({"version_mismatches": [], "carried": {"date": "then"}}) == []


def _bench(tmp_path, *extra):
    report, cli = _package("report"), _package("cli")
    return report.Bench(cli.parse_args(["--quick", "--rows", str(tmp_path / "rows.parquet"), "--out",
                                        str(tmp_path / "B.md"), "--work-dir", str(tmp_path / "work"), *extra]))


def test_every_search_runs_on_the_same_footing():
    """Same reward (BN-recalibrated), schedule (one step), starting candidates and
    budget for every search of the protocol; only the algorithm differs."""
    import dataclasses
    from rlpruner_ray.config import CompressConfig
    quality, report, common = _package("quality"), _package("report"), _package("common")
    bench = report.Bench(_package("cli").parse_args(["--work-dir", "/tmp/unused", "--data", "/tmp/unused"]))
    configs = {m: quality.run_config(bench, m, 3, "base.pt") for m in common.SEARCHES}
    same = ("bn_recalibration_batches", "include_baselines", "step_fraction", "evaluations_per_step",
            "finetune_epochs", "max_batches_per_epoch", "reward_samples", "reward_metric", "criterion", "sparsity",
            "target", "seed", "split_seed")
    for name in same:
        assert len({repr(c.get(name)) for c in configs.values()}) == 1, (name, {m: c.get(name) for m, c in
                                                                             configs.items()})
    first = configs["rlpruner"]
    assert (first["bn_recalibration_batches"], first["include_baselines"], first["step_fraction"]) == (4, True, 0.5)
    assert first["evaluations_per_step"] == bench.P["evals"] * quality.search_steps(bench.P)
    assert {m: c["algo"] for m, c in configs.items()} == {"rlpruner": "rlpruner", "random": "random", "ppo": "ppo",
                                                          "ppo-lr0": "ppo", "cmaes": "cmaes"}
    assert configs["ppo-lr0"]["rl_lr"] == 0.0 and "rl_lr" not in configs["ppo"]
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    for m, c in configs.items():
        CompressConfig(**{k: v for k, v in c.items() if k != "one_step"})      # every setting is valid
        assert c.get("selection_fraction") == (0.5 if "selection_fraction" in fields else None)


def _summary(top1, fe=None, kd_fe=None, selection=None):
    s = {"base": {"test_top1": 0.85, "val_top1": 0.85, "macs": 4e7, "params": 2e5},
         "pruned": {"test_top1": top1, "test_top5": 0.99, "val_top1": top1, "macs": 2e7, "params": 1e5},
         "reductions": {"macs": 0.5, "params": 0.5}, "evaluations": 5, "wall_seconds": 10.0}
    if fe is not None:
        s["compute"] = {"macs": int(fe * 4e7), "forward_equivalents": fe, "wall_s": 10.0,
                        "by_stage": {"fine_tune": {"forward_equivalents": kd_fe}}}
    if selection is not None:
        s["pruned"]["selection_top1"] = selection
    return s


def test_extra_kd_batches_spend_the_search_compute_beyond_the_one_shot_run():
    quality = _package("quality")
    # one KD batch of the one-shot run: 400 / 2 = 200 forward-equivalents; 4,000 more in the search
    assert quality.extra_kd_batches(_summary(0.8, 5000.0, 900.0), _summary(0.8, 1000.0, 400.0), 2) == 20
    assert quality.extra_kd_batches(_summary(0.8, 1030.0, 900.0), _summary(0.8, 1000.0, 400.0), 2) == 0
    assert quality.extra_kd_batches(_summary(0.8, 500.0, 900.0), _summary(0.8, 1000.0, 400.0), 2) == 0
    with pytest.raises(ValueError, match="no compute accounting"):
        quality.extra_kd_batches(_summary(0.8), _summary(0.8, 1000.0, 400.0), 2)


def test_equal_compute_runs_follow_the_runs_they_match(tmp_path, monkeypatch):
    """measure(): the plain runs first, then each <one-shot>@compute run with the
    extra KD batches read off the summaries those runs wrote; a missing reference
    is a failed run with its reason, not a crash."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rlpruner_ray.report import HISTORY_SCHEMA
    quality = _package("quality")
    bench = _bench(tmp_path, "--seeds", "0", "1")
    bench.P["methods"] = ["rlpruner", "tp-global", "tp-global@compute", "uniform@compute"]
    bench.P["paired_methods"] = list(bench.P["methods"])
    batches = quality.kd_batches(bench.P)
    calls = []

    def fake_task(name, params, work):
        assert name == "compress"
        calls.append([c["out_dir"].rsplit("/", 1)[1] for c in params["configs"]])
        out = []
        for cfg in params["configs"]:
            d = Path(cfg["out_dir"])
            d.mkdir(parents=True, exist_ok=True)
            search = cfg["algo"] == "rlpruner"
            extra = (cfg.get("finetune_batches") or batches) - batches
            s = _summary(0.80 + 0.01 * cfg["seed"] + (0.0 if search else 0.001 * extra),
                         fe=5000.0 if search else 1000.0 + 200.0 * extra, kd_fe=200.0 * batches,
                         selection=0.8)
            (d / "summary.json").write_text(json.dumps(s))
            rows = [{"step": 1, "iteration": 0, "evaluation": i, "algo": cfg["algo"], "source": "sample",
                     "reward": r, "accuracy": 0.5, "macs": 1.0, "params": 1.0, "filters_removed": 1, "chosen": False,
                     "seconds": 0.0, "distribution": [1.0], "counts": [1], "learner_stats": None}
                    for i, r in enumerate([0.2, 0.1, 0.4] if search else [0.3])]
            pq.write_table(pa.Table.from_pylist(rows, HISTORY_SCHEMA), d / "history.parquet")
            out.append({"ok": True})
        return {"runs": out}
    monkeypatch.setattr(quality, "run_task", fake_task)
    monkeypatch.setattr(quality, "base_model", lambda bench: {"file": "b.pt", "shared": True, "reused": True,
                                                              "seconds": 0.0})
    st = quality.measure(bench)
    assert calls == [["rlpruner_s0", "rlpruner_s1", "tp-global_s0", "tp-global_s1"],
                     ["tp-global@compute_s0", "tp-global@compute_s1"]]
    matched = st["runs"]["tp-global@compute_s0"]
    assert matched["matched"]["extra_kd_batches"] == 20 and matched["matched"]["kd_batches"] == batches + 20
    cfg = json.loads(json.dumps(quality.matched_config(bench, "tp-global@compute", 0, "b.pt")[0]))
    assert cfg["algo"] == "tp-global" and cfg["finetune_batches"] == batches + 20
    assert not st["runs"]["uniform@compute_s0"]["ok"]
    assert "needs the uniform run of seed 0" in st["runs"]["uniform@compute_s0"]["error"]
    # equal compute: the one-shot run's compute now equals the search's
    assert matched["summary"]["compute"]["forward_equivalents"] == 5000.0
    assert st["runs"]["rlpruner_s1"]["curve"] == [0.2, 0.2, 0.4] and "curve" not in matched
    pairs = st["paired"]
    assert pairs["rlpruner - tp-global@compute"]["diffs"] == pytest.approx([-0.02, -0.02])
    assert st["paired_selection"]["rlpruner - rlpruner-paper"]["seeds"] == []


def test_section_3_reports_both_footings_judges_targets_with_t_and_plots_curves(tmp_path):
    quality = _package("quality")
    bench = _bench(tmp_path)
    methods = ["rlpruner", "rlpruner-paper", "tp-global", "tp-global@compute", "uniform"]
    bench.P.update(methods=methods, paired_methods=methods, seeds=[0, 1, 2, 3, 4], paired_seeds=[0, 1, 2, 3, 4],
                   pairs=[["rlpruner", "tp-global"], ["rlpruner", "tp-global@compute"], ["rlpruner", "uniform"]])
    # rlpruner - tp-global: +1 pt on every seed but one (mean +0.8, interval above 0): met;
    # at equal compute +0.6 with a wide spread (interval spans 0): missed; uniform: +0.4 (below the margin)
    top1 = {"rlpruner": [0.80, 0.81, 0.82, 0.83, 0.84], "tp-global": [0.79, 0.80, 0.81, 0.82, 0.84],
            "tp-global@compute": [0.76, 0.82, 0.80, 0.84, 0.85]}
    top1["uniform"] = [v - 0.004 for v in top1["rlpruner"]]
    top1["rlpruner-paper"] = [v - 0.01 for v in top1["rlpruner"]]
    runs = {}
    for m, values in top1.items():
        for seed, v in enumerate(values):
            runs[f"{m}_s{seed}"] = {"method": m, "seed": seed, "ok": True, "dir": "d",
                                    "summary": _summary(v, 1000.0, 100.0, selection=v + 0.01),
                                    "curve": [0.1, 0.3, 0.3 + seed / 100] if m == "rlpruner" else [0.2]}
            if m.endswith("@compute"):
                runs[f"{m}_s{seed}"].update(matched={"kd_batches": 22, "extra_kd_batches": 20})
    st = {"base": {"file": "b.pt", "shared": True}, "runs": runs, **quality.all_pairs(runs, bench.P)}
    text, summary = quality.render(bench, st)
    assert "| rlpruner - tp-global | equal KD | 5 |" in text
    assert "| rlpruner - tp-global@compute | equal compute | 5 |" in text
    assert "rlpruner - tp-global +0.80 pts at equal KD (interval above 0: target met)" in text
    assert "rlpruner - tp-global@compute +0.60 pts at equal compute (interval spans 0: target MISSED)" in text
    assert "rlpruner - uniform +0.40 pts at equal KD (interval above 0: target MISSED)" in text
    assert "| --criterion l1 | the test split" in text
    assert "rlpruner - rlpruner-paper +1.00 pts" in text          # the defaults, on the selection half
    assert "| tp-global@compute | 5 |" in text and "| 22 |" in text
    assert (tmp_path / "best_so_far.png").read_bytes()[:4] == b"\x89PNG"
    assert "![best reward so far](best_so_far.png)" in text
    for header, body in _tables(text):
        for cells in body:
            assert len(cells) == len(header), cells
    assert any("target MISSED" in line for line in summary)
    assert "earlier protocol**" not in text
    del bench.P["protocol"]               # a state measured before the protocol said so
    assert "**These runs were measured under the earlier protocol**" in quality.render(bench, st)[0]


def test_a_lever_is_chosen_on_the_selection_half_and_only_when_its_interval_is_above_0(tmp_path):
    """Issue 28's levers against the project's rlpruner: the table pairs selection
    top-1 (never test top-1) and adopts a lever only with its t interval above 0."""
    quality = _package("quality")
    bench = _bench(tmp_path)
    methods = ["rlpruner", "rlpruner-halving", "rlpruner-tpmag"]
    bench.P.update(methods=methods, paired_methods=methods, seeds=[0, 1, 2, 3, 4], paired_seeds=[0, 1, 2, 3, 4],
                   pairs=[])
    base = [0.50, 0.52, 0.51, 0.53, 0.49]
    # halving: +1 pt on selection on every seed (+-0.1), but 5 pts lower on test top-1, at twice the compute;
    # tpmag: better on test top-1, +-1 pt around 0 on selection
    selection = {"rlpruner": base, "rlpruner-halving": [v + 0.01 + (0.001 if s % 2 else -0.001)
                                                        for s, v in enumerate(base)],
                 "rlpruner-tpmag": [v + (0.01 if s % 2 else -0.01) for s, v in enumerate(base)]}
    test = {"rlpruner": base, "rlpruner-halving": [v - 0.05 for v in base], "rlpruner-tpmag": [v + 0.05 for v in base]}
    fe = {"rlpruner": 1000.0, "rlpruner-halving": 2000.0, "rlpruner-tpmag": 1000.0}
    runs = {f"{m}_s{s}": {"method": m, "seed": s, "ok": True, "dir": "d",
                          "summary": _summary(test[m][s], fe[m], 100.0, selection=selection[m][s])}
            for m in methods for s in range(5)}
    choices = quality.lever_choices(runs, 100)
    assert set(choices) == {"rlpruner-halving - rlpruner", "rlpruner-tpmag - rlpruner"}
    halving, tpmag = choices["rlpruner-halving - rlpruner"], choices["rlpruner-tpmag - rlpruner"]
    assert abs(halving["mean"] - 0.0098) < 1e-9 and halving["low"] > 0 and halving["adopt"]
    assert halving["compute_ratio"] == 2.0
    assert not tpmag["adopt"] and tpmag["low"] < 0           # its test lead does not choose it
    st = {"base": {"file": "b.pt", "shared": True}, "runs": runs, **quality.all_pairs(runs, bench.P)}
    text, summary = quality.render(bench, st)
    assert "| rlpruner-halving - rlpruner | `--halving` | 5 | +0.98 |" in text and "| 2.00x | adopt |" in text
    assert "| rlpruner-tpmag - rlpruner | `--criterion tp-magnitude` | 5 |" in text and "stays off |" in text
    assert any(line.startswith("Levers on the selection half") and "--halving +0.98" in line for line in summary)
    for header, body in _tables(text):
        for cells in body:
            assert len(cells) == len(header), cells
    without = {k: r for k, r in runs.items() if r["method"] == "rlpruner"}
    assert quality.lever_choices(without, 100) == {}
    assert "Levers, each" not in quality.render(bench, {**st, "runs": without})[0]


def test_section_3_computes_its_intervals_from_the_runs_not_from_a_saved_state(tmp_path):
    """A state written before the t interval kept the bootstrap interval under the
    same keys: re-rendering it must print the t interval of its runs, not those."""
    quality = _package("quality")
    bench = _bench(tmp_path)
    bench.P.update(methods=["rlpruner", "tp-global"], paired_methods=["rlpruner", "tp-global"], seeds=[0, 1, 2],
                   paired_seeds=[0, 1, 2], pairs=[["rlpruner", "tp-global"]])
    top1 = {"rlpruner": [0.800, 0.805, 0.810], "tp-global": [0.801, 0.804, 0.812]}
    runs = {f"{m}_s{s}": {"method": m, "seed": s, "ok": True, "dir": "d", "summary": _summary(v)}
            for m, values in top1.items() for s, v in enumerate(values)}
    stale = {"rlpruner - tp-global": {"seeds": [0, 1, 2], "diffs": [-0.001, 0.001, -0.002], "mean": -0.000667,
                                      "low": 0.0123, "high": 0.0456}}
    text, _ = quality.render(bench, {"base": {"file": "b.pt", "shared": True}, "runs": runs, "paired": stale})
    t = quality.paired_difference(top1["rlpruner"], top1["tp-global"], scale=100)
    assert f"| {t.low:.2f} | {t.high:.2f} |" in text and "| 1.23 | 4.56 |" not in text


def test_a_benchmark_whose_runs_failed_does_not_exit_0():
    cli = _package("cli")
    st = {"sections": {"3": {"runs": {"rlpruner_s0": {"ok": True}, "tp-global_s0": {"ok": False,
                                                                                    "error": "Exception: timed out"}}},
                       "1": {"rows": []}}}
    assert cli._failed_runs(st, {1, 3}) == ["tp-global_s0: Exception: timed out"]
    assert cli._failed_runs(st, {1}) == []


def test_speedup_section_times_each_model_as_a_run_does_and_shows_agreement(tmp_path):
    """Section 5 times every pruned model against the base with the run's own paired
    timing, twice, and reports how far the two timings' ratios are apart."""
    import torch
    from rlpruner_ray.checkpoint import save_pruned, tag_model
    from rlpruner_ray.models import build_model, model_spec
    speedup, common = _package("speedup"), _package("common")
    torch.manual_seed(0)
    for name in ("base.pt", "pruned.pt"):
        save_pruned(tag_model(build_model("resnet8", 10, 1), model_spec("resnet8", 10, 1), (1, 16, 16)),
                    tmp_path / name)
    summary = {"base": {"macs": 4.0e6}, "pruned": {"macs": 2.0e6}}
    bench = types.SimpleNamespace(
        P={**common.PROFILES["quick"], "dataset": "digits", "methods": ["uniform"]}, rows=[], work=tmp_path / "w",
        state={"sections": {"3": {"base": {"file": str(tmp_path / "base.pt")},
                                  "runs": {"uniform_s0": {"method": "uniform", "seed": 0, "dir": str(tmp_path),
                                                          "summary": summary}}}}})
    (tmp_path / "pruned_model.pt").write_bytes((tmp_path / "pruned.pt").read_bytes())
    st = speedup.measure(bench)
    assert st["timings"] == 2 and all(len(v) == 2 for v in st["ratios"].values())
    assert set(st["ratios"]) == {"uniform_s0|b1", "uniform_s0|b64"}
    for bs in ("b1", "b64"):
        a, b = st["ratios"][f"uniform_s0|{bs}"]
        assert st["agreement"][bs] == pytest.approx(abs(a - b) / ((a + b) / 2))
    speed = [r for r in bench.rows if r["metric"] == "speedup"]
    assert {r["variant"] for r in speed} == {"b1", "b64"}
    text, _ = speedup.render(bench, st)
    assert "Two timings of the same pair agree within" in text and "| uniform | 2.00x |" in text
