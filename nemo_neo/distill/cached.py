"""Distillation from a teacher cache: the student's logits against cached sparse targets.

The loss is the online top-K loss of `losses.py` (same chunked, vocab-parallel Function, same
`sparse_kl.sparse_forward_kl`) with the teacher's targets read from disk instead of computed from
live logits: forward_kl, or ce_kl (alpha * CE + (1 - alpha) * KL, LLM-Neo) with the forward KL.
``config.top_k`` None uses all K cached entries; a smaller top_k folds the rest into the tail;
``top_k_tail=False`` renormalises over the top entries. The cache fixes the temperature.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nemo_neo.distill.losses import KDLossConfig, KDLossOutput, _ChunkedDistillationLoss, _token_weight, _validate_tokens
from nemo_neo.distill.objective import CE_ONLY, pair_loss, schedule_outputs, validation_sums
from nemo_neo.distill.sparse_kl import TopKTargets
from nemo_neo.distill.teacher_cache import CachedTargetSamples, TeacherCache, TeacherCacheError, batch_targets
from nemo_neo.errors import ConfigError
from nemo_neo.parallel.state import ParallelContext


def check_loss_for_cache(config: KDLossConfig, cache: TeacherCache) -> KDLossConfig:
    """The loss config as the cache can serve it, or one ConfigError saying what to change."""
    where = f"distillation from the teacher cache {cache.root} (K={cache.top_k}, T={cache.temperature})"
    if config.divergence_kind != "forward_kl":
        raise ConfigError(f"{where} computes the forward KL (kind forward_kl or ce_kl with divergence forward_kl), "
                          f"not {config.divergence_kind!r}: a top-K teacher has no mass elsewhere.")
    if config.fused:
        raise ConfigError(f"{where} needs the student's logits: set distill.loss.fused=false.")
    if config.temperature != cache.temperature:
        raise ConfigError(f"{where}: the loss's temperature {config.temperature} differs from the cache's "
                          f"{cache.temperature} (the stored log-probs are softened by it); write a cache at "
                          f"temperature {config.temperature} or set the loss's temperature to {cache.temperature}.")
    if config.top_k is not None and config.top_k > cache.top_k:
        raise ConfigError(f"{where}: the loss asks for top_k={config.top_k}, more than the {cache.top_k} cached.")
    return config


def cached_distillation_loss(student_logits: torch.Tensor, targets: TopKTargets, config: KDLossConfig, *,
                             labels=None, loss_mask=None, tp_group=None) -> KDLossOutput:
    """`losses.distillation_loss` with cached teacher targets (ids / log_probs [b, s, K], log_tail
    [b, s]) in place of the teacher's logits; the same conventions and return value."""
    vocab = student_logits.shape[-1] * (torch.distributed.get_world_size(tp_group) if tp_group is not None else 1)
    if targets.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"cached targets {tuple(targets.ids.shape)} do not match the student's tokens "
                         f"{tuple(student_logits.shape[:-1])}.")
    if targets.ids.numel() and int(targets.ids.max()) >= vocab:
        raise TeacherCacheError(f"the cached teacher ids reach {int(targets.ids.max())}, beyond the student's vocab {vocab}.")
    # the stored K bounds top_k; validated against the student's vocab like the online loss
    _validate_tokens(student_logits.shape[:-1], vocab, labels, loss_mask, replace(config, top_k=None))
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    token_weight = _token_weight(student_logits.shape[:-1], labels, loss_mask, config, compute_dtype,
                                 student_logits.device)
    loss_sum = _ChunkedDistillationLoss.apply(student_logits, targets, labels, token_weight, config, tp_group)
    return KDLossOutput(loss_sum, token_weight.sum().detach())


def cached_kd_loss_fn(config: KDLossConfig, tp_group=None):
    """loss_fn for `Trainer` on the student alone: its logits and a micro-batch of
    `teacher_cache.CachedTargetSamples` -> (sum, count, report)."""

    def loss_fn(logits, batch):
        return schedule_outputs(cached_distillation_loss(logits, batch_targets(batch), config, labels=batch.get("labels"),
                                                         loss_mask=batch.get("loss_mask"), tp_group=tp_group))

    return loss_fn


def cached_validation_metrics(student, ctx: ParallelContext, samples: CachedTargetSamples, micro_batch_size: int,
                              tp_group=None) -> dict:
    """{kl, loss, perplexity} of the student on the cache's validation split: kl is the sparse forward
    KL (all K cached entries + tail, at the cache's temperature) against the cached targets, the
    online top-K + tail KL of the same student up to the float16 rounding of the stored values."""
    kl_config = KDLossConfig(kind="forward_kl", temperature=samples.cache.temperature)
    mine = torch.arange(len(samples))[ctx.dp_rank :: ctx.dp_size]
    batches = [{k: v.to(ctx.device) for k, v in samples[mine[i : i + micro_batch_size]].items()}
               for i in range(0, len(mine), micro_batch_size)]

    def kl_and_ce(logits, batch):
        kl = cached_distillation_loss(logits, batch_targets(batch), kl_config, loss_mask=batch.get("loss_mask"),
                                      tp_group=tp_group)
        return kl, pair_loss(logits, None, CE_ONLY, batch, tp_group)

    return validation_sums(student, ctx, batches, kl_and_ce)
