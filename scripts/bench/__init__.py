"""scripts/bench.py's sections, one module each (cost, scaling, quality, fidelity,
speedup, efficiency), what they share (common), the run and its report
(report) and the command line (cli)."""
