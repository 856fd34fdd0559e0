"""LoRA adapters on megatron-core's tensor-parallel linear layers (and the MoSLoRA variant).

    y = W x + (alpha / r) * B M A dropout(x)          (M = identity for LoRA, a trainable r x r
                                                        mixer for MoSLoRA)

Tensor parallelism follows the base layer's split so that no full weight is ever gathered:
  column-parallel base (linear_qkv, linear_fc1; output split over TP):
      A [r, in] replicated, B [out/TP, r] split by output. The low-rank activation A x is the same
      on every rank; it enters the split B through `copy_to_tensor_model_parallel_region`
      (identity forward, all-reduce backward), so A, M and x receive the full gradient.
  row-parallel base (linear_proj, linear_fc2; input split over TP):
      A [r, in/TP] split by input, B [out, r] replicated. The partial A x of each rank is summed
      with `reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward).
Under sequence parallelism the base layers gather / scatter the sequence themselves, and the adapter
does the same on its r-wide activation, which is cheap:
  column-parallel: x is this rank's sequence shard; A x is gathered over the sequence
      (`gather_from_sequence_parallel_region`: all-gather forward, reduce-scatter backward) before B.
      A and M see this rank's tokens only, so their gradients are partial: marked `sequence_parallel`
      for finalize_model_grads to all-reduce them over TP (as megatron does for its SP norms).
  row-parallel: the partial A x of the full sequence is reduce-scattered to this rank's shard
      (`reduce_scatter_to_sequence_parallel_region`), matching the base output; B and M, replicated,
      see the shard's tokens only and are marked `sequence_parallel` likewise.
For the fused qkv projection the adapter may cover only some of q, k, v (KD-LoRA and the LoRA paper
use q and v): B then has rows for those parts only and its output is scattered into them.
SwiGLU fc1 ([gate; up] on every rank) gets a B with rows [gate_local; up_local], like the weight.
"""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from nemo_neo.parallel.state import ParallelContext


def qkv_part_rows(config, parts: tuple[str, ...], tp: int) -> torch.Tensor:
    """Row indices (within this rank's linear_qkv output) of the chosen parts, group by group."""
    groups = config.num_query_groups // tp
    hpg = config.num_attention_heads // config.num_query_groups
    d = config.kv_channels
    spans = {"q": (0, hpg * d), "k": (hpg * d, (hpg + 1) * d), "v": ((hpg + 1) * d, (hpg + 2) * d)}
    per_group = (hpg + 2) * d
    rows = [g * per_group + j for g in range(groups) for part in ("q", "k", "v") if part in parts for j in range(*spans[part])]
    return torch.tensor(rows, dtype=torch.long)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The residual stream's gradients arrive in [b, s, h] memory order (the batch-major logits head
    transposes the hidden states), i.e. as non-contiguous [s, b, h] views. For a trainable weight
    megatron's matmul folds such a gradient into one mm (copying it), but for a frozen one
    (`linear_with_frozen_weight`) torch.matmul cannot fold it and runs a bmm over s batches of
    [b, h] x [h, in] with the weight broadcast: ~4x slower for linear_proj / linear_fc2 on CPU
    (profiled: 1.6 s of a 6.5 s LoRA step). One copy of the gradient here avoids that."""

    @staticmethod
    def forward(ctx: ParallelContext, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx: ParallelContext, grad):
        return grad.contiguous()


class LoRALinear(torch.nn.Module):
    """Wraps a megatron ColumnParallelLinear / RowParallelLinear; frozen base + trainable adapter."""

    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 mixer: bool = False, out_rows: torch.Tensor | None = None, tp: int = 1):
        super().__init__()
        self.base = base
        self.row_parallel = isinstance(base, RowParallelLinear)
        if not self.row_parallel and not isinstance(base, ColumnParallelLinear):
            raise TypeError(f"LoRA wraps megatron Column/RowParallelLinear, not {type(base).__name__}")
        out_local, in_local = base.weight.shape
        in_full = in_local * tp if self.row_parallel else in_local
        if rank <= 0 or rank > min(in_full, out_local * (1 if self.row_parallel else tp)):
            raise ValueError(
                f"LoRA rank={rank} must be > 0 and <= min(in, out) = {min(in_full, out_local * (1 if self.row_parallel else tp))} "
                f"of this layer ({in_full} -> {out_local * (1 if self.row_parallel else tp)})"
            )
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # on the base layer's device: index_copy in forward needs the index where the output is (CUDA)
        if out_rows is not None:
            out_rows = out_rows.to(base.weight.device)
        self.register_buffer("out_rows", out_rows, persistent=False)
        out_adapter = out_local if out_rows is None else len(out_rows)
        dtype, device = base.weight.dtype, base.weight.device
        # A: kaiming-uniform as in the LoRA reference code; B = 0 so training starts at the base model.
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_local, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_adapter, rank, dtype=dtype, device=device))
        self.lora_M = torch.nn.Parameter(torch.empty(rank, rank, dtype=dtype, device=device)) if mixer else None
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        if self.sequence_parallel:  # the parameters that see only this rank's tokens (see the module doc)
            for p in ((self.lora_B, self.lora_M) if self.row_parallel else (self.lora_A, self.lora_M)):
                if p is not None:
                    p.sequence_parallel = True
        self.reset_parameters()
        for p in base.parameters():
            p.requires_grad_(False)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.lora_A.shape[1] * (1 if not self.row_parallel else 1))
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()
            if self.lora_M is not None:  # MoSLoRA: the mixer starts orthogonal-ish, A and B as in LoRA
                self.lora_M.uniform_(-1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank), generator=generator)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """M A dropout(x), [..., r]: complete (TP-reduced) and the same on every rank."""
        h = torch.nn.functional.linear(self.dropout(x), self.lora_A)
        if self.row_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel else \
                reduce_from_tensor_model_parallel_region(h)
        if self.lora_M is not None:
            h = torch.nn.functional.linear(h, self.lora_M)
        if not self.row_parallel:
            h = gather_from_sequence_parallel_region(h) if self.sequence_parallel else \
                copy_to_tensor_model_parallel_region(h)
        return h

    def forward(self, x, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        if not self.base.weight.requires_grad:
            out = _ContiguousGrad.apply(out)
        h = self.adapter_input(x)
        if self.out_rows is None:
            # out + scale * h B^T in one addmm: no [tokens, out] temporaries for the product and its
            # scaling (the adapter's share of a LoRA step's elementwise traffic, and two kernels less)
            fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.rank), self.lora_B.t(), alpha=self.scale)
            return fused.view(out.shape), bias
        delta = torch.nn.functional.linear(h * self.scale, self.lora_B)
        return out + torch.zeros_like(out).index_copy(-1, self.out_rows, delta), bias

    def delta_weight(self) -> torch.Tensor:
        """scale * B M A in the base weight's local shape (rows outside `out_rows` are 0)."""
        mixed = self.lora_A if self.lora_M is None else self.lora_M @ self.lora_A
        delta = self.scale * (self.lora_B @ mixed)
        if self.out_rows is None:
            return delta
        full = torch.zeros_like(self.base.weight)
        full[self.out_rows] = delta
        return full

    @torch.no_grad()
    def merged_base(self) -> torch.nn.Module:
        """The base layer with the adapter folded into its weight (for export)."""
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        return self.base
