"""Cluster entry point for ``rlpruner compress``: one run on the running Ray cluster.

Used where a script, not a console command, is what gets run on a cluster::

    ray submit clusters/aws-gpu.yaml scripts/compress.py -- --out-dir ~/runs/resnet56
    ray job submit --working-dir . -- python scripts/compress.py --out-dir /data/resnet56

All arguments are those of ``rlpruner compress``; ``--ray-address auto`` is added
unless you pass ``--ray-address`` yourself. "auto" means the ``RAY_ADDRESS``
environment variable (set by Ray for job drivers) or else the Ray cluster started
on this machine by ``ray start`` / ``ray up``. Without a cluster, run
``rlpruner compress ...`` instead: it starts a private local Ray.
"""
from __future__ import annotations

import sys
from pathlib import Path

COMMAND = "compress"
# Options of the ``rlpruner`` command itself, which must come before the subcommand.
_TOP_LEVEL_FLAGS = ("-q", "--quiet")


def build_argv(user_args: list[str], command: str = COMMAND) -> list[str]:
    """The argv for ``rlpruner_ray.cli.main``: ``command`` with the user's arguments,
    plus ``--ray-address auto`` unless the user gave ``--ray-address``."""
    args = list(user_args)
    top = [a for a in args if a in _TOP_LEVEL_FLAGS]
    rest = [a for a in args if a not in _TOP_LEVEL_FLAGS]
    given = any(a == "--ray-address" or a.startswith("--ray-address=") for a in rest)
    return [*top, command, *([] if given else ["--ray-address", "auto"]), *rest]


def _use_checkout() -> None:
    """Import the package from this checkout when the script runs from one (e.g. in
    a job's working_dir where the project is not pip-installed)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "rlpruner_ray" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


if __name__ == "__main__":
    _use_checkout()
    from rlpruner_ray.cli import main

    raise SystemExit(main(build_argv(sys.argv[1:])))
