"""Distillation loss fused with the LM heads: logits are formed chunk by chunk and never stored.

Inputs are each model's final hidden states (after the final norm, the same on every TP rank) and
its output-layer weight (this rank's contiguous vocab shard, `[V / TP, h]`; the shared embedding
when embeddings are tied). For every chunk of tokens the student's and the teacher's logit chunks
are computed (`hidden[rows] @ weight.T`, in the weights' dtype, exactly as the output layer would),
upcast into the compute-dtype workspace and fed to the per-chunk kernels of `losses.py` (the same
code as the unfused loss: same kinds, temperature, T^2, top-k, mask and ignore_index), whose
max / sum-exp / per-token sums are all-reduced over the TP group. The chunk's weighted gradient
w.r.t. the student logits then goes straight into the two gradients that the output layer's
backward would have produced:

    d hidden[rows] = g @ W            (partial over vocab shards: all-reduced over TP once, at the end)
    d W           += g.T @ hidden[rows]

so neither model's `[tokens, V_local]` logits nor the student's logit gradient exist at any time;
what lives is one chunk's buffers, `d hidden` ([tokens, h]) and `d W` ([V_local, h]).

Precision: for bf16/fp16 weights the logits are rounded to the weight dtype as in the unfused
path, the loss math is fp32, `d hidden` uses the rounded-to-bf16 logit gradient (as the unfused LM
head backward does), and `d W` accumulates over chunks in fp32 (one rounding at the end, like
megatron's fp32 wgrad accumulation), at the cost of one fp32 `[V_local, h]` buffer.

Chunking (``chunk_tokens="auto"``): each chunk reads both weights twice (forward, and the two
backward products), so chunks are larger than the unfused loss's (which only streams logits): see
FUSED_AUTO_CHUNK_ELEMENTS and BENCHMARKS.md ("KD loss fused with the LM head").

`hidden_states_head(model)` makes a megatron-core GPTModel return its final hidden states
([b, s, h], sequence-gathered under sequence parallelism) instead of logits; `head_weight(model)`
is the weight its output layer would use. `DistillationPair(fused=True)` uses both.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from nemo_neo.distill import vocab_parallel as vp
from nemo_neo.distill.losses import (
    KDLossConfig,
    KDLossOutput,
    _chunk_loss_and_grad,
    _chunk_size,
    _first_backward,
    _token_weight,
    _validate_tokens,
    _Workspace,
)
from nemo_neo.parallel.state import ParallelContext

# chunk_tokens="auto": elements of one [chunk x V_local] buffer, 8x the unfused loss's on CPU: a
# chunk's matmuls must be large enough to run near peak (see BENCHMARKS.md for the sweep).
FUSED_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 24}


class HeadInputs(NamedTuple):
    """What an LM head needs to make logits: final hidden states [b, s, h] and weight [V_local, h]."""

    hidden: torch.Tensor
    weight: torch.Tensor


def _logits_into(hidden_rows, weight, ws: _Workspace, low: dict, name: str) -> torch.Tensor:
    """hidden_rows @ weight.T in the weight's dtype, as a compute-dtype workspace chunk (private copy)."""
    n = hidden_rows.shape[0]
    target = ws.take(name, n)
    if weight.dtype == target.dtype:
        return torch.matmul(hidden_rows, weight.t(), out=target)
    if weight.dtype not in low:  # same-shape buffers in the weight's dtype, reused by every chunk
        low[weight.dtype] = _Workspace(*ws._shape, weight.dtype, target.device)
    rounded = torch.matmul(hidden_rows.to(weight.dtype), weight.t(), out=low[weight.dtype].take(name, n))
    return target.copy_(rounded)


class _FusedDistillationLoss(torch.autograd.Function):
    """Loss sum over token chunks of the fused heads; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx: ParallelContext, s_hidden, s_weight, t_hidden, t_weight, labels, token_weight, config, tp_group):
        hidden_shape = s_hidden.shape
        s_2d = s_hidden.detach().reshape(-1, hidden_shape[-1])
        s_weight = s_weight.detach()
        # ce_kl with alpha=1 never reads the teacher: skip its matmuls
        needs_teacher = t_hidden is not None and not (config.kind == "ce_kl" and config.alpha == 1.0)
        t_2d = t_hidden.detach().reshape(-1, t_hidden.shape[-1]) if needs_teacher else None
        t_weight = t_weight.detach() if t_weight is not None else None
        labels_1d = labels.reshape(-1) if labels is not None else None
        weight_1d = token_weight.reshape(-1)
        compute_dtype, device = weight_1d.dtype, s_2d.device
        num_tokens, vocab_local = s_2d.shape[0], s_weight.shape[0]
        chunk = _chunk_size(config.chunk_tokens, num_tokens, vocab_local, device, FUSED_AUTO_CHUNK_ELEMENTS)
        ws, low = _Workspace(chunk, vocab_local, compute_dtype, device), {}
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(s_2d) if want_hidden else None
        # d W accumulates in fp32 (fp64 stays fp64) and is rounded once at the end
        acc_dtype = torch.promote_types(s_weight.dtype, torch.float32)
        grad_weight = torch.zeros(s_weight.shape, dtype=acc_dtype, device=device) if want_weight else None
        total = torch.zeros((), dtype=compute_dtype, device=device)
        for start in range(0, num_tokens, chunk):
            rows = slice(start, min(start + chunk, num_tokens))
            student = _logits_into(s_2d[rows], s_weight, ws, low, "student")
            teacher = _logits_into(t_2d[rows], t_weight, ws, low, "teacher") if t_2d is not None else None
            loss_sum, grad = _chunk_loss_and_grad(
                student, teacher, labels_1d[rows] if labels_1d is not None else None, weight_1d[rows],
                config, tp_group, ws,
            )
            total += loss_sum
            if not (want_hidden or want_weight):
                continue
            grad = grad.mul_(weight_1d[rows].unsqueeze(-1))
            if want_hidden:
                # the logit gradient in the weight's dtype, as the unfused LM head's backward sees it
                g = grad if grad.dtype == s_weight.dtype else low[s_weight.dtype].take("grad", grad.shape[0]).copy_(grad)
                torch.matmul(g, s_weight, out=grad_hidden[rows])
            if want_weight:
                grad_weight.addmm_(grad.t().to(acc_dtype), s_2d[rows].to(acc_dtype))
            del grad
        if want_hidden:  # hidden is replicated over TP; each rank holds its vocab shard's part
            vp.all_reduce_(grad_hidden, tp_group)
        if want_weight and grad_weight.dtype != s_weight.dtype:
            grad_weight = grad_weight.to(s_weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_shape = hidden_shape
        ctx.backward_done = False
        return total

    @staticmethod
    def backward(ctx: ParallelContext, grad_output):
        _first_backward(ctx, "fused")
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype)).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _validate(student: HeadInputs, teacher: HeadInputs | None, labels, loss_mask, config, tp_group):
    tp = vp.group_size(tp_group)
    (s_hidden, s_weight) = student
    if s_hidden.shape[-1] != s_weight.shape[-1]:
        raise ValueError(f"student hidden size {s_hidden.shape[-1]} does not match its output weight "
                         f"{tuple(s_weight.shape)} ([V_local, hidden]).")
    if teacher is None:
        if not (config.kind == "ce_kl" and config.alpha == 1.0):
            raise ValueError("the teacher's hidden states and weight are needed unless kind='ce_kl' with alpha=1.")
    else:
        t_hidden, t_weight = teacher
        if t_weight.shape[0] != s_weight.shape[0]:
            raise ValueError(
                f"student and teacher output layers have different vocab sizes: student "
                f"{s_weight.shape[0] * tp}, teacher {t_weight.shape[0] * tp}. Logit distillation compares "
                "distributions over the same token ids: give both the same tokenizer and padded vocab."
            )
        if t_hidden.shape[-1] != t_weight.shape[-1] or t_hidden.shape[:-1] != s_hidden.shape[:-1]:
            raise ValueError(f"teacher hidden {tuple(t_hidden.shape)} / weight {tuple(t_weight.shape)} do not "
                             f"match the student's tokens {tuple(s_hidden.shape[:-1])}.")
    _validate_tokens(s_hidden.shape[:-1], s_weight.shape[0] * tp, labels, loss_mask, config)


def fused_distillation_loss(
    student: HeadInputs,
    teacher: HeadInputs | None,
    config: KDLossConfig,
    *,
    labels: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
) -> KDLossOutput:
    """`distillation_loss(student.hidden @ student.weight.T, teacher.hidden @ teacher.weight.T, ...)`
    without the logits (see the module docstring).

    student, teacher: HeadInputs(hidden [b, s, h], weight [V / TP, h]); hidden is the same on every
        TP rank and its returned gradient is the full one (all-reduced over `tp_group`). The teacher
        is never differentiated; None only for ce_kl with alpha=1 (cross-entropy of the student).
    labels, loss_mask, tp_group, return value: as `distillation_loss`; differentiable w.r.t.
        student.hidden and student.weight.
    """
    _validate(student, teacher, labels, loss_mask, config, tp_group)
    dtypes = [student.hidden.dtype] + ([teacher.hidden.dtype] if teacher is not None else [])
    compute_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    token_weight = _token_weight(student.hidden.shape[:-1], labels, loss_mask, config, compute_dtype,
                                 student.hidden.device)
    t_hidden, t_weight = teacher if teacher is not None else (None, None)
    loss_sum = _FusedDistillationLoss.apply(student.hidden, student.weight, t_hidden, t_weight, labels,
                                            token_weight, config, tp_group)
    return KDLossOutput(loss_sum, token_weight.sum().detach())


# ---------------------------------------------------------------------------------------------
# megatron-core GPTModel: hidden states instead of logits
# ---------------------------------------------------------------------------------------------


def head_weight(model) -> torch.Tensor:
    """The weight `model.output_layer` multiplies by: the shared embedding when tied (on the last
    stage of a PP>1 model, megatron's copy whose gradient it all-reduces with the first stage)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


@contextlib.contextmanager
def hidden_states_head(model):
    """Within the block, `model(...)` returns the final hidden states [b, s, h] instead of logits.

    The output layer is replaced (on this instance only) by a pass-through. Under sequence
    parallelism it all-gathers the sequence once, as the output layer itself would; its backward
    takes this rank's slice (not a reduce-scatter) because the fused loss already returns the full
    hidden-state gradient. Without it, the input needs no TP copy op for the same reason.
    """
    layer = model.output_layer

    def passthrough(input_, weight=None, runtime_gather_output=None):
        if getattr(layer, "sequence_parallel", False):
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
        return input_, None

    layer.forward = passthrough
    try:
        yield
    finally:
        del layer.forward
