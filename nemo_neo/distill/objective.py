"""The distillation objective as the training loop sees it, and distillation validation metrics."""

from __future__ import annotations

import math

import torch

from nemo_neo.data.dataset import collate
from nemo_neo.distill.losses import KDLossConfig, distillation_loss
from nemo_neo.parallel.reduce import sum_from_last_stage
from nemo_neo.train.schedule import run_microbatches

CE_ONLY = KDLossConfig(kind="ce_kl", alpha=1.0)


def schedule_outputs(out):
    """KDLossOutput -> what megatron's schedule takes with calculate_per_token_loss: (sum, int count, report)."""
    tokens = out.num_tokens.round().to(torch.int)
    return out.loss_sum, tokens, {"loss_sum": out.loss_sum.detach().clone(), "tokens": tokens.clone()}


def kd_loss_fn(config: KDLossConfig, tp_group=None):
    """loss_fn for `Trainer`: (student_logits, teacher_logits) on the last stage -> (sum, count, report)."""

    def loss_fn(outputs, batch):
        student_logits, teacher_logits = outputs
        return schedule_outputs(distillation_loss(student_logits, teacher_logits, config, labels=batch["labels"],
                                                   loss_mask=batch.get("loss_mask"), tp_group=tp_group))

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

    def loss_fn(outputs, batch):
        student_logits, teacher_logits = outputs
        mask = batch.get("loss_mask")
        kd = distillation_loss(student_logits, teacher_logits.detach(), config, labels=batch["labels"],
                               loss_mask=mask, tp_group=tp_group)
        ce = distillation_loss(teacher_logits, teacher_logits.detach(), teacher_ce, labels=batch["labels"],
                               loss_mask=mask, tp_group=tp_group)
        loss_sum, tokens, report = schedule_outputs(kd)
        report["teacher_loss_sum"] = ce.loss_sum.detach().clone()
        return loss_sum + ce.loss_sum, tokens, report

    loss_fn.extra_sums = ("teacher_loss_sum",)
    return loss_fn


@torch.no_grad()
def distillation_metrics(pair, ctx, rows: torch.Tensor, micro_batch_size: int, tp_group=None) -> dict:
    """Student LM loss and forward KL(teacher || student) per token on held-out rows."""

    kl_config = KDLossConfig(kind="forward_kl")
    was_training = pair.training
    pair.eval()
    mine = rows[ctx.dp_rank :: ctx.dp_size]
    batches = [{k: v.to(ctx.device) for k, v in collate(mine[i : i + micro_batch_size]).items()}
               for i in range(0, len(mine), micro_batch_size)]

    def metrics_fn(outputs, batch):
        student, teacher = outputs
        kl = distillation_loss(student, teacher, kl_config, loss_mask=batch.get("loss_mask"), tp_group=tp_group)
        ce = distillation_loss(student, teacher, CE_ONLY, labels=batch["labels"], loss_mask=batch.get("loss_mask"), tp_group=tp_group)
        report = torch.stack([kl.loss_sum.double(), ce.loss_sum.double(), ce.num_tokens.double()])
        return kl.loss_sum, {"sums": report}

    total = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        for r in run_microbatches(pair, [batch], metrics_fn, forward_only=True, adjust_tensor_shapes_fn=pair.pair_tensor_shapes):
            total += r["sums"].cpu()
    kl_sum, ce_sum, tokens = sum_from_last_stage(total, ctx).tolist()
    pair.train(was_training)
    tokens = max(tokens, 1.0)
    return {"kl": kl_sum / tokens, "loss": ce_sum / tokens, "perplexity": math.exp(ce_sum / tokens)}
