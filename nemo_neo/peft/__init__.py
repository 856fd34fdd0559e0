"""Parameter-efficient fine-tuning: TP-aware LoRA / MoSLoRA adapters for megatron-core GPT."""

from nemo_neo.peft.apply import (
                                 LoRAConfig,
                                 LoRAConfigError,
                                 adapter_state,
                                 adapters_of,
                                 apply_lora,
                                 load_adapters,
                                 merge_lora,
                                 save_adapters,
                                 trainable_report,
)
from nemo_neo.peft.lora import LoRALinear

__all__ = ["LoRAConfig", "LoRAConfigError", "LoRALinear", "adapter_state", "adapters_of", "apply_lora",
           "load_adapters", "merge_lora", "save_adapters", "trainable_report"]
