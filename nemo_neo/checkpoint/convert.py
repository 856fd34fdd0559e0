"""Hugging Face <-> nemo_neo checkpoint conversion (single process; no model is built)."""

from __future__ import annotations

import time
from pathlib import Path

from nemo_neo.checkpoint import atomic
from nemo_neo.checkpoint.hf_io import CheckpointError, copy_tokenizer_files, has_tokenizer, read_hf, write_hf_dir
from nemo_neo.checkpoint.hf_mapping import expected_neo_shapes, hf_to_neo, neo_to_hf
from nemo_neo.checkpoint.native import load_full_state, save_full_state
from nemo_neo.models.gpt import check_parallel_fit


def convert_hf_to_neo(hf_path, out, tp: int = 1, pp: int = 1, overwrite: bool = False) -> dict:
    """HF directory or GGUF file -> nemo_neo checkpoint. `tp`/`pp` are checked against the model
    (the format itself is layout-free: any TP/PP can load it)."""
    start = time.perf_counter()
    atomic.check_output_dir(out, overwrite)  # fail before the (possibly slow) read
    arch, hf_state, save_tokenizer = read_hf(hf_path)
    check_parallel_fit(arch, tp, pp)
    missing = [k for k in _required_hf_names(arch) if k not in hf_state]
    if missing:
        raise CheckpointError(f"{hf_path} lacks {len(missing)} tensors its config needs (e.g. {missing[:3]}).")
    neo = hf_to_neo(hf_state, arch)
    save_full_state(out, arch, neo, save_tokenizer, metadata={"source": str(hf_path), "intended_layout": {"tp": tp, "pp": pp}}, overwrite=overwrite)
    return {"seconds": time.perf_counter() - start, "parameters": arch.num_parameters(), "out": str(out)}


def _required_hf_names(arch) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if arch.tie_embeddings else ["lm_head.weight"])
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                                  "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
        if arch.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    assert len(expected_neo_shapes(arch)) <= len(names)
    return names


def convert_neo_to_hf(ckpt, out, overwrite: bool = False, dtype=None) -> dict:
    """nemo_neo checkpoint -> HF directory that transformers.AutoModelForCausalLM loads."""
    start = time.perf_counter()
    atomic.check_output_dir(out, overwrite)
    arch, neo, _ = load_full_state(ckpt)
    hf_state = neo_to_hf(neo, arch)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    with atomic.atomic_directory(out, overwrite) as tmp:
        write_hf_dir(tmp, arch, hf_state)
        copy_tokenizer_files(Path(ckpt), tmp)
    return {"seconds": time.perf_counter() - start, "has_tokenizer": has_tokenizer(out), "out": str(out)}
