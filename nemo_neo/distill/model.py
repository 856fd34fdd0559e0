"""Student and frozen teacher run as one pipeline-parallel module.

Under pipeline parallelism the teacher is split over the same stages as the student: stage k holds
student layers and teacher layers of slice k. `DistillationPair` is what megatron-core's schedule
sees on each rank: between stages it sends the student's and the teacher's hidden states
concatenated along the hidden dimension ([s, b, h_student + h_teacher]; `pair_tensor_shapes`
tells the schedule), and on the last stage it returns both logits so the loss (vocab-parallel,
chunked) is computed there. Only the student learns: the teacher is in eval mode, its parameters
have requires_grad=False (so DDP gives them no grad buffers and the optimizer no state) and it
runs under no_grad. Checkpoints are written from `pair.student` alone.

Under an interleaved (virtual) pipeline each rank holds one pair per virtual stage (a student chunk
and the teacher chunk of the same virtual stage, `recipes.distill.build_pairs`). megatron's
interleaved schedule takes no `adjust_tensor_shapes_fn`: it sizes every p2p tensor from the first
chunk's `config.hidden_size`, so a chunk's `config` is a copy of the student's with the width of
both hidden states (the student's own config is untouched).

With `train_teacher=True` (teacher correction "in parallel" with distillation) the teacher keeps
learning from its own LM loss: it runs with gradients and its hidden states travel between stages
undetached; the KD term still sees detached teacher logits (see `objective.kd_with_correction_loss_fn`).

With `fused=True` (`KDLossConfig.fused`) the last stage returns `fused.HeadInputs` (final hidden
states and output-layer weight) of both models instead of their logits, and the loss forms the
logits chunk by chunk (`nemo_neo.distill.fused`); the objective dispatches on what it receives.
"""

from __future__ import annotations

import copy

import torch

from nemo_neo.checkpoint.hf_io import tokenizer_digest
from nemo_neo.distill.fused import HeadInputs, head_weight, hidden_states_head
from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import GPTArch


class TeacherMismatchError(ConfigError):
    """Teacher and student cannot be distilled (different vocabularies or tokenizers)."""


def check_teacher_compatible(student: GPTArch, teacher: GPTArch, student_ckpt=None, teacher_ckpt=None) -> None:
    """Teacher and student must share the tokenizer; fail before any compute if they do not."""
    if student.vocab_size != teacher.vocab_size:
        raise TeacherMismatchError(
            f"student vocab_size={student.vocab_size} != teacher vocab_size={teacher.vocab_size}: logit "
            "distillation needs one tokenizer; derive the student from the teacher (prune) or retokenize."
        )
    a, b = tokenizer_digest(student_ckpt), tokenizer_digest(teacher_ckpt)
    if a and b and a != b:
        raise TeacherMismatchError(
            f"student ({student_ckpt}) and teacher ({teacher_ckpt}) have different tokenizer.json files; "
            "logit distillation needs the same tokenizer on both sides."
        )


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class DistillationPair(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, train_teacher: bool = False,
                 fused: bool = False):
        super().__init__()
        self.student = student
        self.train_teacher = train_teacher
        self.fused = fused  # a plain attribute: may be set after construction (e.g. from KDLossConfig.fused)
        self.teacher = teacher if train_teacher else freeze(teacher)
        self.config = student.config  # megatron's schedule reads the model's config
        self.student_hidden = student.config.hidden_size
        self.teacher_hidden = teacher.config.hidden_size
        self.vp_stage = getattr(student, "vp_stage", None)
        if self.vp_stage is not None:  # a chunk of an interleaved pipeline (see the module docstring)
            if getattr(teacher, "vp_stage", None) != self.vp_stage:
                raise ValueError(f"student chunk {self.vp_stage} paired with teacher chunk {teacher.vp_stage}")
            self.config = copy.copy(student.config)
            self.config.hidden_size = self.student_hidden + self.teacher_hidden

    # --- what megatron-core's schedule and finalize_model_grads ask of a model -------------------
    @property
    def model_type(self):
        return self.student.model_type

    @property
    def pre_process(self):
        return self.student.pre_process

    @property
    def post_process(self):
        return self.student.post_process

    @property
    def share_embeddings_and_output_weights(self):
        return self.student.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.student.shared_embedding_or_output_weight()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_teacher:
            self.teacher.eval()  # a frozen teacher never leaves eval mode
        return self

    def set_input_tensor(self, input_tensor):
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if tensor is None:
            self.student.set_input_tensor([None])
            self.teacher.set_input_tensor([None])
            return
        student_part, teacher_part = tensor.split([self.student_hidden, self.teacher_hidden], dim=-1)
        self.student.set_input_tensor([student_part])
        if not self.train_teacher:
            teacher_part = teacher_part.detach()
        self.teacher.set_input_tensor([teacher_part.to(self.teacher.config.params_dtype)])

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None):
        student_out = self._stage(self.student, input_ids)
        with torch.set_grad_enabled(self.train_teacher and torch.is_grad_enabled()):
            teacher_out = self._stage(self.teacher, input_ids)
        if self.post_process:
            return student_out, teacher_out  # both [b, s, V/TP] (or HeadInputs): the loss runs on this stage
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)

    def _stage(self, model, input_ids):
        if not (self.fused and self.post_process):
            return model(input_ids, position_ids=None, attention_mask=None)

        with hidden_states_head(model):
            hidden = model(input_ids, position_ids=None, attention_mask=None)
        return HeadInputs(hidden, head_weight(model))

    def pair_tensor_shapes(self, recv_shapes, send_shapes):
        """`adjust_tensor_shapes_fn` for the schedule: p2p tensors carry both hidden states."""
        width = self.student_hidden + self.teacher_hidden
        fix = lambda shapes: [(*s[:-1], width) for s in shapes]  # noqa: E731
        return fix(recv_shapes), fix(send_shapes)
