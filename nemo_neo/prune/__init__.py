"""Structured pruning (Minitron): depth (drop layers) and, later, width by activation importance."""

from nemo_neo.prune.depth import drop_layers, drop_layers_checkpoint

__all__ = ["drop_layers", "drop_layers_checkpoint"]
