"""Read an FP8 (modelopt unified HF) checkpoint back without TensorRT-LLM: dequantize it, bound its
rounding error, and build a transformers model from the dequantized weights.

transformers cannot load modelopt's FP8 format itself (no `quant_method: modelopt` quantizer), so
this reads the safetensors directly: every quantized Linear has an float8_e4m3fn `weight`, a scalar
float32 `weight_scale` (dequantized weight = fp8 * weight_scale) and a scalar `input_scale`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_neo.checkpoint.hf_io import read_hf_weights

FP8 = torch.float8_e4m3fn
SCALE_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale", "weight_scale_2", "pre_quant_scale")


def read_state(path) -> dict[str, torch.Tensor]:
    return read_hf_weights(path)


def quant_config(path) -> dict:
    return json.loads((Path(path) / "hf_quant_config.json").read_text())["quantization"]


def fp8_weights(state: dict) -> list[str]:
    return sorted(k for k, v in state.items() if k.endswith(".weight") and v.dtype == FP8)


def dequantize_state(state: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """fp8 weight * weight_scale -> `dtype`; scale tensors dropped; other tensors cast to `dtype`."""
    out = {}
    for name, value in state.items():
        if name.rsplit(".", 1)[-1] in SCALE_SUFFIXES:
            continue
        if value.dtype == FP8:
            scale = state[name[: -len("weight")] + "weight_scale"].float()
            out[name] = (value.float() * scale).to(dtype)
        else:
            out[name] = value.to(dtype)
    return out


def rounding_bound(reference: torch.Tensor, scale: torch.Tensor, compute_rel: float = 2.0**-7) -> torch.Tensor:
    """Largest error that round-to-nearest E4M3 with per-tensor `scale` can leave on each element
    of `reference` (the weights that were quantized):

    - E4M3 has 3 mantissa bits: a normal value x (in units of `scale`) is off by at most half a
      unit in the last place, |x| * 2^-4; below the smallest normal (2^-6) the subnormal spacing
      is 2^-9, so at most 2^-10 (times `scale`);
    - modelopt divides by the scale in the model's dtype (BF16: 8 significant bits), rounding the
      quotient and the scale by up to 2^-8 each: `compute_rel` = 2^-7 of |x| on top.
    """
    w = reference.float().abs()
    scale = scale.float()
    return torch.maximum(w * (2.0**-4 + compute_rel), scale * 2.0**-10 + w * compute_rel) * (1 + 1e-6)


def dequantized_model(path, dtype=torch.float32):
    """A transformers model with the dequantized FP8 weights (activations not quantized).
    Written as a plain HF directory in a temporary folder and loaded with from_pretrained, which
    skips the random initialisation that from_config would spend on every weight."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    state = dequantize_state(read_state(path), dtype)
    with tempfile.TemporaryDirectory(prefix="nemo_neo_fp8_dq_") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    loaded = model.state_dict()
    missing = [k for k in state if k not in loaded]
    if missing:
        raise ValueError(f"{path}: dequantized weights do not fit the config (e.g. {missing[:3]}).")
    return model.eval()
