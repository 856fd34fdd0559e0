"""Forward KL against a sparse teacher: its top-K token ids and log-probs plus one "tail" bucket.

This is the one formula behind both the online top-K loss (`KDLossConfig.top_k`, targets taken from
live teacher logits by `teacher_topk_targets`) and distillation from a teacher cache
(`nemo_neo.distill.cached`, targets read from disk): the two differ only in where the targets come
from, so a cache reproduces the online loss up to the rounding of its stored values.

Tail convention (``top_k_tail=True``, the default; Model Optimizer's "ghost token")
-----------------------------------------------------------------------------------
The teacher distribution is collapsed onto K + 1 outcomes: its top-K tokens with their *full-vocab*
probabilities ``p_k = softmax(t / T)[id_k]`` (not renormalised), and the tail, every other token
together, with ``p_tail = 1 - sum_k p_k``. The student is collapsed the same way, from its
full-vocab ``q = softmax(s / T)``: ``q_k = q[id_k]`` and ``q_tail = sum of q over the ids outside
the teacher's top-K``. The loss is the KL between the two (K + 1)-outcome distributions:

    KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)

With K = V the tail is empty (p_tail = 0, its term is 0) and this is the full forward KL. The tail
masses are summed over the tail ids (never computed as 1 - sum, which cancels catastrophically when
the top-K hold almost all the mass); a term with p = 0 is 0.

``top_k_tail=False`` is the renormalised convention (DistillKit, axolotl): the teacher is
renormalised over its top-K, ``p_k = softmax(t_top / T)``, and there is no tail term.

Gradient w.r.t. the student logits (analytic, exact for the loss above with S = sum_k p_k + p_tail,
which is 1 up to the rounding of stored values): ``dKL/ds_i = (S q_i - p_i [i in top-K] -
(p_tail / q_tail) q_i [i in tail]) / T``.

All helpers work on `[n, V_local]` vocab shards in the compute dtype; cross-vocab reductions go
through `vocab_parallel`, so they are exact under tensor parallelism.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nemo_neo.distill import vocab_parallel as vp


class TopKTargets(NamedTuple):
    """A sparse teacher per token: global ids [..., K] (sorted by decreasing probability), their
    log-probs [..., K] at the distillation temperature, and log(p_tail) [...] (-inf: empty tail)."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    log_tail: torch.Tensor

    def reshape_tokens(self) -> TopKTargets:
        """The targets as 2-D token rows: ids / log_probs [n, K], log_tail [n]."""
        k = self.ids.shape[-1]
        return TopKTargets(self.ids.reshape(-1, k), self.log_probs.reshape(-1, k), self.log_tail.reshape(-1))

    def rows(self, rows: slice, dtype: torch.dtype) -> TopKTargets:
        """Token rows `rows` of 2-D targets, ids as int64 and values in the compute dtype."""
        return TopKTargets(self.ids[rows].long(), self.log_probs[rows].to(dtype), self.log_tail[rows].to(dtype))


def top_id_hits(shape, ids: torch.Tensor, dtype, device, group) -> torch.Tensor:
    """[n, V_local] tensor: 1 at the global `ids` this rank owns, 0 elsewhere (ids distinct per row)."""
    hits = torch.zeros(shape, dtype=dtype, device=device)
    return vp.scatter_add_at_global_ids(hits, ids, torch.ones(ids.shape, dtype=dtype, device=device), group)


def _global_log_sum_exp(shifted_exp: torch.Tensor, group) -> torch.Tensor:
    return vp.sum_over_vocab(shifted_exp, group).log()


def teacher_topk_targets(teacher: torch.Tensor, k: int, temperature: float, group) -> TopKTargets:
    """The global top-k of a teacher logit shard [n, V_local] with full-vocab log-probs at T and the
    log tail mass (summed over the other ids, every rank's shard). May overwrite `teacher`."""
    top_values, top_ids = vp.global_topk(teacher, k, group)  # T > 0 keeps the order
    scaled = teacher.div_(temperature) if temperature != 1.0 else teacher
    row_max = scaled.max(dim=-1, keepdim=True).values
    vp.all_reduce_(row_max, group, op=torch.distributed.ReduceOp.MAX)
    exp = scaled.sub_(row_max).exp_()
    log_z = _global_log_sum_exp(exp, group)  # log sum exp((t - max) / T)
    log_probs = top_values / temperature - row_max - log_z.unsqueeze(-1)
    hits = top_id_hits(exp.shape, top_ids, exp.dtype, exp.device, group)
    log_tail = _global_log_sum_exp(exp.masked_fill_(hits > 0, 0.0), group) - log_z
    return TopKTargets(top_ids, log_probs, log_tail)


def with_convention(targets: TopKTargets, top_k: int | None, tail: bool) -> TopKTargets:
    """Targets as a loss with `top_k` (None: all K) and `tail` uses them: the entries past top_k are
    folded into the tail; tail=False renormalises the top entries and drops the tail."""
    ids, log_probs, log_tail = targets
    if top_k is not None and top_k < ids.shape[-1]:
        folded = torch.cat([log_tail.unsqueeze(-1), log_probs[..., top_k:]], dim=-1)
        ids, log_probs, log_tail = ids[..., :top_k], log_probs[..., :top_k], torch.logsumexp(folded, dim=-1)
    if not tail:
        log_probs = torch.log_softmax(log_probs, dim=-1)
        log_tail = torch.full_like(log_tail, float("-inf"))
    return TopKTargets(ids, log_probs, log_tail)


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p - log q), 0 where p = 0 (log p = -inf)."""
    empty = torch.isneginf(log_p)
    return torch.where(empty, torch.zeros_like(log_p), log_p.exp() * (log_p - torch.where(empty, 0.0, log_q)))


def sparse_forward_kl(student: torch.Tensor, targets: TopKTargets, temperature: float, group):
    """(per-token KL [n], d KL / d student [n, V_local]) of a student logit shard against sparse
    targets (2-D rows, compute dtype); see the module docstring. May overwrite `student`."""
    ids, log_p_top, log_p_tail = targets
    scaled = student.div_(temperature) if temperature != 1.0 else student
    log_q = vp.log_softmax(scaled, group, out=torch.empty_like(scaled))
    log_q_top = vp.gather_at_global_ids(log_q, ids, group)
    q = log_q.exp_()
    hits = top_id_hits(q.shape, ids, q.dtype, q.device, group)
    q_tail = vp.sum_over_vocab(q.masked_fill(hits > 0, 0.0), group).clamp_min(torch.finfo(q.dtype).tiny)
    log_q_tail = q_tail.log()
    per_token = _plogp_ratio(log_p_top, log_q_top).sum(dim=-1) + _plogp_ratio(log_p_tail, log_q_tail)
    p_top, p_tail = log_p_top.exp(), log_p_tail.exp()
    total_mass = p_top.sum(dim=-1) + p_tail  # 1 up to the rounding of stored values
    ratio = p_tail / q_tail
    grad = q.mul_((total_mass - ratio).unsqueeze(-1))
    grad = vp.scatter_add_at_global_ids(grad, ids, log_q_top.exp() * ratio.unsqueeze(-1) - p_top, group)
    return per_token, (grad if temperature == 1.0 else grad.div_(temperature))
