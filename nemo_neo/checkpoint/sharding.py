"""How each nemo_neo tensor is split over tensor parallelism and pipeline stages.

Checkpoints hold full tensors with global layer numbers; a rank takes its slice on load and the
slices are gathered again on save, so a checkpoint saved at one TP/PP loads at any other.
"""

from __future__ import annotations

import re

import torch

# "decoder.layers.<i>.<rest>": a transformer layer's tensor (megatron-core names)
LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def tp_split(name: str) -> str | int | None:
    """Dimension a tensor is split along under TP: an int, "swiglu" (each half of fc1 split on
    dim 0), or None when every TP rank holds it whole (norms)."""
    if ".lora_" in name:  # LoRA adapters follow their base layer's split (see nemo_neo.peft.lora)
        base, _, which = name.rpartition(".lora_")
        column = base.endswith(("linear_qkv", "linear_fc1"))
        if which == "B" and column:
            return "swiglu" if base.endswith("linear_fc1") else 0
        if which == "A" and not column:
            return 1
        return None
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")):
        return 0  # vocab-parallel embedding/head; column-parallel qkv (rows grouped by query group)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1  # row-parallel
    if name.endswith("linear_fc1.weight"):
        return "swiglu"
    return None


def slice_ranges(name: str, shape: tuple[int, ...], tp_rank: int, tp: int) -> list[tuple[int, int, int]]:
    """The (dim, start, stop) pieces of the full tensor that TP rank `tp_rank` holds, in order."""
    split = tp_split(name)
    if split is None or tp == 1:
        return [(0, 0, shape[0])]
    if split == "swiglu":
        half = shape[0] // 2
        n = half // tp
        return [(0, h * half + tp_rank * n, h * half + (tp_rank + 1) * n) for h in (0, 1)]
    n = shape[split] // tp
    return [(split, tp_rank * n, (tp_rank + 1) * n)]


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    pieces = [full.narrow(dim, start, stop - start) for dim, start, stop in slice_ranges(name, tuple(full.shape), tp_rank, tp)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard` given every TP rank's piece, in rank order."""
    split = tp_split(name)
    if split is None or len(shards) == 1:
        return shards[0]
    if split == "swiglu":
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat(list(gates) + list(ups), dim=0)
    return torch.cat(shards, dim=split)


def canonical_name(name: str) -> str:
    """Checkpoint name of a model tensor: a LoRA-wrapped layer's frozen base is stored under the
    plain layer's name, so merged, unmerged and adapter-free checkpoints share one layout."""
    return name.replace(".base.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def to_global(local_name: str, offset: int) -> str:
    m = LAYER_NAME.match(local_name)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else local_name


def to_local(global_name: str, offset: int) -> str:
    m = LAYER_NAME.match(global_name)
    return f"decoder.layers.{int(m.group(1)) - offset}.{m.group(2)}" if m else global_name
