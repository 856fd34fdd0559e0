"""Read Hugging Face checkpoints (directory of safetensors, or a GGUF file) and write HF directories."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nemo_neo.errors import CheckpointError
from nemo_neo.models.arch import GPTArch, arch_from_hf_config

# Files that travel with a model so that AutoTokenizer / generation work on the output.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
MAX_SHARD_BYTES = 4 * 1024**3


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt ({e}). Re-download or re-export it."
        ) from None


def read_hf_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; point --hf at a Hugging Face model directory or a .gguf file.")
    return json.loads(config_file.read_text()), read_hf_weights(path)


def read_hf_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors (one file or an index of shards)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{path} has no model.safetensors (or index); only safetensors checkpoints are read. "
            "Re-save the model with save_pretrained(safe_serialization=True)."
        )
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name} is listed in the index but missing; the download is incomplete.")
        state.update(_load_safetensors(path / name))
    return state


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    """Dequantize a GGUF file with transformers (slow: ~37 s for SmolLM2-135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("transformers_version", None)
    config.pop("dtype", None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return config, state, tokenizer


def read_hf(path: str | os.PathLike) -> tuple[GPTArch, dict[str, torch.Tensor], callable]:
    """Returns (architecture, HF state dict, save_tokenizer(dst_dir))."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        config, state, tokenizer = read_gguf(path)
        save_tokenizer = lambda dst: tokenizer.save_pretrained(str(dst))  # noqa: E731
    elif path.is_dir():
        config, state = read_hf_dir(path)
        save_tokenizer = lambda dst: copy_tokenizer_files(path, dst)  # noqa: E731
    else:
        raise CheckpointError(f"{path} is neither a Hugging Face model directory nor a .gguf file.")
    arch = arch_from_hf_config(config)
    if arch.tie_embeddings:
        state.pop("lm_head.weight", None)
    return arch, state, save_tokenizer


def tokenizer_digest(ckpt) -> str | None:
    """sha256 (hex) of a checkpoint's tokenizer.json; None when there is no checkpoint or no such file."""
    path = Path(ckpt) / "tokenizer.json" if ckpt else None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None


def copy_tokenizer_files(src: Path, dst: Path, overwrite: bool = True) -> list[str]:
    """Copy the tokenizer files of `src` into `dst` (keeping those `dst` has when not `overwrite`)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and (overwrite or not (Path(dst) / name).exists()):
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def write_hf_dir(tmp: Path, arch: GPTArch, hf_state: dict[str, torch.Tensor]) -> None:
    """Write config.json and (sharded if large) model safetensors into `tmp`."""
    (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2, sort_keys=True) + "\n")
    shards, current, size = [], {}, 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
