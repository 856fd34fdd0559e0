"""The distillation objective as the training loop sees it, and distillation validation metrics."""

from __future__ import annotations

import math

import torch

from nemo_neo.data.dataset import collate
from nemo_neo.distill.fused import HeadInputs, fused_distillation_loss
from nemo_neo.distill.losses import KDLossConfig, distillation_loss
from nemo_neo.parallel import chunks
from nemo_neo.parallel.reduce import sum_from_last_stage
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train.schedule import run_microbatches

CE_ONLY = KDLossConfig(kind="ce_kl", alpha=1.0)


def schedule_outputs(out):
    """KDLossOutput -> what megatron's schedule takes with calculate_per_token_loss: (sum, int count, report)."""
    tokens = out.num_tokens.round().to(torch.int)
    return out.loss_sum, tokens, {"loss_sum": out.loss_sum.detach().clone(), "tokens": tokens.clone()}


def _detached(out):
    return HeadInputs(out.hidden.detach(), out.weight.detach()) if isinstance(out, HeadInputs) else out.detach()


def pair_loss(student_out, teacher_out, config: KDLossConfig, batch, tp_group=None):
    """The loss of one last-stage output of a DistillationPair: logits (unfused) or HeadInputs
    (fused, `DistillationPair(fused=True)`). `teacher_out` None: CE only (ce_kl, alpha=1)."""
    labels, mask = batch.get("labels"), batch.get("loss_mask")
    if isinstance(student_out, HeadInputs):
        return fused_distillation_loss(student_out, teacher_out, config, labels=labels, loss_mask=mask,
                                       tp_group=tp_group)
    if config.fused:
        raise ValueError("distill loss fused=true but the model returned logits: build the DistillationPair "
                         "with fused=True (pair.fused = loss_config.fused) so the last stage returns hidden states.")
    teacher_logits = teacher_out if teacher_out is not None else student_out.detach()
    return distillation_loss(student_out, teacher_logits, config, labels=labels, loss_mask=mask, tp_group=tp_group)


def kd_loss_fn(config: KDLossConfig, tp_group=None):
    """loss_fn for `Trainer`: (student, teacher) logits or HeadInputs on the last stage -> (sum, count, report)."""

    def loss_fn(outputs, batch):
        student_out, teacher_out = outputs
        return schedule_outputs(pair_loss(student_out, teacher_out, config, batch, tp_group))

    return loss_fn


def lm_loss_fn(tp_group=None, chunk_tokens="auto"):
    """loss_fn for `Trainer` on a plain GPT stage: next-token cross-entropy (teacher correction, SFT)."""
    ce = KDLossConfig(kind="ce_kl", alpha=1.0, chunk_tokens=chunk_tokens)

    def loss_fn(logits, batch):
        return schedule_outputs(distillation_loss(logits, logits.detach(), ce, labels=batch["labels"],
                                                   loss_mask=batch.get("loss_mask"), tp_group=tp_group))

    return loss_fn


def kd_with_correction_loss_fn(config: KDLossConfig, tp_group=None, chunk_tokens="auto"):
    """loss_fn for a DistillationPair whose teacher is corrected while the student distills:
    KD(student || detached teacher) + CE(teacher). The two terms touch disjoint parameters, so the
    sum trains each model on its own objective in one backward pass."""
    teacher_ce = KDLossConfig(kind="ce_kl", alpha=1.0, chunk_tokens=chunk_tokens)

    if config.fused:
        teacher_ce.fused = True

    def loss_fn(outputs, batch):
        student_out, teacher_out = outputs
        kd = pair_loss(student_out, _detached(teacher_out), config, batch, tp_group)
        ce = pair_loss(teacher_out, None, teacher_ce, batch, tp_group)
        loss_sum, tokens, report = schedule_outputs(kd)
        report["teacher_loss_sum"] = ce.loss_sum.detach().clone()
        return loss_sum + ce.loss_sum, tokens, report

    loss_fn.extra_sums = ("teacher_loss_sum",)
    return loss_fn


@torch.no_grad()
def validation_sums(model, ctx: ParallelContext, batches: list[dict], kl_and_ce, adjust_tensor_shapes_fn=None) -> dict:
    """{kl, loss, perplexity} per token over `batches` (this DP rank's share of the held-out rows),
    forward only through the pipeline; kl_and_ce(output, batch) -> (KL, CE) KDLossOutputs on the last stage.
    `model`: a DistillationPair, or this rank's list of pair chunks (interleaved pipeline)."""
    was_training = chunks.is_training(model)
    chunks.set_train(model, False)

    def metrics_fn(output, batch):
        kl, ce = kl_and_ce(output, batch)
        return kl.loss_sum, {"sums": torch.stack([kl.loss_sum.double(), ce.loss_sum.double(), ce.num_tokens.double()])}

    total = torch.zeros(3, dtype=torch.float64)
    # one micro-batch at a time: validation holds no more than one's activations; megatron's interleaved
    # schedule needs at least PP micro-batches per call: all of them in one (forward only: none kept)
    groups = [batches] if ctx.vpp_size > 1 and batches else [[b] for b in batches]
    for group in groups:
        for r in run_microbatches(model, group, metrics_fn, forward_only=True, adjust_tensor_shapes_fn=adjust_tensor_shapes_fn):
            total += r["sums"].cpu()
    kl_sum, ce_sum, tokens = sum_from_last_stage(total, ctx).tolist()
    chunks.set_train(model, was_training)
    tokens = max(tokens, 1.0)
    return {"kl": kl_sum / tokens, "loss": ce_sum / tokens, "perplexity": math.exp(ce_sum / tokens)}


def distillation_metrics(pair, ctx: ParallelContext, rows: torch.Tensor, micro_batch_size: int, tp_group=None,
                         kl_config: KDLossConfig | None = None) -> dict:
    """Student LM loss and forward KL(teacher || student) per token on held-out rows (kl_config:
    another KL, e.g. top-K + tail at a temperature, as a cached run's validation computes it)."""
    kl_config = kl_config or KDLossConfig(kind="forward_kl")
    mine = rows[ctx.dp_rank :: ctx.dp_size]
    batches = [{k: v.to(ctx.device) for k, v in collate(mine[i : i + micro_batch_size]).items()}
               for i in range(0, len(mine), micro_batch_size)]

    def kl_and_ce(outputs, batch):
        student, teacher = outputs  # logits, or HeadInputs when pair.fused
        return (pair_loss(student, teacher, kl_config, {"loss_mask": batch.get("loss_mask")}, tp_group),
                pair_loss(student, teacher, CE_ONLY, batch, tp_group))

    return validation_sums(pair, ctx, batches, kl_and_ce, chunks.as_chunks(pair)[0].pair_tensor_shapes)
