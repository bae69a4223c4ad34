"""``rlpruner`` as a driver process that SIGKILLs itself at a chosen kind of point.

``RLPR_KILL`` picks the point (the test draws the numbers from a seeded RNG):

* ``write:N`` - inside the N-th atomic file write, after the temp file is written
  and synced, before the rename that publishes it (the worst moment for a file);
* ``search:N:S`` - S seconds after the search's N-th batch of evaluations starts;
* ``finetune:N:S`` - S seconds after the N-th fine-tuning starts.

``RLPR_KILL_LOG`` names a file that receives one line per atomic write and one
for the kill. Without ``RLPR_KILL`` this is exactly ``python -m rlpruner_ray``.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


def _log(line: str) -> None:
    if os.environ.get("RLPR_KILL_LOG"):
        with open(os.environ["RLPR_KILL_LOG"], "a") as f:
            f.write(line + "\n")


def _die(what: str) -> None:
    _log(f"KILL {what}")
    os.kill(os.getpid(), signal.SIGKILL)


def _after_nth_call(owner, attr: str, nth: int, delay: float, what: str) -> None:
    real = getattr(owner, attr)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            threading.Timer(delay, _die, (f"{what} (call {nth}, +{delay:.2f}s)",)).start()
        return real(*args, **kwargs)

    setattr(owner, attr, wrapper)


def _instrument(spec: str) -> None:
    kind, *params = spec.split(":")
    real_replace = os.replace
    count = 0

    def replace(src, dst, *args, **kwargs):
        nonlocal count
        name = os.path.basename(os.fspath(src))
        if name.startswith(".") and name.endswith(".tmp"):       # an atomic write's temp file
            count += 1
            _log(f"write {os.fspath(dst)}")
            if kind == "write" and count == int(params[0]):
                _die(f"inside the write of {os.fspath(dst)}")
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    if kind == "search":
        from rlpruner_ray.search.base import Evaluator
        _after_nth_call(Evaluator, "__call__", int(params[0]), float(params[1]), "during the search")
    elif kind == "finetune":
        from rlpruner_ray import pipeline
        _after_nth_call(pipeline, "finetune_kd", int(params[0]), float(params[1]), "during fine-tuning")


if __name__ == "__main__":
    if os.environ.get("RLPR_KILL"):
        _instrument(os.environ["RLPR_KILL"])
    from rlpruner_ray.cli import main
    sys.exit(main(sys.argv[1:]))
