"""A Hugging Face Llama-family config, read into the architecture megatron-core can build.

`GPTArch` is the one description of a model's shape in nemo_neo: the converter, the model builder
and (later) pruning all read it. It is created from a HF ``config.json`` dict and keeps that dict,
so converting back to HF writes the same config. Anything megatron-core's GPT cannot express
exactly raises :class:`UnsupportedConfigError` naming the field and what to do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from nemo_neo.errors import UnsupportedModelError

# model_type -> HF class we convert to/from. Qwen2 is a Llama with biases on q/k/v.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(UnsupportedModelError):
    """The HF config describes something nemo_neo's megatron-core GPT cannot express."""


@dataclass
class RopeSpec:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class GPTArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_embeddings: bool
    qkv_bias: bool = False
    hf_config: dict = field(default_factory=dict, repr=False)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the full (unsharded) model, from shapes alone."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * d
        per_layer = h * qkv_out + self.num_attention_heads * d * h + 3 * h * f + 2 * h
        if self.qkv_bias:
            per_layer += qkv_out
        total = self.num_layers * per_layer + h  # + final norm
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def to_hf_config(self) -> dict:
        """The HF config.json dict for this architecture (the source dict with shapes updated)."""
        cfg = copy.deepcopy(self.hf_config)
        cfg.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
        )
        # Keys a source config may leave implicit are written only when needed, so an unchanged
        # model converts back to the identical config.
        if "num_key_value_heads" in cfg or self.num_query_groups != self.num_attention_heads:
            cfg["num_key_value_heads"] = self.num_query_groups
        if "head_dim" in cfg or self.head_dim != self.hidden_size // self.num_attention_heads:
            cfg["head_dim"] = self.head_dim
        return cfg


def _rope_spec(cfg: dict) -> RopeSpec:
    # transformers 5 writes `rope_parameters`; 4.x configs have rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "convert a model that uses default, linear or llama3 RoPE."
        )
    spec = RopeSpec(theta=float(theta), rope_type=rope_type)
    if rope_type in ("linear", "llama3"):
        spec.factor = float(scaling["factor"])
    if rope_type == "llama3":
        spec.low_freq_factor = float(scaling["low_freq_factor"])
        spec.high_freq_factor = float(scaling["high_freq_factor"])
        spec.original_max_position_embeddings = int(scaling["original_max_position_embeddings"])
    return spec


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UnsupportedConfigError(message)


def arch_from_hf_config(cfg: dict) -> GPTArch:
    """Validate a HF config dict and translate it. Raises UnsupportedConfigError."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    _require(
        model_type in SUPPORTED_MODEL_TYPES,
        f"unknown architecture: model_type={model_type!r} (architectures={archs}); nemo_neo converts "
        f"Llama-family decoders: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}.",
    )
    act = cfg.get("hidden_act", "silu")
    _require(act == "silu", f"hidden_act={act!r} cannot be expressed: nemo_neo's GPT uses SwiGLU (silu).")
    _require(not cfg.get("mlp_bias", False), "mlp_bias=true cannot be expressed: MLP linears have no bias.")
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    _require(
        model_type == "qwen2" or not cfg.get("attention_bias", False),
        "attention_bias=true on a Llama config biases o_proj too, which megatron-core's GPT cannot "
        "express (only q/k/v biases, as in Qwen2).",
    )
    window = cfg.get("sliding_window")
    if model_type in ("mistral", "qwen2") and window is not None and cfg.get("use_sliding_window", True):
        _require(
            window >= cfg["max_position_embeddings"],
            f"sliding_window={window} < max_position_embeddings={cfg['max_position_embeddings']}: "
            "sliding-window attention is not supported; use a config with sliding_window=null.",
        )
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    _require(heads % groups == 0, f"num_attention_heads={heads} is not divisible by num_key_value_heads={groups}.")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tie = cfg.get("tie_word_embeddings", False)  # False is the default of all three HF classes
    clean = {k: v for k, v in cfg.items() if k not in ("quantization_config", "_name_or_path")}
    clean.setdefault("architectures", [SUPPORTED_MODEL_TYPES[model_type]])
    if not clean["architectures"]:
        clean["architectures"] = [SUPPORTED_MODEL_TYPES[model_type]]
    return GPTArch(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_spec(cfg),
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_embeddings=bool(tie),
        qkv_bias=qkv_bias,
        hf_config=clean,
    )


def transformers_config(hf_config: dict):
    """A transformers config object for an HF config.json dict (to build the model, e.g. on the meta
    device or with random weights)."""
    from transformers import AutoConfig

    cfg = dict(hf_config)
    return AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
