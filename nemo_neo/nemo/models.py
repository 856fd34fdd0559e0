"""NeMo model subclasses that distill with nemo_neo's loss (and LoRA on the student: LLM-Neo).

`NeoDistillationLlamaModel(config, teacher_config, teacher_ckpt_path, kd_loss=..., lora=...)` is an
``llm.LlamaModel`` whose underlying module is nemo_neo's `DistillationPair`: the student built by
NeMo from `config`, and a frozen teacher built from `teacher_config` and filled from a NeMo 2
checkpoint. NeMo's trainer, data modules, optimizer and logging drive it like any LlamaModel; the
training loss is nemo_neo's vocab-parallel, chunked KD loss (`KDLossConfig`: forward/reverse KL, JSD,
CE+KL, top-k, temperature, T^2 scaling), reduced like NeMo's own LM loss (a sum over tokens and the
token count, averaged over all tokens of the global batch). With `lora`, nemo_neo's LoRA adapters
wrap the student's linear layers and only they train (LLM-Neo: ``KDLossConfig(kind="ce_kl", ...)``).

Checkpoints written by NeMo's trainer hold the student alone, with adapters folded in, so they load
as a plain ``llm.LlamaModel`` (the teacher is never saved) -- the behaviour of NeMo's own
``DistillationGPTModel``.

Tensor and pipeline parallelism come from NeMo's ``MegatronStrategy``. Under pipeline parallelism the
teacher is split over the same stages as the student, and NeMo's schedule carries both hidden states
between stages in one tensor, as nemo_neo's own trainer does (`DistillationPair`; NeMo widens the p2p
shapes through `nemo_neo._compat.nemo_pipeline`, the way it does for ModelOpt's distillation model);
the loss runs on the last stage. Virtual (interleaved) pipeline stages are refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from nemo.collections import llm
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

from nemo_neo._compat.nemo_cpu import cpu_gpt_data_step
from nemo_neo.distill.losses import KDLossConfig, distillation_loss
from nemo_neo.distill.model import DistillationPair
from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import UnsupportedConfigError
from nemo_neo.models.gpt import layer_spec
from nemo_neo.nemo.convert import load_nemo_weights_into
from nemo_neo.parallel import ParallelConfig, initialize
from nemo_neo.peft.apply import LoRAConfig, adapters_of, apply_lora
from nemo_neo.peft.lora import LoRALinear


def neo_layer_spec(config=None):
    """nemo_neo's megatron-core layer spec (TE when available, else local with torch SDPA), usable as
    a NeMo ``GPTConfig.transformer_layer_spec``: a NeMo model then computes exactly what nemo_neo does."""
    return layer_spec()


class NeoKDLossReduction(MaskedTokenLossReduction):
    """NeMo loss reduction computing nemo_neo's distillation loss from (student, teacher) logits."""

    def __init__(self, kd_loss: KDLossConfig, validation_step: bool = False):
        super().__init__(validation_step=validation_step)
        self.kd_loss = kd_loss

    def forward(self, batch: dict, forward_out):
        from megatron.core import parallel_state

        student_logits, teacher_logits = forward_out
        tp_group = parallel_state.get_tensor_model_parallel_group() if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
        out = distillation_loss(student_logits, teacher_logits, self.kd_loss, labels=batch.get("labels"),
                                loss_mask=batch.get("loss_mask"), tp_group=tp_group)
        tokens = out.num_tokens.round().to(torch.int)
        report = torch.cat([out.loss_sum.detach().float().view(1), tokens.float().view(1)])
        # (sum, count, report): megatron's schedule divides by the token count (NeMo's convention).
        return out.loss_sum, tokens, {"loss_sum_and_ub_size": report}


class MergedCheckpointLoRA(LoRALinear):
    """A `LoRALinear` whose checkpoint entry is its base layer's, with the adapter folded into the
    weight: the saved model is a plain student with the usual tensor names and TP sharding."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        entries = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}weight"
        merged = (self.base.weight + self.delta_weight().to(self.base.weight.dtype)).detach()
        entries[key] = dataclasses.replace(entries[key], data=merged)
        return entries


class _NemoDistillationPair(DistillationPair):
    """nemo_neo's student/teacher pair as NeMo's module: accepts NeMo's forward arguments and checkpoints
    as the student alone."""

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, **_unused):
        # labels are not passed on: megatron's GPT would return its own CE loss instead of logits.
        return super().forward(input_ids)

    def __init__(self, student, teacher):
        super().__init__(student, teacher)
        # NeMo's resume loads the checkpoint (the student alone, see state_dict) through the Lightning
        # module's load_state_dict: route its keys to the student and leave the teacher, which
        # configure_model filled from its own checkpoint, out of the strict check.
        self._register_load_state_dict_pre_hook(_keys_to_student)
        self.register_load_state_dict_post_hook(_teacher_not_missing)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        return self.student.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)


def _keys_to_student(state_dict, prefix, *_args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith((prefix + "student.", prefix + "teacher."))]:
        state_dict[prefix + "student." + key[len(prefix):]] = state_dict.pop(key)


def _teacher_not_missing(_module, incompatible):
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".teacher." not in "." + k]


class _NeoDistillationMixin:
    """What the NeMo distillation subclasses add to llm.GPTModel / llm.LlamaModel."""

    def __init__(self, config, teacher_config, teacher_ckpt_path, kd_loss: Optional[KDLossConfig] = None,
                 lora: Optional[LoRAConfig] = None, student_ckpt_path=None, optim=None, tokenizer=None,
                 model_transform=None):
        super().__init__(config, optim=optim, tokenizer=tokenizer, model_transform=model_transform)
        self.teacher_config = teacher_config
        self.teacher_ckpt_path = str(teacher_ckpt_path)
        # The (pruned) student's starting weights; None = NeMo's initialization or its resume/restore.
        self.student_ckpt_path = None if student_ckpt_path is None else str(student_ckpt_path)
        self.kd_loss = kd_loss or KDLossConfig(kind="forward_kl")  # Minitron's logit-only forward KL
        self.lora = lora

    def configure_model(self, vp_stage=None) -> None:
        if hasattr(self, "module"):
            return
        if getattr(self.config, "virtual_pipeline_model_parallel_size", None):  # set by MegatronStrategy
            # NeMo's schedule widens the p2p shapes of non-interleaved pipelines only (as for ModelOpt's model).
            raise ConfigError("NeoDistillation*Model does not support virtual pipeline stages: leave "
                              "virtual_pipeline_model_parallel_size at None (plain pipeline parallelism works).")
        for attr in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "sequence_parallel", "pipeline_dtype"):
            setattr(self.teacher_config, attr, getattr(self.config, attr))
        student = self.config.configure_model(self.tokenizer)
        teacher = self.teacher_config.configure_model(self.tokenizer)
        if student.vocab_size != teacher.vocab_size:
            raise UnsupportedConfigError(f"student vocab {student.vocab_size} != teacher vocab {teacher.vocab_size}: "
                                         "logit distillation needs one tokenizer.")
        load_nemo_weights_into(teacher, self.teacher_ckpt_path)
        if self.student_ckpt_path is not None:
            load_nemo_weights_into(student, self.student_ckpt_path)
        if self.lora is not None:
            # The context of the groups NeMo created: initialize() with other sizes would rebuild them.
            groups = ParallelConfig(tensor_parallel=self.config.tensor_model_parallel_size,
                                    pipeline_parallel=self.config.pipeline_model_parallel_size)
            apply_lora(student, self.lora, initialize(groups))
            for adapter in adapters_of(student).values():
                adapter.__class__ = MergedCheckpointLoRA
        # Per-token mean over the global batch, as in nemo_neo's trainer (and NeMo's LM loss).
        self.config.calculate_per_token_loss = student.config.calculate_per_token_loss = True
        self.module = _NemoDistillationPair(student, teacher)

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, **kwargs):
        return self.module(input_ids, position_ids, attention_mask)

    def data_step(self, dataloader_iter):
        if torch.cuda.is_available():
            return super().data_step(dataloader_iter)
        return cpu_gpt_data_step(dataloader_iter)

    @property
    def training_loss_reduction(self) -> NeoKDLossReduction:
        if not self._training_loss_reduction:
            self._training_loss_reduction = NeoKDLossReduction(self.kd_loss)
        return self._training_loss_reduction

    @property
    def validation_loss_reduction(self) -> NeoKDLossReduction:
        if not self._validation_loss_reduction:
            self._validation_loss_reduction = NeoKDLossReduction(self.kd_loss, validation_step=True)
        return self._validation_loss_reduction

    def get_inference_wrapper(self, *args, **kwargs):
        raise NotImplementedError("load the saved student as llm.LlamaModel for inference")


class NeoDistillationGPTModel(_NeoDistillationMixin, llm.GPTModel):
    """llm.GPTModel distilled from a frozen teacher with nemo_neo's KD loss (see module docstring)."""


class NeoDistillationLlamaModel(_NeoDistillationMixin, llm.LlamaModel):
    """llm.LlamaModel distilled from a frozen teacher with nemo_neo's KD loss (see module docstring)."""


def llm_neo_model(config, teacher_config, teacher_ckpt_path, alpha: float = 0.5, temperature: float = 1.0,
                  lora: Optional[LoRAConfig] = None, **kwargs) -> NeoDistillationLlamaModel:
    """LLM-Neo in NeMo: LoRA adapters on the student, alpha * CE + (1 - alpha) * KL, no T^2 factor."""
    kd = KDLossConfig(kind="ce_kl", alpha=alpha, temperature=temperature, t2_scaling=False)
    return NeoDistillationLlamaModel(config, teacher_config, Path(teacher_ckpt_path), kd_loss=kd,
                                     lora=lora or LoRAConfig(), **kwargs)
