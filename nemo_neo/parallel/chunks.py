"""Model chunks of an interleaved (virtual) pipeline: what every consumer of "this rank's model" needs.

With `ParallelConfig.virtual_pipeline = V` each pipeline rank holds V chunks, one per virtual stage,
as megatron-core lays them out: chunk v of rank p holds the layers of global virtual stage v * PP + p
(with 8 layers, PP=2, V=2: rank 0 holds [0, 1] and [4, 5], rank 1 [2, 3] and [6, 7]). The embedding
is in chunk 0 of the first rank, the head in the last chunk of the last rank. Code that takes "the
model" accepts one module or the list of chunks; `as_chunks` makes both a list.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from nemo_neo.parallel.state import ParallelContext


def as_chunks(model) -> list:
    """[model] for one module, the list itself for model chunks."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def vp_stages(ctx: ParallelContext) -> list[int | None]:
    """The virtual stage of each chunk this rank builds: [None] without an interleaved pipeline
    (megatron's models then take no vp_stage), [0 .. V-1] with one."""
    return list(range(ctx.vpp_size)) if ctx.vpp_size > 1 else [None]


def has_embedding(ctx: ParallelContext, vp_stage: int | None) -> bool:
    return ctx.is_first_stage and (vp_stage or 0) == 0


def has_head(ctx: ParallelContext, vp_stage: int | None) -> bool:
    return ctx.is_last_stage and (vp_stage or 0) == ctx.vpp_size - 1


def chunk_layer_offset(num_layers: int, ctx: ParallelContext, vp_stage: int | None) -> int:
    """Global number of the first layer of this rank's chunk `vp_stage` (uniform split)."""
    per_chunk = num_layers // (ctx.pp_size * ctx.vpp_size)
    return ((vp_stage or 0) * ctx.pp_size + ctx.pp_rank) * per_chunk


def layer_offset(model: torch.nn.Module, ctx: ParallelContext, num_layers: int | None = None) -> int:
    """`chunk_layer_offset` of a built model chunk (megatron's GPTModel keeps its vp_stage)."""
    num_layers = num_layers if num_layers is not None else model.config.num_layers
    return chunk_layer_offset(num_layers, ctx, getattr(model, "vp_stage", None))


def set_train(model, mode: bool = True) -> None:
    for chunk in as_chunks(model):
        chunk.train(mode)


def is_training(model) -> bool:
    return as_chunks(model)[0].training


@contextlib.contextmanager
def one_chunk_per_rank(ctx: ParallelContext):
    """`ctx` without the interleaved pipeline, for code that builds one model per rank (every recipe
    stage but distillation: correction, pruning, evaluation, export). megatron-core picks its
    schedule from its own global virtual-pipeline size, so that is switched off for as long too."""
    from megatron.core import parallel_state

    saved = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    parallel_state.set_virtual_pipeline_model_parallel_world_size(None)
    try:
        yield dataclasses.replace(ctx, vpp_size=1)
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_world_size(saved)
