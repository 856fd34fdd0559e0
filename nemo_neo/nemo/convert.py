"""NeMo 2 checkpoints <-> nemo_neo checkpoints, both directions bit-exact.

A NeMo 2 checkpoint is a directory with ``context/`` (the serialized model object: config class and
fields, tokenizer) and ``weights/`` (a megatron-core distributed checkpoint, torch_dist backend:
layers stacked along a leading dimension, TP/PP-independent global tensors, Transformer Engine
names such as ``self_attention.linear_qkv.layer_norm_weight``). A nemo_neo checkpoint holds the same
megatron-core tensors unstacked in safetensors (see `nemo_neo.checkpoint.native`).

Both directions let megatron-core and NeMo do the format work:
* NeMo -> nemo_neo: the config comes from NeMo's ``io.load_context``; nemo_neo builds the same
  megatron-core GPT (its local layer spec maps its norms to the TE names in ``sharded_state_dict``)
  and ``megatron.core.dist_checkpointing.load`` fills it, as NeMo's own distillation teacher loader does.
* nemo_neo -> NeMo: a NeMo ``ModelConnector`` (the mechanism of NeMo's HF importer) builds the NeMo
  model, the tensors are copied in by name, and NeMo's trainer writes weights and context.
Tensor values are copied, never recomputed, so a round trip returns identical tensors.
"""

from __future__ import annotations

import time
from pathlib import Path

import fiddle as fdl
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from nemo.lightning import io
from torch.distributed.checkpoint import FileSystemReader

from nemo_neo.checkpoint import atomic
from nemo_neo.checkpoint.hf_io import CheckpointError, copy_tokenizer_files, has_tokenizer
from nemo_neo.checkpoint.native import _check_complete, is_neo_checkpoint, local_tensors, save_full_state
from nemo_neo.models.gpt import build_gpt, transformer_config
from nemo_neo.nemo import config as nemo_config
from nemo_neo.parallel import initialize

EMBEDDING_KEY = "module.embedding.word_embeddings.weight"
# Local-spec (nemo_neo) name -> Transformer Engine spec name of the same tensor.
TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def check_nemo_checkpoint(path) -> Path:
    """A NeMo 2 checkpoint directory, or one clear error saying what is missing."""
    path = Path(path)
    if is_neo_checkpoint(path):
        raise CheckpointError(f"{path} is a nemo_neo checkpoint, not a NeMo 2 checkpoint; use neo_to_nemo for it.")
    missing = [d for d in ("context", "weights") if not (path / d).is_dir()]
    if missing:
        raise CheckpointError(
            f"{path} is not a NeMo 2 checkpoint: it has no {' or '.join(d + '/' for d in missing)} directory "
            "(a NeMo 2 checkpoint holds context/ and weights/; .nemo archives and NeMo 1 checkpoints are not supported)."
        )
    return path


def load_nemo_model_context(path):
    """The NeMo model object (config + tokenizer, no weights) stored in a checkpoint's context/.

    On CPU the fused-kernel flags are switched off before the config is built: megatron-core's
    TransformerConfig raises at construction when e.g. apply_rope_fusion has no kernel behind it."""
    spec = io.load_context(check_nemo_checkpoint(path) / "context", subpath="model", build=False)
    if not torch.cuda.is_available():
        for name, value in nemo_config.cpu_overrides().items():
            setattr(spec.config, name, value)
    return fdl.build(spec)


def _stored_embedding(path):
    meta = FileSystemReader(str(Path(path) / "weights")).read_metadata().state_dict_metadata
    if EMBEDDING_KEY not in meta:
        raise CheckpointError(f"{path}/weights has no {EMBEDDING_KEY}: not a GPT checkpoint saved from the first stage.")
    return meta[EMBEDDING_KEY]


def nemo_vocab_size(path) -> int:
    """Rows of the stored embedding: NeMo may have padded the tokenizer's vocabulary."""
    return int(_stored_embedding(path).size[0])


def nemo_arch(path):
    """(GPTArch, NeMo model object from context/) of a NeMo 2 checkpoint; raises UnsupportedNemoModelError."""
    model = load_nemo_model_context(path)
    return nemo_config.arch_from_nemo_config(model.config, nemo_vocab_size(path)), model


def load_nemo_weights_into(model: torch.nn.Module, ckpt_path) -> dict:
    """Fill a megatron-core GPT from a NeMo 2 checkpoint's weights/ (any TP/PP it was saved with) with
    megatron-core's own reader; returns the sharded state dict it read (key -> ShardedTensor)."""
    weights = str(check_nemo_checkpoint(ckpt_path) / "weights")
    metadata = dist_checkpointing.load_content_metadata(weights)
    sharded = model.sharded_state_dict(prefix="module.", metadata=metadata)
    # TE and local layers keep different per-layer extra state (FP8 metadata); it holds no weights.
    sharded = {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}
    try:
        loaded = dist_checkpointing.load(sharded, weights, strict=StrictHandling.RAISE_UNEXPECTED)
    except Exception as e:  # megatron-core raises CheckpointingException / KeyError / RuntimeError
        raise CheckpointError(f"cannot read the weights of {ckpt_path} into this model (shapes from its config): {e}") from None
    missing, _ = model.load_state_dict({k.removeprefix("module."): v for k, v in loaded.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_path} did not fill {missing[:3]}")
    return sharded


def load_nemo_weights(path, arch) -> dict[str, torch.Tensor]:
    """Every tensor of a NeMo 2 checkpoint, unsharded, with nemo_neo names (single process)."""
    initialize()  # megatron-core's parallel state (a world of one); reused when NeMo already set it up
    dtype = _stored_embedding(path).properties.dtype  # read the stored values as they are: no cast
    with torch.device("cpu"):
        model = build_gpt(arch, transformer_config(arch, dtype=dtype), use_te=False)
    sharded = load_nemo_weights_into(model, path)
    # megatron's local norms are fp32 whatever the model dtype; hand back each tensor in its stored dtype.
    stored = FileSystemReader(str(Path(path) / "weights")).read_metadata().state_dict_metadata
    dtypes = {k.removeprefix("module."): stored[v.key].properties.dtype for k, v in sharded.items() if v.key in stored}
    return {name: t.to(dtypes.get(name, t.dtype)) for name, t in local_tensors(model, arch).items()}


def nemo_to_neo(nemo_ckpt, out, overwrite: bool = False) -> dict:
    """NeMo 2 checkpoint -> nemo_neo checkpoint (tokenizer files copied when the context has them)."""
    start = time.perf_counter()
    atomic.check_output_dir(out, overwrite)
    arch, model = nemo_arch(nemo_ckpt)
    state = load_nemo_weights(nemo_ckpt, arch)
    tokenizer_dir = _tokenizer_dir(Path(nemo_ckpt), model)
    save_tokenizer = (lambda dst: copy_tokenizer_files(tokenizer_dir, dst)) if tokenizer_dir else None
    save_full_state(out, arch, state, save_tokenizer, metadata={"source": str(nemo_ckpt), "format": "nemo2"},
                    overwrite=overwrite)
    return {"seconds": time.perf_counter() - start, "parameters": arch.num_parameters(), "out": str(out)}


def _tokenizer_dir(ckpt: Path, model) -> Path | None:
    """The HF tokenizer files NeMo keeps in context/ (AutoTokenizer), if any: in nemo_tokenizer/, or
    in the artifact directory the loaded HF tokenizer was read from (NeMo copies a tokenizer that came
    from a local directory, e.g. through `neo_to_nemo`, to context/<its name>)."""
    tokenizer = getattr(model, "tokenizer", None)
    loaded_from = getattr(getattr(tokenizer, "tokenizer", None), "name_or_path", None)
    for candidate in (ckpt / "context" / "nemo_tokenizer", loaded_from, getattr(tokenizer, "model_path", None)):
        if candidate and has_tokenizer(candidate):
            return Path(candidate)
    return None


def copy_neo_state_into(module: torch.nn.Module, arch, state: dict[str, torch.Tensor]) -> None:
    """Copy a full nemo_neo state into a (TP=PP=1) megatron-core GPT, local or TE layer spec."""
    _check_complete(arch, {k: {"shape": list(v.shape)} for k, v in state.items()}, "nemo_neo state")
    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in state.items():
            target_name = name
            if name not in targets:  # TE spec: the norms live inside the following linear layer
                target_name = next((name.replace(k, v) for k, v in TE_ALIASES.items() if name.endswith(k)), name)
            if target_name not in targets:
                raise CheckpointError(f"the NeMo model has no tensor for {name} (looked for {target_name}).")
            target = targets[target_name]
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"{name}: NeMo model expects {tuple(target.shape)}, checkpoint has {tuple(value.shape)}.")
            # The stored dtype travels as is (megatron's local norms would otherwise turn bf16 into fp32).
            target.data = value.detach().clone()
        if arch.tie_embeddings and "output_layer.weight" in targets:  # a tied head keeps its own copy
            targets["output_layer.weight"].data = state["embedding.word_embeddings.weight"].detach().clone()


def load_nemo_module(nemo_ckpt, transformer_layer_spec=None):
    """The megatron-core GPT of a NeMo 2 checkpoint, built by NeMo's own config (``configure_model``)
    and filled by megatron-core, as NeMo loads a distillation teacher. On CPU the fused-kernel flags
    are turned off first. `transformer_layer_spec` replaces the config's (e.g. `models.neo_layer_spec`)."""
    initialize()
    model = load_nemo_model_context(nemo_ckpt)
    cfg = model.config
    if not torch.cuda.is_available():
        nemo_config.apply_cpu_overrides(cfg)
    if transformer_layer_spec is not None:
        cfg.transformer_layer_spec = transformer_layer_spec
    module = cfg.configure_model(model.tokenizer)
    load_nemo_weights_into(module, nemo_ckpt)
    return module.eval()
