"""LLM-Neo: knowledge distillation into LoRA adapters on the student.

Only the student's adapters learn; the loss is alpha * CE + (1 - alpha) * KL(teacher || student)
(no T^2 factor, as in the LLM-Neo paper). Paper defaults: rank 128, LR 2e-4 -> 1e-5 cosine
(larger ranks want lower LRs). At the end the adapters are saved alone (small) and merged into a
full student checkpoint that converts to Hugging Face like any other.
"""

from __future__ import annotations

from pathlib import Path

from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.peft.apply import LoRAConfig, apply_lora, merge_lora, save_adapters, trainable_report


def llm_neo(ctx, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg, run_dir,
            lora: LoRAConfig | None = None, alpha: float = 0.5, temperature: float = 1.0, merged_out=None) -> dict:
    from nemo_neo.checkpoint.native import read_index, save_distributed
    from nemo_neo.distill.run import distill

    lora = lora or LoRAConfig()
    holder = {}

    def prepare(student):
        apply_lora(student, lora, ctx)
        holder["student"] = student
        holder["report"] = trainable_report(student)

    loss = KDLossConfig(kind="ce_kl", alpha=alpha, temperature=temperature, t2_scaling=False)
    result = distill(ctx, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg, run_dir, loss,
                     prepare_student=prepare)
    student = holder["student"]
    arch, _ = read_index(student_ckpt)
    run_dir = Path(run_dir)
    save_adapters(run_dir / "adapters.safetensors", student, arch, ctx, lora)
    merge_lora(student)
    save_distributed(merged_out or run_dir / "merged", arch, student, ctx, tokenizer_src=student_ckpt,
                     metadata={"llm_neo": {"lora": lora.__dict__, "alpha": alpha}}, overwrite=True)
    result["trainable"] = holder["report"]
    return result
