"""Depth pruning: remove whole transformer layers and renumber the rest."""

from __future__ import annotations

import copy

import torch

from nemo_neo.checkpoint.hf_io import copy_tokenizer_files
from nemo_neo.checkpoint.native import load_full_state, save_full_state
from nemo_neo.checkpoint.sharding import LAYER_NAME
from nemo_neo.models.arch import GPTArch
from nemo_neo.prune.width import PruneTargetError


def check_drop_layers(num_layers: int, layers) -> list[int]:
    """The sorted distinct layers to drop, or one `PruneTargetError` naming what is wrong."""
    drop = sorted(set(int(i) for i in layers))
    bad = [i for i in drop if not 0 <= i < num_layers]
    if bad:
        raise PruneTargetError(f"layers {bad} do not exist: the model has layers 0..{num_layers - 1}")
    if len(drop) >= num_layers:
        raise PruneTargetError(f"cannot drop all {num_layers} layers; keep at least one")
    return drop


def drop_layers(arch: GPTArch, state: dict[str, torch.Tensor], layers) -> tuple[GPTArch, dict[str, torch.Tensor]]:
    """Remove `layers` (0-based indices) from a full neo state dict; later layers move up."""
    drop = check_drop_layers(arch.num_layers, layers)
    keep = [i for i in range(arch.num_layers) if i not in drop]
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, tensor in state.items():
        m = LAYER_NAME.match(name)
        if m is None:
            out[name] = tensor
        elif int(m.group(1)) in new_index:
            out[f"decoder.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = tensor
    pruned = copy.deepcopy(arch)
    pruned.num_layers = len(keep)
    return pruned, out


def drop_layers_checkpoint(ckpt, out, layers, overwrite: bool = False):
    """Checkpoint -> checkpoint with `layers` removed (tokenizer carried over)."""
    from pathlib import Path

    arch, state, index = load_full_state(ckpt)
    pruned, state = drop_layers(arch, state, layers)
    meta = {"pruned_from": str(ckpt), "dropped_layers": sorted(set(int(i) for i in layers))}
    return save_full_state(out, pruned, state, lambda dst: copy_tokenizer_files(Path(ckpt), dst), metadata=meta, overwrite=overwrite)
