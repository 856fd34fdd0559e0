"""The peer of benchmarks/peft_methods.py: LLM-Neo written the way its reference implementation does it.

LLM-Neo's code (a LLaMA-Factory fork, `CustomSeq2SeqTrainer.compute_loss`) trains a transformers
model with peft LoRA adapters; per batch it takes the student's CE from the model, runs the teacher
under no_grad, upcasts both logits to fp32 over the full vocabulary, selects the labelled positions
with `masked_select`, and computes KL = F.kl_div(log_softmax(student), softmax(teacher), "batchmean");
loss = alpha * CE + (1 - alpha) * KL (its `kd_ratio` is 1 - alpha). The optimizer is torch AdamW over
the adapters (the transformers Trainer default), with gradient-norm clipping at 1.0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100


class PeerLLMNeo:
    """transformers + peft LLM-Neo on one device; `step(micro_batches)` is one optimizer step."""

    def __init__(self, teacher_hf: Path, student_hf: Path, rank: int, alpha: float, device: torch.device,
                 dtype: torch.dtype, recompute: bool = False):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.alpha, self.device = alpha, device
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=dtype).to(device).eval()
        self.teacher.requires_grad_(False)
        student = AutoModelForCausalLM.from_pretrained(student_hf, dtype=dtype).to(device)
        self.student = get_peft_model(student, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                          target_modules=HF_LORA_TARGETS, task_type="CAUSAL_LM"))
        if recompute:
            self.student.gradient_checkpointing_enable()
        self.student.train()
        if device.type == "cpu":  # safetensors weights may still be memory-mapped and unread: read them
            with torch.no_grad():  # now, so that the RSS after loading holds them (as ours does)
                for model in (self.teacher, self.student):
                    for param in model.parameters():
                        param.data = param.data.clone()
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=2e-4, weight_decay=0.01)

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [b, s + 1] token ids (inputs rows[:, :-1], labels rows[:, 1:], as in our runs)."""
        rows = rows.to(self.device)
        inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        out = self.student(input_ids=inputs, labels=labels, shift_labels=labels)  # CE on the same tokens as ours
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs).logits
        mask = labels.ne(IGNORE_INDEX).unsqueeze(-1)
        vocab = out.logits.shape[-1]
        student_logits = torch.masked_select(out.logits.float(), mask).view(-1, vocab)
        teacher_logits = torch.masked_select(teacher_logits.float(), mask).view(-1, vocab)
        kl = F.kl_div(F.log_softmax(student_logits, dim=-1), F.softmax(teacher_logits, dim=-1), reduction="batchmean")
        return self.alpha * out.loss + (1 - self.alpha) * kl

    def step(self, micro_batches: list[torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for rows in micro_batches:
            (self.loss(rows) / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
