"""Logit distillation losses: forward/reverse KL, generalized JSD and CE+KL, chunked and vocab-parallel.

Which loss for which recipe
---------------------------
* ``forward_kl`` -- KL(teacher || student) on logits only, no cross-entropy. This is the Minitron
  default (Sreenivas et al., 2024, "LLM Pruning and Distillation in Practice: The Minitron
  Approach"): after pruning, the student is retrained with logit-only forward KL at T = 1.
* ``ce_kl`` -- ``alpha * CE(student, labels) + (1 - alpha) * s * D(teacher_T, student_T)`` with
  D the forward KL by default (``divergence`` chooses reverse KL or JSD instead) and
  ``s = T**2`` when ``t2_scaling`` else 1. The two papers this project reproduces differ exactly in
  ``s``: LLM-Neo (Yang et al., 2024) uses plain ``alpha * CE + (1 - alpha) * KL`` (``t2_scaling=False``);
  KD-LoRA (Azimi et al., 2024) uses cross-entropy plus a KL that is scaled by T**2 (Hinton et al.,
  2015: softening by T shrinks the soft-target gradients by ~1/T**2, and T**2 restores their
  magnitude relative to CE), i.e. ``t2_scaling=True``. CE always uses the unsoftened (T = 1) logits.
* ``reverse_kl`` -- KL(student || teacher), mode seeking (MiniLLM-style).
* ``jsd`` -- generalized Jensen-Shannon (GKD, Agarwal et al., 2024) with P = teacher, Q = student,
  M = beta * P + (1 - beta) * Q and JSD = beta * KL(P || M) + (1 - beta) * KL(Q || M).

All divergences use temperature-softened distributions ``softmax(logits / T)``; ``t2_scaling``
multiplies any of them by T**2.

``top_k`` (forward_kl and ce_kl only) keeps the teacher's k largest logits per token -- a *global*
top-k across TP vocab shards -- and compares the student's full-vocab probabilities at those ids. With
``top_k_tail=True`` (the default) the rest of the vocab is one "tail" bucket on both sides (teacher
``1 - sum_k p_k``, student its mass outside the teacher's top-k): the KL of the (k + 1)-outcome
distributions, which equals the full forward KL at k = V. ``top_k_tail=False`` renormalises the
teacher over its k and has no tail: ``sum_k p_k (log p_k - log q_{id_k})``. Both are
`sparse_kl.sparse_forward_kl`, the formula that distillation from a teacher cache (`cached`) uses
too. Reverse KL and JSD are undefined there (the truncated teacher puts zero mass on most of the vocab).

Token conventions
-----------------
The caller shifts: logits at position t predict ``labels[t]``. ``loss_mask`` ([b, s], 1 = counted)
zeroes padding and prompt tokens; for ``ce_kl`` a label equal to ``ignore_index`` (-100) also
removes the token (from both terms, so a token is either fully counted or not at all). The loss
returns the weighted SUM over tokens and the NUMBER of counted tokens separately, so that the mean
can be taken over all valid tokens of all micro-batches and data-parallel ranks
(`global_token_mean`), not as a mean of per-micro-batch means.

Memory and time
---------------
`_ChunkedDistillationLoss` walks the tokens in chunks of ``chunk_tokens``: each chunk is upcast to
fp32 (fp64 inputs stay fp64), its loss and its analytic gradient w.r.t. the student logits are
computed, and only the gradient is kept, in the student's dtype, in a buffer the size of the
student logits (which the backward pass of the LM head needs anyway). No [all_tokens x vocab]
fp32 tensor exists in forward or backward; backward only scales that buffer by grad_output.

The chunk's fp32 tensors live in a few [chunk x V_local] buffers allocated once per call and reused
by every chunk (`_Workspace`): on CPU a fresh multi-MB allocation per chunk is a new mmap whose pages
fault in on first touch, which costs more than the arithmetic. ``chunk_tokens="auto"`` (the default)
sizes chunks at ~1M elements (4 MiB fp32) per buffer on CPU, so that a chunk's buffers stay in
cache (within ~5% of the fastest of 8..1024 tokens per chunk at vocab 49152 and 128256 on a 2-core
EPYC; 2-2.5x faster than 1024; see BENCHMARKS.md), and at ~8M elements on CUDA, where bigger
kernels amortise launch overhead (not tuned: no GPU was at hand).
The full-vocab forward KL (the Minitron default, and the KL of ``ce_kl``) works in place in three
such buffers; ``ce_kl`` with ``alpha=1`` skips the divergence, whose weight is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nemo_neo.distill import vocab_parallel as vp
from nemo_neo.distill.sparse_kl import TopKTargets, sparse_forward_kl, teacher_topk_targets, with_convention
from nemo_neo.errors import ConfigError
from nemo_neo.parallel.state import ParallelContext

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd", "ce_kl")
DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")

# chunk_tokens="auto": elements of one [chunk x V_local] compute-dtype buffer, per device type.
AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 23}


@dataclass
class KDLossConfig:
    """Which distillation loss to compute, selectable by name from a (Hydra) config.

    kind: one of LOSS_KINDS.
    temperature: T > 0; divergences compare softmax(logits / T).
    alpha: weight of CE in ``ce_kl`` (the KL gets 1 - alpha); ignored by the other kinds.
    t2_scaling: multiply the divergence by T**2 (KD-LoRA / Hinton); off for LLM-Neo and Minitron.
    top_k: keep only the teacher's top-k logits per token (forward_kl / ce_kl); None = full vocab.
    top_k_tail: with top_k, the vocab outside the top-k is one tail bucket on both sides (default);
        False renormalises the teacher over its top-k (see the module docstring).
    jsd_beta: mixture weight of the teacher in ``jsd``, strictly between 0 and 1.
    chunk_tokens: tokens per chunk (bounds fp32 temporaries to ~chunk_tokens x V_local each);
        "auto" = AUTO_CHUNK_ELEMENTS // V_local tokens (see "Memory and time" above);
        None = one chunk with all tokens.
    ignore_index: label value that removes a token in ``ce_kl``.
    divergence: the divergence beside CE in ``ce_kl`` (forward_kl, reverse_kl or jsd); the other
        kinds are their own divergence.
    fused: compute the loss from the final hidden states and output-layer weights of both models
        (`nemo_neo.distill.fused`), never storing either model's [tokens, V_local] logits; the
        DistillationPair then returns hidden states on the last stage. Same loss and gradients.
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    alpha: float = 0.5
    t2_scaling: bool = False
    top_k: int | None = None
    top_k_tail: bool = True
    jsd_beta: float = 0.5
    chunk_tokens: int | str | None = "auto"
    ignore_index: int = -100
    divergence: str = "forward_kl"
    fused: bool = False

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"unknown distillation loss kind {self.kind!r}; choose one of {LOSS_KINDS}.")
        if self.divergence not in DIVERGENCE_KINDS:
            raise ConfigError(f"unknown divergence {self.divergence!r}; choose one of {DIVERGENCE_KINDS}.")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}.")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"jsd_beta must be strictly between 0 and 1, got {self.jsd_beta}.")
        if not (self.chunk_tokens is None or self.chunk_tokens == "auto" or
                (isinstance(self.chunk_tokens, int) and self.chunk_tokens >= 1)):
            raise ConfigError(f"chunk_tokens must be an int >= 1, 'auto' or None, got {self.chunk_tokens!r}.")
        if self.top_k is not None:
            if self.top_k < 1:
                raise ConfigError(f"top_k must be >= 1 or None, got {self.top_k}.")
            if self.divergence_kind != "forward_kl":
                raise ConfigError(
                    f"top_k is only defined for the forward KL (forward_kl, ce_kl), not {self.divergence_kind!r}: a teacher "
                    "truncated to k tokens has zero mass elsewhere, so reverse KL / JSD against it "
                    "are infinite or meaningless. Use top_k=None."
                )

    @property
    def divergence_kind(self) -> str:
        """The divergence this loss computes (for ce_kl: the one beside CE)."""
        return self.divergence if self.kind == "ce_kl" else self.kind

    @property
    def divergence_scale(self) -> float:
        return self.temperature**2 if self.t2_scaling else 1.0


class KDLossOutput(NamedTuple):
    """Weighted loss SUM over counted tokens (differentiable) and the number of counted tokens."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Per-chunk kernels: [n, V_local] compute-dtype tensors in, (per-token value [n], d value / d
# student [n, V_local]) out. Gradients are analytic; all cross-vocab reductions go through `vp`.
# The student/teacher chunks are private copies that a kernel may overwrite; the returned gradient
# may live in the workspace (valid until the next chunk).
# ---------------------------------------------------------------------------------------------


class _Workspace:
    """[chunk, V_local] compute-dtype buffers, allocated on first use and reused by every chunk."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self._shape, self._dtype, self._device = (rows, cols), dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        return buffer[:rows]


def _softened(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def _softmax_backward(q: torch.Tensor, g: torch.Tensor, temperature: float, group) -> torch.Tensor:
    """d/ds of a function with dL/dq = g (up to a per-token constant), q = softmax(s / T).

    dL/ds_i = q_i * (g_i - sum_j q_j g_j) / T. Overwrites and returns `g`.
    """
    expected = vp.sum_over_vocab(q * g, group)
    return g.sub_(expected.unsqueeze(-1)).mul_(q).div_(temperature)


def _forward_kl(student, teacher, config: KDLossConfig, group, ws: _Workspace):
    """KL(p || q), p = teacher, q = student; d/ds = (q - p) / T. `teacher` is a logit chunk, or the
    sparse `TopKTargets` of a teacher cache."""
    temperature = config.temperature
    if config.top_k is None and not isinstance(teacher, TopKTargets):
        # In place in three buffers: student -> log p, teacher -> p, workspace -> log q -> grad.
        if temperature != 1.0:
            student.div_(temperature)
            teacher.div_(temperature)
        log_q = vp.log_softmax(student, group, out=ws.take("log_q", student.shape[0]))
        log_p = vp.log_softmax(teacher, group, out=student)
        p = torch.exp(log_p, out=teacher)
        per_token = vp.sum_over_vocab(log_p.sub_(log_q).mul_(p), group)
        grad = log_q.exp_().sub_(p)
        return per_token, (grad if temperature == 1.0 else grad.div_(temperature))
    # one formula for live and cached teachers: only where the sparse targets come from differs
    targets = teacher if isinstance(teacher, TopKTargets) else teacher_topk_targets(teacher, config.top_k, temperature, group)
    return sparse_forward_kl(student, with_convention(targets, config.top_k, config.top_k_tail), temperature, group)


def _reverse_kl(student, teacher, config: KDLossConfig, group, ws: _Workspace):
    """KL(q || p); dL/dq = log q - log p (+1, which the softmax Jacobian cancels)."""
    temperature = config.temperature
    log_q = vp.log_softmax(_softened(student, temperature), group)
    log_p = vp.log_softmax(_softened(teacher, temperature), group)
    q = log_q.exp()
    log_ratio = log_q.sub_(log_p)
    per_token = vp.sum_over_vocab(q * log_ratio, group)
    return per_token, _softmax_backward(q, log_ratio, temperature, group)


def _jsd(student, teacher, config: KDLossConfig, group, ws: _Workspace):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    dL/dq_j = (1 - beta) (log q_j - log m_j): the terms from m's dependence on q cancel exactly.
    """
    temperature, beta = config.temperature, config.jsd_beta
    log_q = vp.log_softmax(_softened(student, temperature), group)
    log_p = vp.log_softmax(_softened(teacher, temperature), group)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p, q = log_p.exp(), log_q.exp()
    teacher_term = p.mul_(log_p.sub_(log_m)).mul_(beta)
    student_log_ratio = log_q.sub_(log_m)
    teacher_term.add_(q * student_log_ratio, alpha=1.0 - beta)
    per_token = vp.sum_over_vocab(teacher_term, group)
    return per_token, _softmax_backward(q, student_log_ratio.mul_(1.0 - beta), temperature, group)


def _cross_entropy(student, labels, group, ws: _Workspace):
    """-log softmax(s)[label] at T = 1, vocab-parallel; d/ds = softmax(s) - onehot(label).

    Ignored labels are clamped to id 0 here and removed by the caller's token weights.
    """
    log_q = vp.log_softmax(student, group, out=ws.take("ce", student.shape[0]))
    target_ids = labels.clamp(min=0).unsqueeze(-1)
    per_token = -vp.gather_at_global_ids(log_q, target_ids, group).squeeze(-1)
    minus_one = torch.full(target_ids.shape, -1.0, dtype=log_q.dtype, device=log_q.device)
    grad = vp.scatter_add_at_global_ids(log_q.exp_(), target_ids, minus_one, group)
    return per_token, grad


_DIVERGENCES = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def _chunk_loss_and_grad(student, teacher, labels, weight, config: KDLossConfig, group, ws: _Workspace):
    """Weighted loss sum of one chunk and its UNWEIGHTED gradient w.r.t. the student chunk.

    `student` and `teacher` are private copies the kernels may overwrite.
    """
    scale = config.divergence_scale
    if config.kind == "ce_kl":
        # CE first: the divergence kernel may overwrite the student chunk.
        ce, ce_grad = _cross_entropy(student, labels, group, ws)
        scale *= 1.0 - config.alpha
        if scale == 0.0:  # alpha = 1: pure cross-entropy, the divergence would be multiplied by 0
            per_token, grad = ce * config.alpha, ce_grad.mul_(config.alpha)
        else:
            per_token, grad = _DIVERGENCES[config.divergence_kind](student, teacher, config, group, ws)
            per_token = per_token * scale + ce * config.alpha
            grad = grad.mul_(scale).add_(ce_grad, alpha=config.alpha)
    else:
        per_token, grad = _DIVERGENCES[config.divergence_kind](student, teacher, config, group, ws)
        if scale != 1.0:
            per_token = per_token * scale
            grad = grad.mul_(scale)
    return (per_token * weight).sum(), grad


def _chunk_size(chunk_tokens, num_tokens: int, vocab_local: int, device: torch.device,
                auto_elements: dict = AUTO_CHUNK_ELEMENTS) -> int:
    if chunk_tokens is None:
        chunk = num_tokens
    elif chunk_tokens == "auto":
        chunk = auto_elements.get(device.type, auto_elements["cuda"]) // vocab_local
    else:
        chunk = chunk_tokens
    return max(1, min(chunk, num_tokens))


class _ChunkedDistillationLoss(torch.autograd.Function):
    """Loss sum over token chunks; the gradient is computed in forward and only scaled in backward.

    Saves nothing but the student-dtype gradient buffer. Backward scales that buffer in place (as
    megatron's vocab_parallel_cross_entropy does), so the graph can be back-propagated once.
    """

    @staticmethod
    def forward(ctx: ParallelContext, student_logits, teacher_logits, labels, token_weight, config, tp_group):
        vocab_local = student_logits.shape[-1]
        student_2d = student_logits.reshape(-1, vocab_local)
        sparse = isinstance(teacher_logits, TopKTargets)  # a cached teacher: [b, s, K] ids / log-probs
        teacher_2d = teacher_logits.reshape_tokens() if sparse else teacher_logits.detach().reshape(-1, vocab_local)
        labels_1d = labels.reshape(-1) if labels is not None else None
        weight_1d = token_weight.reshape(-1)
        compute_dtype = weight_1d.dtype
        num_tokens = student_2d.shape[0]
        chunk = _chunk_size(config.chunk_tokens, num_tokens, vocab_local, student_2d.device)
        ws = _Workspace(chunk, vocab_local, compute_dtype, student_2d.device)
        wants_grad = ctx.needs_input_grad[0]
        grad_buffer = torch.empty_like(student_2d) if wants_grad else None
        total = torch.zeros((), dtype=compute_dtype, device=student_2d.device)
        for start in range(0, num_tokens, chunk):
            rows = slice(start, min(start + chunk, num_tokens))
            n = rows.stop - rows.start
            loss_sum, grad = _chunk_loss_and_grad(
                ws.take("student", n).copy_(student_2d[rows]),  # private compute-dtype copies
                teacher_2d.rows(rows, compute_dtype) if sparse else ws.take("teacher", n).copy_(teacher_2d[rows]),
                labels_1d[rows] if labels_1d is not None else None,
                weight_1d[rows],
                config,
                tp_group,
                ws,
            )
            total += loss_sum
            if wants_grad:  # weight and round to the student's dtype in one pass
                torch.mul(grad, weight_1d[rows].unsqueeze(-1), out=grad_buffer[rows])
            del grad
        ctx.save_for_backward(grad_buffer)
        ctx.student_shape = student_logits.shape
        ctx.backward_done = False
        return total

    @staticmethod
    def backward(ctx: ParallelContext, grad_output):
        _first_backward(ctx, "chunked")
        (grad_buffer,) = ctx.saved_tensors
        grad = grad_buffer.mul_(grad_output).view(ctx.student_shape)
        return grad, None, None, None, None, None


def _first_backward(ctx: ParallelContext, name: str) -> None:
    """A loss whose backward scales its saved gradients in place refuses a second backward."""
    if ctx.backward_done:
        raise RuntimeError(
            f"the {name} distillation loss scales its saved gradients in place and can be "
            "back-propagated only once; recompute the loss instead of using retain_graph."
        )
    ctx.backward_done = True


def _validate_inputs(student_logits, teacher_logits, labels, loss_mask, config, tp_group):
    tp = vp.group_size(tp_group)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        s_vocab, t_vocab = student_logits.shape[-1] * tp, teacher_logits.shape[-1] * tp
        raise ValueError(
            f"student and teacher logits have different vocab sizes: student {s_vocab}, teacher "
            f"{t_vocab} (per-TP-rank shards {student_logits.shape[-1]} vs {teacher_logits.shape[-1]}). "
            "Logit distillation compares distributions over the same token ids, so student and "
            "teacher must share the tokenizer (and the same padded vocab size): build the student "
            "from the teacher's tokenizer/config or pad both output layers to the same vocab."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same [batch, seq, vocab] shape."
        )
    _validate_tokens(student_logits.shape[:-1], student_logits.shape[-1] * tp, labels, loss_mask, config)


def _validate_tokens(token_shape, vocab: int, labels, loss_mask, config: KDLossConfig) -> None:
    """Checks shared with the fused loss: labels / mask shapes, ce_kl's labels, top_k <= vocab."""
    for name, tensor in (("labels", labels), ("loss_mask", loss_mask)):
        if tensor is not None and tensor.shape != token_shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(token_shape)}.")
    if config.kind == "ce_kl" and labels is None:
        raise ValueError("kind='ce_kl' needs labels (already shifted: logits[t] predicts labels[t]).")
    if config.top_k is not None and config.top_k > vocab:
        raise ValueError(f"top_k={config.top_k} exceeds the vocab size {vocab}.")


def _token_weight(token_shape, labels, loss_mask, config: KDLossConfig, dtype, device) -> torch.Tensor:
    """Per-token weight in the compute dtype: loss_mask (1 when None) x (label != ignore_index) for ce_kl."""
    if loss_mask is None:
        token_weight = torch.ones(token_shape, dtype=dtype, device=device)
    else:
        token_weight = loss_mask.to(dtype)
    if config.kind == "ce_kl":
        token_weight = token_weight * (labels != config.ignore_index).to(dtype)
    return token_weight


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    config: KDLossConfig,
    *,
    labels: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
) -> KDLossOutput:
    """Distillation loss between (vocab-parallel) student and teacher logits.

    student_logits, teacher_logits: [b, s, V / TP] -- this rank's contiguous vocab shard (the full
        vocab when `tp_group` is None). Any dtype; computed per chunk in fp32 (fp64 stays fp64).
        The teacher is never differentiated.
    labels: [b, s] int, shifted by the caller (logits[t] predicts labels[t]); needed by ce_kl only.
    loss_mask: [b, s], 1 = counted, 0 = padding/prompt (fractional values act as weights);
        None = every token counts.
    tp_group: the tensor-parallel process group over which the vocab is sharded; None = no TP.
        All ranks of the group must call with the same labels/loss_mask.

    Returns KDLossOutput(loss_sum, num_tokens): the weighted per-token loss summed over counted
    tokens (differentiable w.r.t. student_logits) and the number of counted tokens (no grad).
    """
    _validate_inputs(student_logits, teacher_logits, labels, loss_mask, config, tp_group)
    compute_dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    token_weight = _token_weight(student_logits.shape[:-1], labels, loss_mask, config, compute_dtype,
                                 student_logits.device)
    loss_sum = _ChunkedDistillationLoss.apply(
        student_logits, teacher_logits, labels, token_weight, config, tp_group
    )
    return KDLossOutput(loss_sum, token_weight.sum().detach())


def global_token_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over all counted tokens of all ranks in `group` (e.g. the data-parallel group).

    The value is sum_r loss_sum_r / sum_r num_tokens_r. The gradient on each rank is
    group_size * d(loss_sum_local) / global_num_tokens: after the usual data-parallel gradient
    AVERAGE (megatron DDP / torch DDP), the parameters receive exactly the gradient of the global
    token mean, whatever the per-rank token counts. Sum (sum, count) over micro-batches first and
    call this once per step, or call it per micro-batch with the step's global count.
    `group=None` means a single process: loss_sum / num_tokens.
    """
    world = vp.group_size(group)
    num_tokens = num_tokens.detach().to(loss_sum.dtype)
    if world == 1:
        global_sum, global_count = loss_sum, num_tokens
    else:
        stats = torch.stack([loss_sum.detach(), num_tokens])
        vp.all_reduce_(stats, group)
        local_scaled = loss_sum * world
        global_sum = local_scaled + (stats[0] - local_scaled.detach())
        global_count = stats[1]
    denominator = torch.where(global_count > 0, global_count, torch.ones_like(global_count))
    return global_sum / denominator
