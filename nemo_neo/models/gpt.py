"""Build a megatron-core GPTModel (this rank's pipeline stage) from a `GPTArch`.

Layer spec: Transformer Engine's when TE imports (GPU), else megatron-core's local (torch) spec.
On the local spec the core attention is :class:`nemo_neo.models.attention.SDPAttention`, which
runs torch's fused scaled_dot_product_attention instead of megatron's unfused bmm-softmax-bmm.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import GPTArch, UnsupportedConfigError
from nemo_neo.models.attention import SDPAttention


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def check_parallel_fit(arch: GPTArch, tp: int, pp: int, vpp: int = 1) -> None:
    """Shapes that do not split over TP/PP: one clear error before anything is built."""
    problems = []
    if arch.num_query_groups % tp:
        problems.append(f"num_key_value_heads={arch.num_query_groups} is not divisible by TP={tp}")
    if arch.num_attention_heads % tp:
        problems.append(f"num_attention_heads={arch.num_attention_heads} is not divisible by TP={tp}")
    if arch.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={arch.ffn_hidden_size} is not divisible by TP={tp}")
    if arch.vocab_size % tp:
        problems.append(f"vocab_size={arch.vocab_size} is not divisible by TP={tp}")
    if arch.num_layers % (pp * vpp):
        problems.append(f"num_hidden_layers={arch.num_layers} is not divisible by PP={pp}"
                        + (f" x virtual_pipeline={vpp} (one chunk of layers per virtual stage)" if vpp > 1 else ""))
    if problems:
        raise UnsupportedConfigError(
            "model does not fit the parallel layout: " + "; ".join(problems) + ". Choose TP/PP/VPP that divide them."
        )


def shape_kwargs(arch: GPTArch) -> dict:
    """The model's shape in megatron-core TransformerConfig field names (NeMo's GPT configs share them)."""
    return dict(num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
                num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
                kv_channels=arch.head_dim, layernorm_epsilon=arch.norm_eps, add_qkv_bias=arch.qkv_bias)


def transformer_config(arch: GPTArch, tp: int = 1, pp: int = 1, dtype=torch.float32, vpp: int = 1, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_parallel_fit(arch, tp, pp, vpp)
    kwargs = dict(
        **shape_kwargs(arch),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        deallocate_pipeline_outputs=True,
    )
    if vpp > 1:
        # The interleaved schedule's p2p, unbatched and blocking. Batched (megatron's default) posts the
        # send to and the receive from the previous and the next stage in one batch: at PP=2 both are
        # the same peer and the tensors have one shape, and gloo matched an activation with a gradient
        # (measured: wrong logits from the third micro-batch on). Overlapped (Megatron-LM's choice with
        # VPP) also gave a wrong micro-batch here. Unbatched p2p uses two groups at PP=2 and matched.
        kwargs.update(overlap_p2p_comm=False, batch_p2p_comm=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


RECOMPUTE_MODES = ("none", "selective", "full")
# what megatron-core's selective recompute can rebuild in a dense layer of the local or TE spec
SELECTIVE_MODULES = ("core_attn", "mlp", "layernorm")


def recompute_overrides(mode: str = "none", modules=("core_attn",)) -> dict:
    """TransformerConfig settings for activation recomputation (the one place they are spelled).

    none: every layer keeps its activations for backward. selective: megatron-core recomputes the
    named sub-modules of each layer in backward (core_attn: the attention scores/softmax; mlp; layernorm),
    keeping the rest. full: only each layer's input is kept and the whole layer is rebuilt in backward
    (uniform, one layer per checkpoint: the smallest activation memory, ~1/3 more compute)."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute={mode!r}: use one of {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        return {}
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    modules = list(modules or ())
    unknown = [m for m in modules if m not in SELECTIVE_MODULES]
    if not modules or unknown:
        raise ConfigError(f"recompute_modules={modules}: selective recompute needs one or more of "
                                     f"{', '.join(SELECTIVE_MODULES)}")
    return dict(recompute_granularity="selective", recompute_modules=modules)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for megatron-core's local spec, with sequence parallelism allowed.

    megatron's WrappedTorchNorm refuses SP and its fused norm needs apex. RMSNorm is per token, so on
    a sequence shard it computes exactly what it computes on the whole sequence; only its weight's
    gradient is then partial (this rank's tokens): marking the weight `sequence_parallel` makes
    megatron's finalize_model_grads all-reduce it over the TP group, as for its own SP norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def layer_spec(use_te: bool | None = None):
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    return spec


def block_spec(config, use_te: bool | None = None):
    """The decoder block of this pipeline stage: `layer_spec` for each of its layers, and a final
    norm that matches them (megatron-core would pick WrappedTorchNorm for a bare layer spec)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te is None:
        use_te = transformer_engine_available()
    layer = layer_spec(use_te)
    if use_te:
        return layer  # Transformer Engine's block: its own TENorm handles sequence parallelism
    submodules = TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                            layer_norm=SequenceParallelRMSNorm)
    return ModuleSpec(module=TransformerBlock, submodules=submodules)


class BatchMajorOutputLayer:
    """Mixin for megatron-core's output ColumnParallelLinear: compute logits in [b, s, V] memory order.

    GPTModel computes logits as [s, b, V] and then returns `logits.transpose(0, 1).contiguous()`,
    a full extra copy of the largest tensor in the model (400 MB for SmolLM2 at 4 x 512). Running
    the head on the transposed (small) hidden states instead and handing back an [s, b, V] *view*
    of [b, s, V] memory makes that final `.contiguous()` free. Not used with sequence parallelism,
    whose all-gather inside the layer works on the sequence dimension.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        logits, bias = super().forward(input_.transpose(0, 1), weight=weight, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1), bias


@functools.cache
def _gpt_model_class():
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    class NeoGPTModel(GPTModel):
        """megatron-core's GPTModel with a batch-major head (see BatchMajorOutputLayer)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batch_major_head = self.post_process and not self.config.sequence_parallel
            if self.batch_major_head:
                base = type(self.output_layer)
                self.output_layer.__class__ = type(f"BatchMajor{base.__name__}", (BatchMajorOutputLayer, base), {})

        def compute_language_model_loss(self, labels, logits):
            if not self.batch_major_head or self.config.cross_entropy_loss_fusion:
                return super().compute_language_model_loss(labels, logits.contiguous())
            # logits is an [s, b, V] view of [b, s, V] memory: take the loss batch-major, -> [b, s]
            return tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1), labels)

    return NeoGPTModel


def build_gpt(arch: GPTArch, config, pre_process: bool = True, post_process: bool = True, use_te=None,
              vp_stage: int | None = None):
    """The GPTModel for one pipeline stage (pre_process: has embeddings; post_process: has the head;
    vp_stage: its virtual stage under an interleaved pipeline, see `nemo_neo.parallel.chunks`)."""
    rope = arch.rope
    model = _gpt_model_class()(
        config=config,
        transformer_layer_spec=block_spec(config, use_te),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=rope.theta,
        seq_len_interpolation_factor=rope.factor if rope.rope_type == "linear" else None,
        vp_stage=vp_stage,
    )
    if rope.rope_type == "llama3":
        rotary = model.rotary_pos_emb
        rotary.inv_freq = rotary._apply_scaling(
            rotary.inv_freq,
            factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return model
