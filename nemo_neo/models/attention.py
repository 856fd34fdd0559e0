"""Core attention for the local (non-Transformer-Engine) layer spec.

megatron-core's local `DotProductAttention` materialises the [b*heads, s, s] score matrix with
baddbmm, a separate softmax and bmm, and repeats K/V for GQA. On CPU (and on GPU without TE) torch's
`scaled_dot_product_attention` does the same maths in one fused kernel (flash / memory-efficient /
math, whichever the backend picks) and handles GQA without copying K/V. Plugged in through the
layer spec, so the rest of the megatron-core layer is untouched.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias need the TE spec.")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron masks are True where attention is NOT allowed; SDPA's bool masks are the opposite.
        mask = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
        )
        # [b, heads, s, d] -> [s, b, heads * d]
        sq, b = context.size(2), context.size(0)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
