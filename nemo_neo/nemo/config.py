"""NeMo 2 model configs <-> nemo_neo's `GPTArch`.

A NeMo ``GPTConfig`` is a megatron-core ``TransformerConfig`` plus model-level fields; nemo_neo
describes a model as a Hugging Face Llama-family config (`GPTArch`). The translation goes through
that HF dict, so every check nemo_neo applies to HF models (RoPE type, GQA divisibility, ...)
applies to NeMo models too. Anything nemo_neo's GPT cannot reproduce exactly raises
:class:`UnsupportedNemoModelError` naming the field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_neo.models.arch import GPTArch, UnsupportedConfigError, arch_from_hf_config
from nemo_neo.models.gpt import shape_kwargs


class UnsupportedNemoModelError(UnsupportedConfigError):
    """The NeMo model is not a Llama-family decoder nemo_neo can express."""


def _dtype_name(cfg) -> str:
    if getattr(cfg, "bf16", False):
        return "bfloat16"
    if getattr(cfg, "fp16", False):
        return "float16"
    return str(getattr(cfg, "params_dtype", torch.float32)).removeprefix("torch.")


def _unsupported_fields(cfg) -> list[str]:
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    problems = []
    checks = [
        ("normalization", cfg.normalization == "RMSNorm", "RMSNorm"),
        ("gated_linear_unit", cfg.gated_linear_unit, "True (SwiGLU)"),
        ("activation_func", cfg.activation_func is F.silu, "torch.nn.functional.silu"),
        ("add_bias_linear", not cfg.add_bias_linear, "False"),
        ("position_embedding_type", cfg.position_embedding_type == "rope", "'rope'"),
        ("rotary_percent", cfg.rotary_percent == 1.0, "1.0"),
        ("rotary_interleaved", not getattr(cfg, "rotary_interleaved", False), "False"),
        ("qk_layernorm", not getattr(cfg, "qk_layernorm", False), "False"),
        ("num_moe_experts", not getattr(cfg, "num_moe_experts", None), "None (dense MLP)"),
        ("layernorm_zero_centered_gamma", not getattr(cfg, "layernorm_zero_centered_gamma", False), "False"),
        ("mtp_num_layers", not getattr(cfg, "mtp_num_layers", None), "None"),
        ("multi_latent_attention", not getattr(cfg, "multi_latent_attention", False), "False"),
    ]
    for name, ok, wanted in checks:
        if not ok:
            problems.append(f"{name}={getattr(cfg, name, None)!r} (nemo_neo needs {wanted})")
    # A config class whose configure_model changes the built model (Gemma's embedding scaling,
    # Llama 4's chunked attention, ...) describes something the fields above do not capture.
    known = (llm.GPTConfig.configure_model, Llama31Config.configure_model)
    if type(cfg).configure_model not in known:
        problems.append(f"config class {type(cfg).__name__} builds its model in its own way")
    return problems


def hf_config_from_nemo(cfg, vocab_size: int) -> dict:
    """The HF config dict (Llama, or Qwen2 when q/k/v have biases) describing a NeMo GPTConfig."""
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    problems = _unsupported_fields(cfg)
    if problems:
        raise UnsupportedNemoModelError(
            f"unsupported NeMo model ({type(cfg).__name__}): " + "; ".join(problems) + ". nemo_neo converts "
            "Llama-family decoders (RMSNorm, SwiGLU, RoPE, no linear biases except q/k/v)."
        )
    heads = cfg.num_attention_heads
    rope: dict = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if isinstance(cfg, Llama31Config):
        rope = {"rope_type": "llama3", "rope_theta": float(cfg.rotary_base), "factor": float(cfg.scale_factor),
                "low_freq_factor": float(cfg.low_freq_factor), "high_freq_factor": float(cfg.high_freq_factor),
                "original_max_position_embeddings": int(cfg.old_context_len)}
    elif cfg.seq_len_interpolation_factor:
        rope = {"rope_type": "linear", "rope_theta": float(cfg.rotary_base), "factor": float(cfg.seq_len_interpolation_factor)}
    qkv_bias = bool(cfg.add_qkv_bias)
    hf = dict(
        model_type="qwen2" if qkv_bias else "llama",
        architectures=["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"],
        vocab_size=int(vocab_size),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.num_query_groups or heads,
        head_dim=cfg.kv_channels or cfg.hidden_size // heads,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=float(cfg.layernorm_epsilon),
        tie_word_embeddings=bool(cfg.share_embeddings_and_output_weights),
        hidden_act="silu",
        rope_theta=rope["rope_theta"],
        rope_scaling=None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        torch_dtype=_dtype_name(cfg),
    )
    if qkv_bias:
        hf["use_sliding_window"] = False
    return hf


def arch_from_nemo_config(cfg, vocab_size: int) -> GPTArch:
    return arch_from_hf_config(hf_config_from_nemo(cfg, vocab_size))


def nemo_config_from_arch(arch: GPTArch, dtype: torch.dtype = torch.float32, **overrides):
    """A NeMo LlamaConfig (Llama31Config for llama3 RoPE) building the same model as `arch`.

    ``vocab_size`` is set explicitly, so NeMo does not pad the vocabulary and the embedding keeps
    nemo_neo's shape. Fusion flags keep NeMo's defaults (right on GPU); `cpu_overrides()` lists what
    a CPU run must turn off."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    rope = arch.rope
    kwargs = dict(
        **shape_kwargs(arch),
        rotary_base=rope.theta,
        seq_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        vocab_size=arch.vocab_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        autocast_dtype=dtype,
    )
    if rope.rope_type == "linear":
        kwargs["seq_len_interpolation_factor"] = rope.factor
    if rope.rope_type == "llama3":
        kwargs.update(scale_factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                      high_freq_factor=rope.high_freq_factor, old_context_len=rope.original_max_position_embeddings)
        return Llama31Config(**{**kwargs, **overrides})
    return llm.LlamaConfig(**{**kwargs, **overrides})


def cpu_overrides() -> dict:
    """Config fields a CPU run needs: the fused kernels behind these flags exist only with
    Transformer Engine / apex / CUDA, and GPU initialization forks megatron's CUDA RNG tracker."""
    return dict(
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def apply_cpu_overrides(cfg) -> None:
    for name, value in cpu_overrides().items():
        setattr(cfg, name, value)
