"""Guarded imports of optional packages, each with one error line that says what to install.

lm-eval, nvidia-modelopt and tensorrt-llm are not needed to train or prune; only evaluation,
FP8 export and the TensorRT-LLM throughput backend use them, so they are imported here on demand.
"""

from __future__ import annotations

import importlib
import importlib.util

from nemo_neo.errors import MissingDependencyError

INSTALL_HINTS = {
    "lm_eval": 'pip install "lm-eval[hf]==0.4.13"  (or: pip install -e ".[eval]")',
    "modelopt": 'pip install "nvidia-modelopt==0.47.0" requests huggingface_hub  (or: pip install -e ".[export]")',
    "tensorrt_llm": "use NVIDIA's TensorRT-LLM container (the PyPI wheels need NVIDIA's own index and a GPU)",
    "matplotlib": "pip install matplotlib",
}


def require(module: str, feature: str):
    """Import `module` or raise one clear line naming the feature and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{feature} needs the `{top}` package, which is not importable ({e}); install it: {INSTALL_HINTS.get(top, 'pip install ' + top)}"
        ) from None


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
