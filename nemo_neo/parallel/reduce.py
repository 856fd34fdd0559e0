"""Reductions of per-rank sums that every rank needs to see (loss, token counts)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_neo.parallel.state import ParallelContext


def sum_from_last_stage(values: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum `values` over data-parallel ranks of the last pipeline stage, counted once per TP group,
    and return the result on every rank (losses only exist on the last stage; TP ranks of a stage
    hold identical, already vocab-reduced values)."""
    values = values.detach().to(torch.float64).clone()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    if not (ctx.is_last_stage and ctx.tp_rank == 0):
        values.zero_()
    device_values = values.to(ctx.device)
    dist.all_reduce(device_values)
    return device_values.cpu()


def merge_stage_dicts(stage_dict: dict, ctx: ParallelContext) -> dict:
    """Union over pipeline stages of per-stage dicts (e.g. full tensors gathered over TP), counted
    once per stage (from its TP-rank-0, DP-rank-0 process); the result is on every rank."""
    contribution = stage_dict if ctx.tp_rank == 0 and ctx.dp_rank == 0 else {}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(contribution)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, contribution)
    return {k: v for part in parts for k, v in part.items()}
