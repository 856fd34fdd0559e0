"""Parameter / compute dtypes by name, one table for every config and command line."""

from __future__ import annotations

import torch

from nemo_neo.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def default_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the CPU path is for exactness)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def parse_dtype(value) -> torch.dtype | None:
    """None and torch dtypes pass through; "auto" is `default_dtype()`; a name is looked up in DTYPES."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return default_dtype()
    if value not in DTYPES:
        raise ConfigError(f"dtype {value!r} is not one of {sorted(DTYPES)} (or 'auto').")
    return DTYPES[value]
