"""Cluster entry point for ``rlpruner sweep``: joins the running Ray cluster.

Used where a script, not a console command, is what gets run on a cluster::

    ray submit clusters/aws-gpu.yaml scripts/sweep.py -- \\
        --sparsity 0.2 0.4 0.6 0.8 --out-dir s3://BUCKET/sweeps/resnet56
    ray job submit --working-dir . -- python scripts/sweep.py --sparsity 0.2 0.4 ...
    (KubeRay) spec.entrypoint: python scripts/sweep.py --sparsity ...

All arguments are those of ``rlpruner sweep``; ``--ray-address auto`` is added
unless you pass ``--ray-address`` yourself ("auto": the ``RAY_ADDRESS`` variable
that Ray sets for job drivers, or the cluster started here by ``ray start`` /
``ray up``). Without a cluster, run ``rlpruner sweep ...``: it starts a private
local Ray.
"""
import sys
from pathlib import Path

# a job's working_dir may hold this checkout without the package installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlpruner_ray.cli import cluster_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(cluster_main("sweep", sys.argv[1:]))
