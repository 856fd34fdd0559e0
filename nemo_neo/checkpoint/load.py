"""Build this rank's stage of a model and fill it from a nemo_neo checkpoint."""

from __future__ import annotations

import torch

from nemo_neo.checkpoint.native import load_into_model, read_index
from nemo_neo.models.arch import GPTArch
from nemo_neo.models.gpt import build_gpt, transformer_config
from nemo_neo.parallel.state import ParallelContext


def build_for_context(arch: GPTArch, ctx: ParallelContext, dtype=torch.float32, **config_overrides):
    config_overrides.setdefault("sequence_parallel", ctx.sequence_parallel)
    config = transformer_config(arch, tp=ctx.tp_size, pp=ctx.pp_size, dtype=dtype, **config_overrides)
    model = build_gpt(arch, config, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    return model.to(ctx.device)


def load_model(ckpt, ctx: ParallelContext, dtype=torch.float32, **config_overrides):
    """Returns (model, arch, metadata) for this rank's TP/PP slice of the checkpoint."""
    arch, _ = read_index(ckpt)
    model = build_for_context(arch, ctx, dtype, **config_overrides)
    metadata = load_into_model(ckpt, model, arch, ctx)
    return model, arch, metadata
