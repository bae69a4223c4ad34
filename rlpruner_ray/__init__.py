"""rlpruner-ray: structured filter pruning of CNNs where reinforcement learning
decides how the pruning is spread across layers (RL-Pruner), on Ray.

Pipeline: model -> groups (PruningGraph) -> distribution (search) -> prune ->
evaluate -> KD fine-tune -> report. See README.md.
"""
from .checkpoint import load_pruned, save_pruned, tag_model
from .config import CompressConfig
from .data import Dataset, load_dataset
from .errors import (CheckpointError, ConfigError, DataError, ModelError, PlanError, ResourceError,
                     RLPrunerError)
from .graph import PruningGraph
from .models import build_model, list_models, model_spec


def compress(config: CompressConfig) -> dict:
    """Run the whole compression (see :func:`rlpruner_ray.pipeline.compress`)."""
    from .pipeline import compress as _compress
    return _compress(config)


__version__ = "0.1.0"
__all__ = ["build_model", "list_models", "model_spec", "load_dataset", "Dataset", "PruningGraph",
           "load_pruned", "save_pruned", "tag_model", "CompressConfig", "compress", "RLPrunerError",
           "ConfigError", "ModelError", "DataError", "PlanError", "CheckpointError", "ResourceError"]
