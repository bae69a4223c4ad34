"""The command line of scripts/bench.py (see that file for usage)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

from .common import (MATCHED, METHODS, ROOT, TASKS, VARIANTS, describe_mismatches, log, machine, task_main,
                     version_mismatches)
from .report import RUN_LAST, SECTIONS, Bench


def parse_args(argv=None, description: str = ""):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny version of every section (CI, a few minutes)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Markdown report to write")
    p.add_argument("--rows", default=str(ROOT / "benchmarks" / "bench_rows.parquet"), help="Parquet file of raw rows")
    p.add_argument("--work-dir", default=str(ROOT / "bench_runs"), help="model files and run folders (git-ignored)")
    p.add_argument("--data", help="folder of the CIFAR-10 npz copy (default: ../shared/data/cifar10 next to the "
                                  "checkout)")
    p.add_argument("--base", help="trained base model file for sections 3-6 (default: "
                                  "../shared/models/cifar10-resnet20.pt next to the checkout)")
    p.add_argument("--sections", type=int, nargs="*", default=sorted(SECTIONS), choices=sorted(SECTIONS),
                   help="run only these sections (5 and 6 bring 3); the others are carried over from the "
                        "previous rows and state at --rows (same profile)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the profile's seeds for section 3 (full "
                                                        "profile: 0 1 2 3 4)")
    p.add_argument("--methods", nargs="*", choices=list(dict.fromkeys([*METHODS, *VARIANTS, *MATCHED])),
                   help="override the methods of section 3 (<one-shot>@compute: at equal compute with rlpruner, "
                        "which needs rlpruner's and the one-shot method's runs of the same seeds, from this "
                        "invocation or an earlier one with the same --work-dir)")
    p.add_argument("--kd-epochs", type=_at_least(0), metavar="N",
                   help="override the profile's KD fine-tuning epochs in total for section 3 (full profile: 2), "
                        "e.g. the check at 3 epochs, or 0 for a search-only study of the best-so-far curves; "
                        "give the run its own --work-dir and --rows")
    p.add_argument("--evals-per-step", type=_at_least(1), metavar="E",
                   help="override the evaluations per step of section 3's multi-step searches (full profile: 40; "
                        "the one-step searches get this times the steps: 80), e.g. 100 or 200 for the study of "
                        "whether a policy learns")
    p.add_argument("--kd-batches", type=_at_least(1), metavar="B",
                   help="override the profile's cap of KD batches per epoch (full profile: 50); 211 is a whole "
                        "epoch of the CIFAR-10 copy's 27,000 training images in batches of 128")
    p.add_argument("--report-only", action="store_true",
                   help="re-render --out from --rows and its _state.json, without measuring")
    p.add_argument("--merge", metavar="ROWS",
                   help="with --report-only: take the sections measured by the run that wrote ROWS (a Parquet "
                        "file next to its _state.json) into --rows, e.g. a fidelity study run alongside the "
                        "quality section with its own --rows; a section 3 of other --methods joins ours run by run, "
                        "its pairs computed again")
    p.add_argument("--study", metavar="NAME",
                   help="with --merge: set the merged run's section 3 beside this report's as a study under this "
                        "heading, its pairs its own (a run with other --kd-epochs, --kd-batches or "
                        "--evals-per-step always joins so, named by its budgets), e.g. the same methods measured "
                        "at another commit")
    p.add_argument("--reuse-runs", action="store_true",
                   help="keep section-3 runs whose summary.json has the same settings instead of rerunning them")
    p.add_argument("--allow-version-mismatch", action="store_true",
                   help="run although installed package versions differ from constraints.txt (the report then "
                        "says so at its top); without it such a run is refused, since its figures would not be "
                        "the ones a user who installs with constraints.txt reproduces")
    p.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--task-in", help=argparse.SUPPRESS)
    p.add_argument("--task-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _at_least(low: int):
    """An argparse type: a whole number of at least ``low`` (else argparse's exit 2)."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {text!r}")
        return value
    return whole


def main(argv=None, description: str = "") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, description)
    if args.task:
        return task_main(args.task, args.task_in, args.task_out)
    bench = Bench(args)
    if args.merge and not args.report_only:
        print("bench: --merge only goes with --report-only", file=sys.stderr)
        return 2
    if args.study and not args.merge:
        print("bench: --study only goes with --merge", file=sys.stderr)
        return 2
    if args.report_only:
        bench.load()
        if args.merge:
            if not Path(args.merge).exists():
                print(f"bench: no rows at {args.merge}", file=sys.stderr)
                return 2
            bench.merge(args.merge, study=args.study)
            bench.save()
        bench.write()
        return 0
    # the figures must be what users reproduce: refused, before anything is written,
    # on versions other than the pinned ones unless asked for (and then reported loudly)
    mismatches = version_mismatches()
    if mismatches and not args.allow_version_mismatch:
        print(f"bench: installed versions differ from constraints.txt: {describe_mismatches(mismatches)}; "
              "install them with pip install -c constraints.txt -e . or pass --allow-version-mismatch",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    wanted = set(args.sections)
    if wanted & {5, 6}:
        wanted.add(3)
    missing = _missing_inputs(bench, wanted)
    if missing:
        print(f"bench: {missing}; use --quick, --data or --base", file=sys.stderr)
        return 2
    bench.work.mkdir(parents=True, exist_ok=True)
    st = bench.state
    st.update(profile=bench.profile, load_start=os.getloadavg()[0], machine=machine(), version_mismatches=mismatches,
              command="python scripts/bench.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv)))
    bench.carry_over(wanted)
    # the fidelity study (two hours on 2 cores) goes last, and the rows, state and report
    # are written after every section, so a run stopped in it keeps everything before
    for k in sorted(wanted, key=lambda k: (k in RUN_LAST, k)):
        log(f"section {SECTIONS[k].TITLE}")
        t0 = time.perf_counter()
        try:
            st["sections"][str(k)] = bench.measure(k)
        except Exception as exc:  # noqa: BLE001  (report it and go on with the other sections)
            traceback.print_exc()
            st["failed"][str(k)] = f"{type(exc).__name__}: {str(exc)[:300]}"
        st["seconds"][str(k)] = time.perf_counter() - t0
        log(f"section {k} took {st['seconds'][str(k)]:.0f}s")
        st.update(total_seconds=time.perf_counter() - started, load_end=os.getloadavg()[0])
        bench.save()
        bench.write()
    log(f"done in {st['total_seconds'] / 60:.1f} min")
    failed_runs = _failed_runs(st, wanted)
    if failed_runs:
        log(f"{len(failed_runs)} run(s) failed, e.g. {failed_runs[0]}: their figures are missing from the report")
    return 1 if st["failed"] or failed_runs else 0


def _failed_runs(st: dict, wanted: set) -> list[str]:
    """'name: error' of every run a measured section recorded as failed (a section
    whose runs all failed is not a good benchmark run, though the section itself ran)."""
    out = []
    for k in sorted(wanted):
        for name, run in (st["sections"].get(str(k)) or {}).get("runs", {}).items():
            if not run.get("ok", True):
                out.append(f"{name}: {str(run.get('error') or 'failed')[:200]}")
    return out


def _missing_inputs(bench: Bench, wanted: set) -> str | None:
    """A sentence naming the data or model file the wanted sections need and lack."""
    if not wanted & {3, 4, 5, 6}:
        return None
    dataset = bench.P["dataset"]
    if dataset.startswith("npz:") and not Path(dataset[4:], "train.npz").exists():
        return f"the CIFAR-10 copy is missing ({dataset[4:]})"
    base = bench.P.get("base")
    if base not in (None, "train") and not Path(base).exists():
        return f"the base model is missing ({base})"
    return None
