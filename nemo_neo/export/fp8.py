"""FP8 (E4M3) post-training quantization with nvidia-modelopt and export for TensorRT-LLM.

    python tools/export_fp8.py --ckpt ckpt/ --calib-data text.txt --out model-fp8/ [--kv-cache-fp8]

Flow: nemo_neo checkpoint -> temporary BF16 Hugging Face model -> `mtq.quantize(model,
FP8_DEFAULT_CFG, forward_loop)` (per-tensor max calibration of every Linear's weights and input
activations on `calib_samples` x `calib_seq_len` tokens of real text; embeddings and lm_head stay
BF16) -> `modelopt.torch.export.export_hf_checkpoint`: the "unified" Hugging Face checkpoint with
float8_e4m3fn weights, `weight_scale` / `input_scale` per Linear and `hf_quant_config.json`
(quant_algo FP8), which TensorRT-LLM's PyTorch backend (`trtllm-bench --model_path`, `LLM(...)`),
vLLM and SGLang load directly. `kv_cache_fp8` also calibrates the K/V projections' outputs and
records kv_cache_quant_algo FP8 (TensorRT-LLM then keeps an FP8 KV cache).

modelopt runs this on CPU too (slowly: calibration is plain forward passes with fake-quant),
so the format and accuracy checks in tests/export/test_export_fp8.py run without a GPU.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nemo_neo.checkpoint import atomic
from nemo_neo.checkpoint.hf_io import copy_tokenizer_files
from nemo_neo.data.dataset import read_text
from nemo_neo.export.hf import ExportError, as_hf_dir, export_hf, is_hf_dir, tokenizer_source
from nemo_neo.optional import require


def read_calibration_text(paths) -> str:
    """Text from .txt files, or the "text" field of .jsonl files (the data layer's one reader)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    text = read_text(paths)
    if not text.strip():
        raise ExportError(f"calibration data {', '.join(map(str, paths))} holds no text.")
    return text


def calibration_batches(tokenizer, text: str, num_samples: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Consecutive `seq_len`-token windows of the text (up to num_samples), batched."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(num_samples, ids.numel() // seq_len)
    if n == 0:
        raise ExportError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; give more text or a smaller --calib-seq-len.")
    rows = ids[: n * seq_len].view(n, seq_len)
    return [rows[i : i + batch_size] for i in range(0, n, batch_size)]


def fp8_config(kv_cache_fp8: bool = False) -> dict:
    """modelopt's FP8_DEFAULT_CFG (+ FP8_KV_CFG): quant_cfg is a list of entries in modelopt 0.4x
    and a dict in older releases; both are handled."""
    mtq = require("modelopt.torch.quantization", "FP8 export")
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if kv_cache_fp8:
        kv = copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"]
        if isinstance(cfg["quant_cfg"], dict):
            cfg["quant_cfg"].update(kv)
        else:
            cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(kv)
    return cfg


def export_fp8(ckpt, out, calib_data, calib_samples: int = 64, calib_seq_len: int = 512, batch_size: int = 4,
               kv_cache_fp8: bool = False, overwrite: bool = False, tokenizer=None, device=None,
               dtype=torch.bfloat16) -> dict:
    """Quantize `ckpt` (nemo_neo checkpoint or HF dir) to FP8 and write the unified HF checkpoint."""
    atomic.check_output_dir(out, overwrite)  # before anything slow
    tok_dir = tokenizer_source(ckpt, tokenizer)
    text = read_calibration_text(calib_data)
    mtq = require("modelopt.torch.quantization", "FP8 export")
    export_mod = require("modelopt.torch.export", "FP8 export")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    batches = calibration_batches(tok, text, calib_samples, calib_seq_len, batch_size)
    with as_hf_dir(ckpt, dtype="bfloat16", tokenizer=tokenizer) as hf_dir:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
        source_config = json.loads((Path(hf_dir) / "config.json").read_text())

    def forward_loop(m):
        with torch.no_grad():
            for b in tqdm(batches, desc="FP8 calibration", unit="batch", dynamic_ncols=True):
                m(b.to(device))

    model = mtq.quantize(model, fp8_config(kv_cache_fp8), forward_loop)
    calibrated = time.perf_counter()
    with atomic.atomic_directory(out, overwrite) as tmp:
        with torch.inference_mode():
            export_mod.export_hf_checkpoint(model, export_dir=str(tmp))
        copy_tokenizer_files(tok_dir, tmp, overwrite=False)
        quant = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"]
        report = {
            "source": str(ckpt), "source_is_hf": is_hf_dir(ckpt), "quant_algo": quant.get("quant_algo"),
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"), "exclude_modules": quant.get("exclude_modules"),
            "calib_data": [str(p) for p in ([calib_data] if isinstance(calib_data, (str, Path)) else calib_data)],
            "calib_samples": sum(len(b) for b in batches), "calib_seq_len": calib_seq_len,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "modelopt_version": _version("nvidia-modelopt"), "architectures": source_config.get("architectures"),
            "calibration_seconds": round(calibrated - start, 2),
        }
        (tmp / "nemo_neo_export.json").write_text(json.dumps(report, indent=2) + "\n")
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["out"] = str(out)
    return report


def export_bf16(ckpt, out, overwrite: bool = False, tokenizer=None) -> dict:
    """The unquantized counterpart: a BF16 HF checkpoint (what TensorRT-LLM runs without --quant)."""

    return export_hf(ckpt, out, dtype="bfloat16", overwrite=overwrite, tokenizer=tokenizer)


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None
