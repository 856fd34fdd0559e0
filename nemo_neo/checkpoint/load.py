"""Build this rank's stage of a model and fill it from a nemo_neo checkpoint."""

from __future__ import annotations

import torch

from nemo_neo.checkpoint.native import load_into_model, read_index
from nemo_neo.models.arch import GPTArch
from nemo_neo.models.gpt import build_gpt, transformer_config
from nemo_neo.parallel import chunks
from nemo_neo.parallel.state import ParallelContext


def build_for_context(arch: GPTArch, ctx: ParallelContext, dtype=torch.float32, vp_stage: int | None = None,
                      **config_overrides):
    """This rank's stage (or, under an interleaved pipeline, its chunk `vp_stage`) of the model."""
    config_overrides.setdefault("sequence_parallel", ctx.sequence_parallel)
    config = transformer_config(arch, tp=ctx.tp_size, pp=ctx.pp_size, dtype=dtype, vpp=ctx.vpp_size, **config_overrides)
    model = build_gpt(arch, config, pre_process=chunks.has_embedding(ctx, vp_stage),
                      post_process=chunks.has_head(ctx, vp_stage), vp_stage=vp_stage)
    return model.to(ctx.device)


def load_chunks(ckpt, ctx: ParallelContext, dtype=torch.float32, **config_overrides):
    """Returns (chunks, arch, metadata): this rank's model chunks, one per virtual stage (a list of one
    without an interleaved pipeline), filled from the checkpoint."""
    arch, _ = read_index(ckpt)
    models = [build_for_context(arch, ctx, dtype, vp_stage=v, **config_overrides) for v in chunks.vp_stages(ctx)]
    metadata = load_into_model(ckpt, models, arch, ctx)
    return models, arch, metadata


def load_model(ckpt, ctx: ParallelContext, dtype=torch.float32, **config_overrides):
    """Returns (model, arch, metadata) for this rank's TP/PP slice of the checkpoint."""
    if ctx.vpp_size > 1:
        raise ValueError("under an interleaved pipeline (virtual_pipeline > 1) a rank holds several model chunks: "
                         "build them with load_chunks")
    arch, _ = read_index(ckpt)
    model = build_for_context(arch, ctx, dtype, **config_overrides)
    metadata = load_into_model(ckpt, model, arch, ctx)
    return model, arch, metadata
