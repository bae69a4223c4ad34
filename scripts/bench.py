#!/usr/bin/env python
"""Benchmarks of rlpruner-ray, in one command anyone can rerun.

    python scripts/bench.py                 # full run (see BENCHMARKS.md for its wall time)
    python scripts/bench.py --sections 3    # one section (5 and 6 bring 3 with them)
    python scripts/bench.py --quick         # tiny version of every section (a few minutes)
    python scripts/bench.py --out B.md --rows rows.parquet --work-dir bench_runs
    # a new section-3 variant alone, then into the main report run by run:
    python scripts/bench.py --sections 3 --methods NEW --rows new.parquet --out new.md
    python scripts/bench.py --report-only --merge new.parquet

Writes a Markdown report (``--out``, default BENCHMARKS.md: figures, the exact
command, the machine, the date) and a Parquet file of the raw rows (``--rows``,
default benchmarks/bench_rows.parquet). Model files, run folders and the cached
base model live under ``--work-dir`` (default bench_runs/, git-ignored); a
rerun reuses the trained base model there and skips its training.

Sections:
  1. evaluation cost against its floor (masked / physical path vs one plain forward pass)
  2. parallel scaling (1 vs 2 evaluation actors; 1 vs 2 RLlib env runners; Ray overhead)
  3. quality at equal budgets on the shared, well-trained base (rlpruner, ppo, random,
     uniform, global, tp-uniform, tp-global; the same evaluations per step for the
     searches and the same KD epochs in total for everyone; paired seeds with 90%
     bootstrap intervals of the differences)
  4. reward fidelity (Spearman of each reward variant, top-1 / KL / loss, BN
     recalibration off / on, against accuracy after KD fine-tuning, with intervals)
  5. real CPU speed-up of the pruned models of 3 against their MACs reduction
  6. sample efficiency (evaluations to reach 95% of a step's best reward)

The real data and base model are read from ``../shared`` next to the checkout
(``--data``, ``--base`` to point elsewhere). The code lives in ``scripts/bench/``,
one module per section. Every heavy piece runs in a subprocess of this script
(``--task``), which isolates Ray and memory. Timings are medians of interleaved repeats and are
quoted as ratios measured in the same process, because the machine is noisy.
Progress goes to stderr. The machine table records every package constraints.txt
pins; a run whose installed versions differ is refused before it writes anything
(``--allow-version-mismatch`` runs it anyway, and the report says so at its top).
"""
from __future__ import annotations

import sys
from pathlib import Path

# the bench package next to this file, and this checkout's rlpruner_ray / envs before
# any installed copy (tasks run this file in fresh processes)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from bench.common import ROW_COLUMNS  # noqa: E402,F401  (used by tests)
from bench.cli import main  # noqa: E402
from bench.cost import cost_verdict  # noqa: E402,F401
from bench.efficiency import evals_to_fraction  # noqa: E402,F401
from bench.report import EXTRA_HEADINGS, SECTIONS as _SECTION_MODULES  # noqa: E402,F401

SECTIONS = {k: module.TITLE for k, module in _SECTION_MODULES.items()}

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__.split("\n\n")[0]))
