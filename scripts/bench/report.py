"""The benchmark run: measures the sections it is asked for, keeps raw rows and a
small JSON state, and renders the report from rows + state alone, so the
Markdown can be rebuilt without measuring again (``--report-only``)."""
from __future__ import annotations

import json
import traceback
from pathlib import Path

from . import cost, efficiency, fidelity, quality, scaling, speedup
from .common import (CIFAR_DEFAULT, PROFILES, ROW_COLUMNS, SHARED_BASE, _json_default, _rel, describe_mismatches,
                     log, make_synthetic_npz)

SECTIONS = {1: cost, 2: scaling, 3: quality, 4: fidelity, 5: speedup, 6: efficiency}
RUN_LAST = (4,)          # measured after the others (it needs none of them and is the longest)
EXTRA_HEADINGS = ("Summary", "Machine and command", "GPU")


class Bench:
    def __init__(self, args):
        self.args = args
        self.profile = "quick" if args.quick else "full"
        self.P = dict(PROFILES[self.profile])
        if args.seeds is not None:
            self.P["seeds"] = self.P["paired_seeds"] = args.seeds
        if args.methods is not None:
            self.P["methods"] = args.methods
        for arg, key in (("kd_epochs", "finetune_total_epochs"), ("kd_batches", "finetune_batches"),
                         ("evals_per_step", "evals")):
            if getattr(args, arg, None) is not None:
                self.P[key] = getattr(args, arg)
        if self.P["dataset"] == "cifar10":           # the real CIFAR-10 copy, --data or ../shared
            self.P["dataset"] = f"npz:{Path(args.data or CIFAR_DEFAULT).resolve()}"
        if self.P.get("base") == "shared":
            self.P["base"] = str(Path(args.base or SHARED_BASE).resolve())
        self.work = Path(args.work_dir).resolve() / self.profile
        self.rows: list[dict] = []
        self.state: dict = {"sections": {}, "seconds": {}, "failed": {}}

    def synthetic(self) -> str:
        return make_synthetic_npz(self.work / "synth32", self.P["synth_train"], self.P["synth_test"])

    def measure(self, k: int) -> dict:
        return SECTIONS[k].measure(self)

    def carry_over(self, wanted: set) -> None:
        """Keep the sections this run does not measure from the previous rows and
        state at --rows (same profile), so one section can be rerun alone (the
        quality section in one background run, the fidelity study in another)."""
        if not (Path(self.args.rows).exists() and self.state_path().exists()):
            return
        import pyarrow.parquet as pq
        old = json.loads(self.state_path().read_text())
        kept = {k: v for k, v in old.get("sections", {}).items() if int(k) not in wanted}
        if old.get("profile") != self.profile or not kept:
            return
        self.state["sections"].update(kept)
        if "3" in kept and old.get("studies"):       # (their rows are section 3's, kept below)
            self.state["studies"] = old["studies"]
        self.state["seconds"].update({k: v for k, v in old.get("seconds", {}).items() if k in kept})
        self.rows += [r for r in pq.read_table(self.args.rows).to_pylist() if str(r["section"]) in kept]
        # sections the previous report merged in keep their own origin
        merged = [dict(m, sections=[k for k in m["sections"] if k in kept]) for m in old.get("merged", [])]
        merged = [m for m in merged if m["sections"]]
        if merged:
            self.state["merged"] = merged
        # (a merge of some section-3 methods leaves the section this run's own)
        from_merge = {k for m in merged if not m.get("methods") for k in m["sections"]}
        own = [k for k in kept if k not in from_merge]
        previous = old.get("carried") if set(own) <= set((old.get("carried") or {}).get("sections", [])) else None
        self.state["carried"] = {"sections": sorted(own, key=int),
                                 "date": (previous or old["machine"])["date"],
                                 "command": (previous or old)["command"],
                                 "version_mismatches": (previous or old).get("version_mismatches", [])}

    def state_path(self, rows: str | Path | None = None) -> Path:
        rows = Path(rows or self.args.rows)
        return rows.with_name(rows.stem + "_state.json")

    def merge(self, rows: str | Path, study: str | None = None) -> None:
        """Replace the sections the run that wrote ``rows`` measured (not the ones it
        carried over) with its figures, rows and wall times; its section 3 joins as
        a study (``_attach_study``) when it has other budgets or ``study`` names it."""
        import pyarrow.parquet as pq
        other = json.loads(self.state_path(rows).read_text())
        if other.get("profile") != self.profile:
            raise SystemExit(f"bench: {rows} is from the {other.get('profile')} profile, not {self.profile}")
        carried = set(other.get("carried", {}).get("sections", []))
        taken = sorted((k for k in other["sections"] if k not in carried), key=int)
        if "3" in taken and "3" in self.state["sections"] and (
                study or quality.budgets_differ(self.P, other["profile_settings"])):
            taken.remove("3")
            self._attach_study(other, study)
        elif "3" in taken and "3" in self.state["sections"] and _subset_of_methods(other, self.P):
            taken.remove("3")
            self._merge_runs(other)
        self.rows = [r for r in self.rows if str(r["section"]) not in taken]
        self.rows += [r for r in pq.read_table(rows).to_pylist() if str(r["section"]) in taken]
        for key in ("sections", "seconds"):
            self.state[key].update({k: v for k, v in other.get(key, {}).items() if k in taken})
        for k in taken:
            self.state["failed"].pop(k, None)
            if k in other.get("failed", {}):
                self.state["failed"][k] = other["failed"][k]
        if "carried" in self.state:
            self.state["carried"]["sections"] = [k for k in self.state["carried"]["sections"] if k not in taken]
        if not taken:
            return
        self.state.setdefault("merged", []).append({"sections": taken, "command": other["command"],
                                                    "date": other["machine"]["date"],
                                                    "seconds": other.get("total_seconds"),
                                                    "version_mismatches": other.get("version_mismatches", [])})

    def _merge_runs(self, other: dict) -> None:
        """Section 3 of a run that measured only some methods joins ours run by run."""
        merged, methods = quality.merge_runs(self.state["sections"]["3"], self.P, other["sections"]["3"],
                                             other["profile_settings"])
        self.state["sections"]["3"] = merged
        self._section_3_rows()
        self.state.setdefault("merged", []).append({"sections": ["3"], "methods": methods,
                                                    "command": other["command"],
                                                    "date": other["machine"]["date"],
                                                    "seconds": other.get("total_seconds"),
                                                    "version_mismatches": other.get("version_mismatches", [])})

    def _attach_study(self, other: dict, name: str | None = None) -> None:
        """Section 3 of a run with other budgets (the check at longer fine-tuning, the
        search-only study) or one named by ``--study`` joins as a study of its own
        beside the headline, under ``name`` or one made from its budgets (a later
        study of the same name replaces it)."""
        P = other["profile_settings"]
        quality.check_footing(self.state["sections"]["3"], self.P, other["sections"]["3"], P, quality.FOOTING)
        self.state.setdefault("studies", {})[name or quality.study_name(P)] = {
            "section": other["sections"]["3"], "P": P, "command": other["command"],
            "date": other["machine"]["date"], "commit": other["machine"].get("commit"),
            "seconds": other.get("total_seconds") or 0.0,
            "version_mismatches": other.get("version_mismatches", [])}
        self._section_3_rows()

    def _section_3_rows(self) -> None:
        """Section 3's rows again from its state: the headline's, then each study's."""
        rows = quality.section_rows(self.state["sections"]["3"])
        for name, study in self.state.get("studies", {}).items():
            rows += quality.study_rows(name, study["section"])
        self.rows = [r for r in self.rows if str(r["section"]) != "3"] + rows

    def save(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        rows_path = Path(self.args.rows)
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("section", pa.int32()), ("item", pa.string()), ("variant", pa.string()),
                            ("metric", pa.string()), ("value", pa.float64()), ("unit", pa.string()),
                            ("repeat", pa.int32()), ("seed", pa.int32())])
        pq.write_table(pa.Table.from_pylist(self.rows, schema), rows_path)
        self.state["profile_settings"] = self.P
        self.state_path().write_text(json.dumps(self.state, indent=1, default=_json_default))

    def load(self) -> None:
        import pyarrow.parquet as pq
        self.rows = pq.read_table(self.args.rows).to_pylist()
        self.state = json.loads(self.state_path().read_text())
        self.P = self.state["profile_settings"]
        self.profile = self.state["profile"]

    def write(self) -> None:
        st = self.state
        summary, bodies = [], {}
        for k, module in SECTIONS.items():
            key = str(k)
            if key in st["failed"]:
                bodies[k] = f"FAILED: {st['failed'][key]}"
                summary.append(f"Section {k} failed: {st['failed'][key][:200]}")
            elif key in st["sections"]:
                try:
                    bodies[k], lines = module.render(self, st["sections"][key])
                    summary += lines
                    for name, study in (st.get("studies", {}) if k == 3 else {}).items():
                        body, lines = quality.render_study(self, name, study)
                        bodies[k] += "\n\n" + body
                        summary += lines
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    bodies[k] = f"FAILED to render: {type(exc).__name__}: {exc}"
            else:
                bodies[k] = "Not run (see `--sections`)."
        m = st["machine"]
        total = st["total_seconds"]
        base = st["sections"].get("3", {}).get("base")
        first_run = ""
        if base and base.get("reused") and not base.get("shared"):
            first_run = (f" The base model of section 3 was reused from an earlier run (its training took "
                         f"{base['seconds'] / 60:.1f} min, which a first run on a clean checkout adds).")
        out = [
            "# Benchmarks",
            "",
            *_version_warning(st),
            f"Written by `scripts/bench.py` ({st['profile']} profile) on {m['date']}; total wall time "
            f"{total / 60:.1f} min.{first_run} Raw rows: `{_rel(Path(self.args.rows))}` (columns "
            f"{', '.join(ROW_COLUMNS)}); the state the report is rendered from: `{_rel(self.state_path())}` "
            f"(`--report-only` re-renders this file from the two).{_carried(st)}",
            "",
            "## Summary",
            "",
            *[f"- {line}" for line in summary],
            "",
            "## Machine and command",
            "",
            "```",
            st["command"],
            "```",
            "",
            "| what | value |",
            "|---|---|",
            f"| CPU | {m['cpu']} |",
            f"| cores | {m['cores']} |",
            f"| memory | {m['memory']} |",
            f"| load average (1 min) at start / end | {st['load_start']:.2f} / {st['load_end']:.2f} |",
            f"| OS | {m['os']} |",
            f"| Python | {m['python']} |",
            f"| torch | {m['torch']} |",
            f"| ray | {m['ray']} |",
            f"| torch-pruning | {m['torch_pruning']} |",
            f"| numpy | {m['numpy']} |",
            *[f"| {name} | {version or 'not installed'} |" for name, version in m.get("packages", {}).items()
              if name not in ("torch", "ray", "torch-pruning", "numpy")],
            f"| date (UTC) | {m['date']} |",
            *([f"| commit | {m['commit']} |"] if m.get("commit") else []),
            f"| total wall time (s) | {total:.0f} |",
            "",
            "Section wall times (s): " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(st["seconds"].items())) + ".",
            "The machine is shared with other jobs and noisy: timings are medians of repeats, and every ratio is "
            "of two numbers measured in the same process, interleaved.",
        ]
        for k, module in SECTIONS.items():
            out += ["", f"## {module.TITLE}", "", bodies[k]]
        out += ["", _gpu_section(Path(self.args.out))]
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text("\n".join(out) + "\n")
        log(f"wrote {self.args.out} and {self.args.rows} ({len(self.rows)} rows)")


def _version_warning(st: dict) -> list[str]:
    """A loud first paragraph when this run, or a run whose sections it carries or
    merged in, ran on other package versions than constraints.txt pins."""
    runs = [("this run", st.get("version_mismatches"))]
    if st.get("carried"):
        runs.append((f"the run of the carried-over sections ({st['carried']['date']})",
                     st["carried"].get("version_mismatches")))
    runs += [(f"the run of the merged section(s) {', '.join(m['sections'])} ({m['date']})",
              m.get("version_mismatches")) for m in st.get("merged", [])]
    runs += [(f"the run of the study '{name}' ({s['date']})", s.get("version_mismatches"))
             for name, s in st.get("studies", {}).items()]
    lines = [f"{who}: {describe_mismatches(found)}" for who, found in runs if found]
    if not lines:
        return []
    return [f"> **WARNING: NOT THE PINNED VERSIONS.** These figures were measured with package versions other "
            f"than `constraints.txt` pins (`--allow-version-mismatch`), so a user who installs with "
            f"`pip install -c constraints.txt` may not reproduce them. {'; '.join(lines)}.", ""]


def _carried(st: dict) -> str:
    """Which sections come from other runs than the one the machine table describes."""
    text = ""
    carried = st.get("carried")
    if carried and carried["sections"]:
        text += (f" Section(s) {', '.join(carried['sections'])} are carried over unchanged from the run of "
                 f"{carried['date']} (`{carried['command']}`); the machine table below is this run's.")
    for m in st.get("merged", []):
        if m.get("methods"):
            text += (f" Section 3's runs of {', '.join(m['methods'])} come from a run on the same machine started "
                     f"{m['date']} (`{m['command']}`, {m['seconds'] / 60:.1f} min), merged with `--merge`; "
                     "sections 5 and 6 do not cover them.")
            continue
        text += (f" Section(s) {', '.join(m['sections'])} come from a run on the same machine started "
                 f"{m['date']} (`{m['command']}`, {m['seconds'] / 60:.1f} min), merged with `--merge`.")
    return text


def _subset_of_methods(other: dict, P: dict) -> bool:
    """Whether the other run measured section 3 for other methods than ours (``--methods``)."""
    methods = (other.get("profile_settings") or {}).get("methods")
    return bool(methods) and set(methods) != set(P.get("methods", []))


def _gpu_section(path: Path) -> str:
    """The GPU section is scripts/bench_gpu.py's (run on a GPU machine): kept as it is."""
    text = path.read_text() if path.exists() else ""
    if "\n## GPU\n" in text:
        kept = "## GPU\n" + text.split("\n## GPU\n", 1)[1]
        return kept.split("\n## ", 1)[0].rstrip("\n")
    return "## GPU\n\nNot measured: run `python scripts/bench_gpu.py` on a machine with a GPU."
