"""LLM-Neo: knowledge distillation into LoRA adapters on the student.

Only the student's adapters learn; the loss is alpha * CE + (1 - alpha) * KL(teacher || student)
(no T^2 factor, as in the LLM-Neo paper). Paper defaults: rank 128, LR 2e-4 -> 1e-5 cosine
(larger ranks want lower LRs). At the end the adapters are saved alone (small) and merged into a
full student checkpoint that converts to Hugging Face like any other.

This is `nemo_neo.recipes.methods.train_student` with method="llm_neo", kept as a function of
its own for callers that think in LLM-Neo terms.
"""

from __future__ import annotations

from pathlib import Path

from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.peft.apply import LoRAConfig
from nemo_neo.recipes.methods import MethodConfig, train_student


def llm_neo(ctx: ParallelContext, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg, run_dir,
            lora: LoRAConfig | None = None, alpha: float = 0.5, temperature: float = 1.0, merged_out=None,
            loss: KDLossConfig | None = None) -> dict:
    """Writes <run_dir>/adapters.safetensors and the merged student to `merged_out` (default <run_dir>/merged).
    `loss` replaces alpha / temperature with a whole KDLossConfig (e.g. another divergence, top-k)."""

    method = MethodConfig(method="llm_neo", loss=loss or KDLossConfig(kind="ce_kl", alpha=alpha, temperature=temperature),
                          lora=lora or LoRAConfig())
    return train_student(ctx, method, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg, run_dir,
                         out_ckpt=merged_out or Path(run_dir) / "merged")
