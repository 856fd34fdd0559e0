"""megatron-core GPT models built from Hugging Face Llama-family configs."""

from nemo_neo.models.arch import GPTArch, UnsupportedConfigError, arch_from_hf_config
from nemo_neo.models.gpt import build_gpt, check_parallel_fit, transformer_config

__all__ = [
    "GPTArch",
    "UnsupportedConfigError",
    "arch_from_hf_config",
    "build_gpt",
    "check_parallel_fit",
    "transformer_config",
]
