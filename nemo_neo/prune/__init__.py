"""Structured pruning (Minitron): activation importance, width pruning, depth pruning and search."""

from nemo_neo.prune.depth import drop_layers, drop_layers_checkpoint
from nemo_neo.prune.depth_search import layers_skipped, loss_metric, search_depth, write_report
from nemo_neo.prune.importance import ImportanceConfig, compute_importance, load_scores, save_scores
from nemo_neo.prune.width import PruneTargetError, parse_target, prune_width, prune_width_random, pruned_arch

__all__ = [
    "ImportanceConfig",
    "PruneTargetError",
    "compute_importance",
    "drop_layers",
    "drop_layers_checkpoint",
    "layers_skipped",
    "load_scores",
    "loss_metric",
    "parse_target",
    "prune_width",
    "prune_width_random",
    "pruned_arch",
    "save_scores",
    "search_depth",
    "write_report",
]
