"""Checkpoints: the native resharding format, and conversion to/from Hugging Face."""

from nemo_neo.checkpoint.hf_io import CheckpointError
from nemo_neo.checkpoint.native import load_full_state, load_into_model, read_index, save_distributed, save_full_state

__all__ = ["CheckpointError", "load_full_state", "load_into_model", "read_index", "save_distributed", "save_full_state"]
