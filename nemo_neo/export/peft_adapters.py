"""Export nemo_neo LoRA / MoSLoRA adapters in peft's format, for the HF export of the base model.

`peft.PeftModel.from_pretrained(<HF base>, out)` loads the result and gives the same logits as the
nemo_neo model with its adapters (tests/peft/test_reference_lora.py).

How megatron's fused layers map onto peft's per-projection adapters
------------------------------------------------------------------
nemo_neo puts one adapter on each megatron linear: linear_qkv (q, k, v fused, rows grouped by query
group), linear_fc1 ([gate; up] stacked), linear_proj, linear_fc2. Its delta is
    dW = (alpha / r) * B M A        (M = identity for LoRA; B has rows for the covered parts only)
A fused adapter has ONE A shared by its parts, and each part's delta is (alpha / r) B_part M A.
That is exactly a set of per-projection peft adapters with A duplicated:
    q_proj / k_proj / v_proj:  lora_A = A,  lora_B = the part's rows of B (ungrouped by
                               `split_qkv`, the same reordering as the base weight);
    gate_proj / up_proj:       lora_A = A,  lora_B = the gate / up half of B;
    o_proj, down_proj:         lora_A = A,  lora_B = B.
Parts outside `qkv_parts` get no adapter. The same r and lora_alpha keep peft's scale alpha / r.
The export is exact for inference (and for further training in peft, which then lets the copies
of A drift apart: peft has no tied-A adapter). MoSLoRA's mixer is folded into B (B' = B M):
peft has no mixer, and B' A is the same delta; the export of a MoSLoRA adapter is therefore a plain
LoRA of the same rank (the r x r mixer stops being a separate parameter).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_neo.checkpoint import atomic
from nemo_neo.checkpoint.hf_mapping import split_qkv
from nemo_neo.checkpoint.native import read_index
from nemo_neo.errors import UserError
from nemo_neo.models.arch import GPTArch

# megatron linear -> (HF module path inside a decoder layer, HF projections it covers)
_MODULES = {
    "self_attention.linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("self_attn", ("o_proj",)),
    "mlp.linear_fc1": ("mlp", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("mlp", ("down_proj",)),
}
_PREFIX = "base_model.model.model.layers"  # peft's key prefix for a *ForCausalLM base model


class PeftExportError(UserError, ValueError):
    """The adapters cannot be exported as asked (one line: the problem and the fix)."""


def qkv_rows(arch: GPTArch, parts) -> torch.Tensor:
    """Rows of the full (TP=1) fused linear_qkv that an adapter on `parts` covers, in B's order."""
    d, hpg = arch.head_dim, arch.heads_per_group
    spans = {"q": (0, hpg * d), "k": (hpg * d, (hpg + 1) * d), "v": ((hpg + 1) * d, (hpg + 2) * d)}
    per_group = (hpg + 2) * d
    return torch.tensor([g * per_group + j for g in range(arch.num_query_groups)
                         for part in "qkv" if part in parts for j in range(*spans[part])], dtype=torch.long)


def _io_sizes(arch: GPTArch, module: str) -> tuple[int, int | None]:
    """(input features, output rows of B) of a megatron linear; None = checked per qkv part."""
    attn = arch.num_attention_heads * arch.head_dim
    return {"self_attention.linear_qkv": (arch.hidden_size, None), "self_attention.linear_proj": (attn, arch.hidden_size),
            "mlp.linear_fc1": (arch.hidden_size, 2 * arch.ffn_hidden_size),
            "mlp.linear_fc2": (arch.ffn_hidden_size, arch.hidden_size)}[module]


def to_peft_state(adapters: dict[str, torch.Tensor], arch: GPTArch, qkv_parts) -> tuple[dict, list[str]]:
    """nemo_neo adapter tensors (full, global names as `save_adapters` writes them) -> (peft
    state dict, HF target module names)."""
    state, targets = {}, set()
    for i in range(arch.num_layers):
        for module, (hf_parent, projections) in _MODULES.items():
            key = f"decoder.layers.{i}.{module}"
            if key + ".lora_A" not in adapters:
                continue
            a, b = adapters[key + ".lora_A"].float(), adapters[key + ".lora_B"].float()
            want_in, want_out = _io_sizes(arch, module)
            if a.shape[1] != want_in or (want_out is not None and b.shape[0] != want_out):
                raise PeftExportError(
                    f"{key} adapters are {b.shape[0]} x {a.shape[1]} (B rows x A columns) but this base model's "
                    f"{module} is {want_out or 'qkv'} x {want_in}: pass the base checkpoint the adapters were trained on.")
            if key + ".lora_M" in adapters:
                b = b @ adapters[key + ".lora_M"].float()  # MoSLoRA: B M A == (B M) A
            if module.endswith("linear_qkv"):
                rows = qkv_rows(arch, qkv_parts)
                if len(rows) != b.shape[0]:
                    raise PeftExportError(
                        f"{key}.lora_B has {b.shape[0]} rows but qkv_parts={list(qkv_parts)} cover {len(rows)} rows of "
                        "this model: pass the base checkpoint the adapters were trained on.")
                full = b.new_zeros(arch.num_query_groups * (arch.heads_per_group + 2) * arch.head_dim, b.shape[1])
                full[rows] = b
                parts = dict(zip(projections, split_qkv(full, arch)))
                parts = {p: parts[p] for p in projections if p[0] in qkv_parts}
            elif module.endswith("linear_fc1"):
                parts = dict(zip(projections, b.chunk(2, dim=0)))
            else:
                parts = {projections[0]: b}
            for proj, b_part in parts.items():
                name = f"{_PREFIX}.{i}.{hf_parent}.{proj}"
                state[name + ".lora_A.weight"] = a.clone()  # one copy per projection (see module doc)
                state[name + ".lora_B.weight"] = b_part.contiguous()
                targets.add(proj)
    if not state:
        raise PeftExportError("no LoRA adapters found (keys like decoder.layers.0.mlp.linear_fc2.lora_A): "
                              "pass the adapters.safetensors that training wrote.")
    return state, sorted(targets)


def read_adapters(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, lora config) of an adapters.safetensors written by `nemo_neo.peft.save_adapters`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PeftExportError(f"{path} does not exist; pass the adapters.safetensors a LoRA / LLM-Neo run wrote.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "lora_config" not in meta:
        raise PeftExportError(f"{path} has no lora_config metadata: it was not written by nemo_neo's save_adapters.")
    return tensors, json.loads(meta["lora_config"])


def export_peft_adapters(adapters_path, base_ckpt, out, base_model_name_or_path: str | None = None,
                         dtype: torch.dtype = torch.float32, overwrite: bool = False) -> dict:
    """Write `out/adapter_model.safetensors` + `out/adapter_config.json` (peft LoRA) for the
    adapters at `adapters_path`, trained on the nemo_neo checkpoint `base_ckpt`. Load them with
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<HF export of base_ckpt>), out)`."""
    from safetensors.torch import save_file


    atomic.check_output_dir(out, overwrite)
    arch, _ = read_index(base_ckpt)
    tensors, lora = read_adapters(adapters_path)
    state, targets = to_peft_state(tensors, arch, lora.get("qkv_parts", ["q", "k", "v"]))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or str(base_ckpt),
        "r": int(lora["rank"]),
        "lora_alpha": float(lora["alpha"]),  # peft's scale: lora_alpha / r, as nemo_neo's
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with atomic.atomic_directory(out, overwrite) as tmp:
        save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"out": str(out), "target_modules": targets, "tensors": len(state), "mixer_folded": bool(lora.get("mixer"))}
