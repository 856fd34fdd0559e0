"""Structured pruning (Minitron): activation importance, width pruning, depth pruning.

The searches over candidates (which layers to drop, which architecture) are workflows:
`nemo_neo.recipes.depth_search`."""

from nemo_neo.prune.depth import drop_layers, drop_layers_checkpoint
from nemo_neo.prune.importance import ImportanceConfig, compute_importance, load_scores, save_scores
from nemo_neo.prune.width import PruneTargetError, parse_target, prune_width, prune_width_random, pruned_arch

__all__ = [
    "ImportanceConfig",
    "PruneTargetError",
    "compute_importance",
    "drop_layers",
    "drop_layers_checkpoint",
    "load_scores",
    "parse_target",
    "prune_width",
    "prune_width_random",
    "pruned_arch",
    "save_scores",
]
