"""Tensor-name and layout mapping between Hugging Face Llama-family and nemo_neo (megatron-core).

The nemo_neo ("neo") naming is megatron-core's local-spec state dict with *global* layer numbers
and *unsharded* tensors. The only non-trivial layout is attention: megatron-core fuses q, k and v
into one `linear_qkv` whose rows are grouped by query group,
    [ g0: q heads of group 0 | k0 | v0 | g1: q heads of group 1 | k1 | v1 | ... ],
so that a contiguous TP slice of the rows holds whole groups. Every mapping is a pure reshape /
concatenation, so a round trip is bit-exact.
"""

from __future__ import annotations

import torch

from nemo_neo.models.arch import GPTArch

_LAYER_MAP = {  # neo suffix -> HF suffix, for the tensors that map one to one
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: GPTArch) -> torch.Tensor:
    """HF q/k/v (weights [out, in] or biases [out]) -> megatron-core's grouped linear_qkv."""
    g, d, hpg = arch.num_query_groups, arch.head_dim, arch.heads_per_group
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(g, hpg * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1)
    return fused.reshape(g * (hpg + 2) * d, *tail)


def split_qkv(qkv: torch.Tensor, arch: GPTArch):
    g, d, hpg = arch.num_query_groups, arch.head_dim, arch.heads_per_group
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(g, (hpg + 2) * d, *tail).split([hpg * d, d, d], dim=1)
    return q.reshape(g * hpg * d, *tail), k.reshape(g * d, *tail), v.reshape(g * d, *tail)


def hf_to_neo(hf: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    neo = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(arch.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for neo_suffix, hf_suffix in _LAYER_MAP.items():
            neo[dst + neo_suffix] = hf[src + hf_suffix]
        attn = src + "self_attn."
        neo[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], arch
        )
        if arch.qkv_bias:
            neo[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], arch
            )
        # megatron-core's SwiGLU fc1 is [gate; up] stacked along the output dimension.
        neo[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0
        )
    neo["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not arch.tie_embeddings:
        neo["output_layer.weight"] = hf["lm_head.weight"]
    return neo


def neo_to_hf(neo: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    hf = {"model.embed_tokens.weight": neo["embedding.word_embeddings.weight"]}
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for neo_suffix, hf_suffix in _LAYER_MAP.items():
            hf[dst + hf_suffix] = neo[src + neo_suffix]
        attn = dst + "self_attn."
        q, k, v = split_qkv(neo[src + "self_attention.linear_qkv.weight"], arch)
        hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"] = q, k, v
        if arch.qkv_bias:
            q, k, v = split_qkv(neo[src + "self_attention.linear_qkv.bias"], arch)
            hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"] = q, k, v
        gate, up = neo[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"] = gate, up
    hf["model.norm.weight"] = neo["decoder.final_layernorm.weight"]
    if not arch.tie_embeddings:
        hf["lm_head.weight"] = neo["output_layer.weight"]
    return {k: v.contiguous() for k, v in hf.items()}


def expected_neo_shapes(arch: GPTArch) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor a checkpoint of `arch` must hold."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    shapes = {"embedding.word_embeddings.weight": (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv, h)
        if arch.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv,)
        shapes[p + "self_attention.linear_proj.weight"] = (h, arch.num_attention_heads * d)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.linear_fc1.weight"] = (2 * f, h)
        shapes[p + "mlp.linear_fc2.weight"] = (h, f)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if not arch.tie_embeddings:
        shapes["output_layer.weight"] = (arch.vocab_size, h)
    return shapes
