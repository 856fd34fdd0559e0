"""Vocab-parallel building blocks for losses over tensor-parallel logit shards.

Under tensor parallelism megatron-core's output layer leaves each TP rank with a contiguous vocab
slice `[rank * V_local, (rank + 1) * V_local)` of the logits. Everything here works on such a shard
without ever gathering the full vocab: per-token maxima, softmax denominators and per-token sums are
all-reduced over the TP group, which is passed explicitly (`None` = no tensor parallelism, the shard
is the full vocab). The helpers are deliberately *not* differentiable: the loss Function in
`losses.py` computes the gradient w.r.t. the student shard analytically, which is both exact and
avoids a second round of collectives in backward.

All helpers expect 2-D `[tokens, V_local]` tensors in the compute dtype (fp32 or fp64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """World size of `group`; 1 for `None` (no tensor parallelism)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group`; 0 for `None`."""
    if group is None:
        return 0
    return dist.get_rank(group)


def all_reduce_(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`; a no-op without a group (or in a group of one)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def vocab_range(local_vocab: int, group) -> tuple[int, int]:
    """[start, end) of the global vocab ids held by this rank (megatron's equal-size partition)."""
    start = group_rank(group) * local_vocab
    return start, start + local_vocab


def log_softmax(logits: torch.Tensor, group, out: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax over the *global* vocab of a `[n, V_local]` shard, returned as a local shard.

    The max (for stability) and the sum of exponentials are all-reduced, so the result equals the
    matching slice of `log_softmax(full_logits)`. Writes into `out` (same shape and dtype, not
    overlapping `logits`) when given, else returns a new tensor; `logits` is untouched. Without
    tensor parallelism this is torch's fused log_softmax (one kernel instead of five passes).
    """
    if group_size(group) == 1:
        return torch.log_softmax(logits, dim=-1) if out is None else torch.log_softmax(logits, dim=-1, out=out)
    row_max = logits.max(dim=-1, keepdim=True).values
    all_reduce_(row_max, group, op=dist.ReduceOp.MAX)
    shifted = torch.sub(logits, row_max) if out is None else torch.sub(logits, row_max, out=out)
    sum_exp = shifted.exp().sum(dim=-1, keepdim=True)
    all_reduce_(sum_exp, group)
    return shifted.sub_(sum_exp.log_())


def sum_over_vocab(values: torch.Tensor, group) -> torch.Tensor:
    """Per-token sum over the global vocab of a `[n, V_local]` shard -> `[n]`."""
    return all_reduce_(values.sum(dim=-1), group)


def gather_at_global_ids(local_values: torch.Tensor, global_ids: torch.Tensor, group) -> torch.Tensor:
    """Values of the global-vocab tensor at `global_ids` (`[n, k]`, every id valid), from shards.

    Each id is owned by exactly one rank: that rank contributes the value, the others contribute 0,
    and a SUM all-reduce assembles the result on every rank (the trick megatron's
    vocab_parallel_cross_entropy uses to pick the target logit).
    """
    start, end = vocab_range(local_values.shape[-1], group)
    owned = (global_ids >= start) & (global_ids < end)
    local_ids = torch.where(owned, global_ids - start, torch.zeros_like(global_ids))
    picked = local_values.gather(-1, local_ids)
    picked = picked.masked_fill_(~owned, 0.0)
    return all_reduce_(picked, group)


def scatter_add_at_global_ids(
    target: torch.Tensor, global_ids: torch.Tensor, values: torch.Tensor, group
) -> torch.Tensor:
    """`target[i, ids[i, j]] += values[i, j]` for the ids this rank owns (in place on the shard)."""
    start, end = vocab_range(target.shape[-1], group)
    owned = (global_ids >= start) & (global_ids < end)
    local_ids = torch.where(owned, global_ids - start, torch.zeros_like(global_ids))
    return target.scatter_add_(-1, local_ids, values * owned.to(values.dtype))


def global_topk(logits: torch.Tensor, k: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k over the vocab of a `[n, V_local]` shard -> (values `[n, k]`, global ids `[n, k]`).

    Each rank takes its local top-min(k, V_local) candidates; the candidates are all-gathered (only
    `n * tp * k` numbers, never the vocab) and the top-k of the union is the global top-k. Every
    rank gathers identical data in rank order, so all ranks select identical ids.
    """
    local_vocab = logits.shape[-1]
    start, _ = vocab_range(local_vocab, group)
    local_k = min(k, local_vocab)
    values, ids = logits.topk(local_k, dim=-1)
    ids = ids + start
    world = group_size(group)
    if world > 1:
        gathered_values = [torch.empty_like(values) for _ in range(world)]
        gathered_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(gathered_values, values.contiguous(), group=group)
        dist.all_gather(gathered_ids, ids.contiguous(), group=group)
        values = torch.cat(gathered_values, dim=-1)
        ids = torch.cat(gathered_ids, dim=-1)
    if values.shape[-1] == k:
        return values, ids
    best_values, positions = values.topk(k, dim=-1)
    return best_values, ids.gather(-1, positions)
