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
megatron's fp32 wgrad accumulation).

Where d W goes: under megatron DDP (how nemo_neo trains) the weight has an fp32 `main_grad` and d W
is added straight into it, as megatron's gradient_accumulation_fusion does, so no weight-sized
tensor is allocated at all (`_main_grad`, `_FusedDistillationLoss`). Otherwise it is one fp32
`[V_local, h]` accumulator plus its weight-dtype copy, returned as the weight's gradient: 170 MiB at
bf16 49152 x 576, a floor that does not shrink with fewer tokens (BENCHMARKS.md, "plain").

Memory per chunk: three compute-dtype [chunk, V_local] buffers (student, teacher, log q) and one in
the weights' dtype that the student's logits, the teacher's and the logit gradient share in turn.
Chunking (``chunk_tokens="auto"``): each chunk reads both weights twice (forward, and the two
backward products), so chunks are larger than the unfused loss's (which only streams logits): see
FUSED_AUTO_CHUNK_ELEMENTS and BENCHMARKS.md ("KD loss fused with the LM heads").

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
from nemo_neo.errors import ConfigError
from nemo_neo.parallel.state import ParallelContext

# chunk_tokens="auto": elements of one [chunk x V_local] buffer, 8x the unfused loss's on CPU: a
# chunk's matmuls must be large enough to run near peak (see BENCHMARKS.md for the sweep).
FUSED_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 24}


class HeadInputs(NamedTuple):
    """What an LM head needs to make logits: final hidden states [b, s, h] and weight [V_local, h]."""

    hidden: torch.Tensor
    weight: torch.Tensor


def _logits_into(hidden_rows, weight, ws: _Workspace, low: dict, name: str) -> torch.Tensor:
    """hidden_rows @ weight.T in the weight's dtype, as a compute-dtype workspace chunk (private copy).

    The weight-dtype product goes through ONE low-precision buffer ("low"), which the student's
    logits, the teacher's and the logit gradient take in turn: each is copied out before the next."""
    n = hidden_rows.shape[0]
    target = ws.take(name, n)
    if weight.dtype == target.dtype:
        return torch.matmul(hidden_rows, weight.t(), out=target)
    rounded = torch.matmul(hidden_rows.to(weight.dtype), weight.t(), out=_low(ws, low, weight.dtype, n))
    return target.copy_(rounded)


def _low(ws: _Workspace, low: dict, dtype: torch.dtype, rows: int) -> torch.Tensor:
    if dtype not in low:
        low[dtype] = _Workspace(*ws._shape, dtype, ws._device)
    return low[dtype].take("low", rows)


def _main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """megatron DDP's fp32 gradient buffer of `weight`, if d W can be accumulated straight into it.

    megatron's DistributedDataParallel gives every trained parameter `main_grad` (and the flag
    `grad_added_to_main_grad`); its backward hook adds `param.grad` into it. Accumulating the head's
    d W there, as megatron's gradient_accumulation_fusion does, removes the fp32 accumulator and the
    weight-dtype result (3x / 6x the weight in bytes at bf16). Only a buffer at least as precise as
    fp32 qualifies: a bf16 main_grad would be rounded once per chunk instead of once."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not hasattr(weight, "grad_added_to_main_grad"):
        return None
    if main_grad.shape != weight.shape or main_grad.dtype != torch.promote_types(weight.dtype, torch.float32):
        return None
    return main_grad


def _head_pass(inputs: tuple, config, tp_group, chunk: int, grad_hidden=None, grad_weight=None, weight_scale=1.0):
    """Walk the token chunks: loss sum (returned); `grad_hidden[rows] = g @ W` and
    `grad_weight += weight_scale * g.T @ hidden[rows]` for the tensors given (g: weighted d loss / d logits)."""
    s_2d, s_weight, t_2d, t_weight, labels_1d, weight_1d = inputs
    num_tokens, vocab_local = s_2d.shape[0], s_weight.shape[0]
    ws, low = _Workspace(chunk, vocab_local, weight_1d.dtype, s_2d.device), {}
    total = torch.zeros((), dtype=weight_1d.dtype, device=s_2d.device)
    for start in range(0, num_tokens, chunk):
        rows = slice(start, min(start + chunk, num_tokens))
        student = _logits_into(s_2d[rows], s_weight, ws, low, "student")
        teacher = _logits_into(t_2d[rows], t_weight, ws, low, "teacher") if t_2d is not None else None
        loss_sum, grad = _chunk_loss_and_grad(
            student, teacher, labels_1d[rows] if labels_1d is not None else None, weight_1d[rows],
            config, tp_group, ws,
        )
        total += loss_sum
        if grad_hidden is None and grad_weight is None:
            continue
        grad = grad.mul_(weight_1d[rows].unsqueeze(-1))
        if grad_hidden is not None:
            # the logit gradient in the weight's dtype, as the unfused LM head's backward sees it
            g = grad if grad.dtype == s_weight.dtype else _low(ws, low, s_weight.dtype, grad.shape[0]).copy_(grad)
            torch.matmul(g, s_weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(grad.t().to(grad_weight.dtype), s_2d[rows].to(grad_weight.dtype), alpha=weight_scale)
        del grad
    return total


class _FusedDistillationLoss(torch.autograd.Function):
    """Loss sum over token chunks of the fused heads; gradients computed in forward, scaled in backward.

    With megatron's `main_grad` on the student weight (`_main_grad`), d W is added to it in forward
    for grad_output = 1, which is what megatron's schedule sends with calculate_per_token_loss and a
    loss scale of 1 (fp32, bf16): backward then returns no weight gradient (the DDP hook has nothing
    to add; this relies on overlap_grad_reduce=False, as `train.schedule.wrap_ddp` sets). Any other
    grad_output g (fp16 loss scaling, a caller dividing the sum) is still exact: backward recomputes
    the chunks and adds (g - 1) * d W, at the cost of a second pass over the heads.
    """

    @staticmethod
    def forward(ctx: ParallelContext, s_hidden, s_weight, t_hidden, t_weight, labels, token_weight, config, tp_group):
        hidden_shape = s_hidden.shape
        s_2d = s_hidden.detach().reshape(-1, hidden_shape[-1])
        # ce_kl with alpha=1 never reads the teacher: skip its matmuls
        needs_teacher = t_hidden is not None and not (config.kind == "ce_kl" and config.alpha == 1.0)
        t_2d = t_hidden.detach().reshape(-1, t_hidden.shape[-1]) if needs_teacher else None
        inputs = (s_2d, s_weight.detach(), t_2d, t_weight.detach() if t_weight is not None else None,
                  labels.reshape(-1) if labels is not None else None, token_weight.reshape(-1))
        chunk = _chunk_size(config.chunk_tokens, s_2d.shape[0], s_weight.shape[0], s_2d.device, FUSED_AUTO_CHUNK_ELEMENTS)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(s_2d) if want_hidden else None
        main_grad = _main_grad(s_weight) if want_weight else None
        grad_weight = None
        if want_weight:
            # d W accumulates in fp32 (fp64 stays fp64) and is rounded once at the end
            grad_weight = main_grad if main_grad is not None else torch.zeros(
                s_weight.shape, dtype=torch.promote_types(s_weight.dtype, torch.float32), device=s_2d.device)
        total = _head_pass(inputs, config, tp_group, chunk, grad_hidden=grad_hidden, grad_weight=grad_weight)
        if want_hidden:  # hidden is replicated over TP; each rank holds its vocab shard's part
            vp.all_reduce_(grad_hidden, tp_group)
        if main_grad is not None:
            ctx.recompute = (inputs, config, tp_group, chunk, main_grad)  # only for grad_output != 1
            grad_weight = None
        elif want_weight and grad_weight.dtype != s_weight.dtype:
            grad_weight = grad_weight.to(s_weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_shape = hidden_shape
        ctx.backward_done = False
        return total

    @staticmethod
    def backward(ctx: ParallelContext, grad_output):
        _first_backward(ctx, "fused")
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = float(grad_output)
        recompute = getattr(ctx, "recompute", None)
        ctx.recompute = None
        if recompute is not None and scale != 1.0:  # main_grad got d W at scale 1: add the rest
            inputs, config, tp_group, chunk, main_grad = recompute
            _head_pass(inputs, config, tp_group, chunk, grad_weight=main_grad, weight_scale=scale - 1.0)
        if grad_hidden is not None:
            if scale != 1.0:
                grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        if grad_weight is not None and scale != 1.0:
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

    Why the whole sequence and not one chunk at a time: the gathered hidden states (and their
    gradient) are [tokens, h] in the weights' dtype, e.g. 8192 x 4096 x 2 B = 64 MiB each, against
    2 GiB / TP of bf16 logits per model at vocab 128256 that the fused loss removes, and 112 MiB of
    its own chunk buffers; megatron's output layer gathers the whole sequence too. Gathering per chunk
    would save (TP - 1) / TP of those 64 MiB at the cost of one collective per chunk, and chunks
    would have to follow the [s, b] shard layout instead of the [b, s] token order.

    Only the output layer's weight is multiplied: a layer with more (a bias, an adapter) is refused.
    """
    layer = model.output_layer
    extra = [name for name, _ in layer.named_parameters() if name != "weight"]
    if extra or getattr(layer, "bias", None) is not None:
        raise ConfigError(f"the fused KD loss multiplies the final hidden states by the output layer's weight alone, "
                          f"but this output layer also has {extra or ['bias']}, which it would leave out: set "
                          "distill.loss.fused=false for this model.")

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
