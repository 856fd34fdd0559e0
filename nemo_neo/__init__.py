"""nemo_neo: Minitron pruning + distillation, LLM-Neo and KD-LoRA on megatron-core."""

import warnings

# megatron-core announces every missing optional GPU accelerator at import; they are optional here.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|is not installed).*")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")

__version__ = "0.1.0"
