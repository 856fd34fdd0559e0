"""Export: Hugging Face (any dtype) and FP8 for TensorRT-LLM / vLLM (nvidia-modelopt).

- `export_hf(ckpt, out, dtype)`: nemo_neo checkpoint -> HF directory (transformers loads it).
- `nemo_neo.export.fp8.export_fp8(ckpt, out, calib_data)`: modelopt FP8 unified HF checkpoint.
- `nemo_neo.export.fp8_check`: read an FP8 checkpoint back (dequantize, rounding bound).

modelopt is optional (pip install -e ".[export]") and imported only by the FP8 path.
"""

from nemo_neo.export.hf import ExportError, as_hf_dir, export_hf

__all__ = ["ExportError", "as_hf_dir", "export_hf"]
