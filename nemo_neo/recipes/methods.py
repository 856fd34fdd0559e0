"""One entry point for the LM-setting student-training baselines of the LLM-Neo paper.

    sft      full-parameter fine-tune on the text, cross-entropy only (no teacher in training)
    lora     LoRA adapters on the student, cross-entropy only (no teacher in training)
    kd       full-parameter logit distillation from the teacher with the configured loss: forward KL
             (Minitron), or any KDLossConfig (alpha * CE + (1 - alpha) * KL with kind="ce_kl", top-k, ...)
    llm_neo  LoRA adapters trained with alpha * CE + (1 - alpha) * KL(teacher || student), no T^2
             factor (Yang et al., 2024); the divergence and its options come from the loss config

All four run through the same `Trainer` (resumable checkpoints, TensorBoard, progress bar) at any
TP/PP layout, and all four are validated the same way before and after training: the student's
LM loss and, whenever a teacher checkpoint is given, KL(teacher || student) per token, so the
methods can be compared on one scale. sft / lora keep the teacher out of training (no teacher
weights in memory while the student trains): it is loaded only for those two evaluations, and
their periodic validation during training is the LM loss alone.

The result is one full student checkpoint at `out_ckpt` (for the LoRA methods the adapters merged
into the base weights, so it converts and evaluates like any other checkpoint; the adapters are
also saved alone, small, to <run_dir>/adapters.safetensors).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nemo_neo.checkpoint.load import load_chunks, load_model
from nemo_neo.checkpoint.native import read_index, save_distributed
from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.distill.model import DistillationPair, check_teacher_compatible
from nemo_neo.distill.objective import distillation_metrics, lm_loss_fn
from nemo_neo.errors import ConfigError
from nemo_neo.eval.lm_loss import validation_loss
from nemo_neo.models.dtype import default_dtype
from nemo_neo.models.gpt import recompute_overrides
from nemo_neo.parallel import chunks
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.peft.apply import LoRAConfig, apply_lora, merge_lora, save_adapters, trainable_report
from nemo_neo.recipes.distill import distill, distill_from_cache
from nemo_neo.train.loop import TrainConfig, Trainer

METHODS = ("sft", "lora", "kd", "llm_neo")
LORA_METHODS = ("lora", "llm_neo")
TEACHER_TRAINED_METHODS = ("kd", "llm_neo")  # the teacher's logits are part of the training loss
ADAPTERS_FILE = "adapters.safetensors"


class MethodConfigError(ConfigError):
    pass


@dataclass
class MethodConfig:
    """method: one of METHODS (see the module docstring).
    loss: the whole distillation loss (`KDLossConfig`: kind, alpha, temperature, t2_scaling, top_k,
        jsd_beta, chunk_tokens, divergence, ...). `kd` trains with it as given; `llm_neo` is
        alpha * CE + (1 - alpha) * divergence, so a `kind` other than ce_kl names that divergence
        (forward_kl, reverse_kl, jsd); the CE-only methods ignore it.
    lora: the adapters of lora / llm_neo (paper defaults: rank 128 on every linear layer)."""

    method: str = "kd"
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Also called by `train_student`: a Hydra-merged config never runs __post_init__."""
        if self.method not in METHODS:
            raise MethodConfigError(f"unknown training method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.loss, KDLossConfig):
            raise MethodConfigError(f"loss must be a KDLossConfig, got {type(self.loss).__name__}")
        self.training_loss()  # the loss as the method uses it must be valid too
        if self.uses_lora:
            self.lora.resolved_targets()

    @property
    def uses_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def trains_on_teacher(self) -> bool:
        return self.method in TEACHER_TRAINED_METHODS

    def training_loss(self) -> KDLossConfig | None:
        """The distillation loss of kd / llm_neo; None for the CE-only methods."""
        if self.method == "kd":
            return self.loss
        if self.method == "llm_neo":
            if self.loss.kind == "ce_kl":
                return self.loss
            # LLM-Neo always adds CE: the configured kind is the divergence beside it
            return replace(self.loss, kind="ce_kl", divergence=self.loss.kind)
        return None


def _load_teacher_for_eval(ctx: ParallelContext, student_arch, student_ckpt, teacher_ckpt, dtype):
    teacher_arch, _ = read_index(teacher_ckpt)
    check_teacher_compatible(student_arch, teacher_arch, student_ckpt, teacher_ckpt)
    teachers, _, _ = load_chunks(teacher_ckpt, ctx, dtype)  # one per virtual stage (one without VPP)
    return teachers


def validation_metrics(ctx: ParallelContext, student, student_arch, student_ckpt, valid_rows, micro_batch_size: int,
                       teacher_ckpt=None, teacher_dtype=None) -> dict:
    """LM loss (and KL(teacher || student) when a teacher is given) of `student` on `valid_rows`.
    The teacher is loaded for this call only and released after it. No rows: no metrics ({})."""
    if len(valid_rows) == 0:
        return {}
    if teacher_ckpt is None:
        if isinstance(student, list):
            raise ValueError("the LM loss alone is measured on one model per rank; pass teacher_ckpt for model chunks")
        was_training = student.training
        metrics = validation_loss(student, ctx, valid_rows, micro_batch_size, desc="validation")
        student.train(was_training)
        return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}
    students = chunks.as_chunks(student)  # one model, or this rank's chunks (interleaved pipeline)
    teacher_dtype = teacher_dtype or students[0].config.params_dtype
    teachers = _load_teacher_for_eval(ctx, student_arch, student_ckpt, teacher_ckpt, teacher_dtype)
    pairs = [DistillationPair(s, t) for s, t in zip(students, teachers)]
    tp_group = ctx.tp_group if ctx.tp_size > 1 else None
    metrics = distillation_metrics(pairs if len(pairs) > 1 else pairs[0], ctx, valid_rows, micro_batch_size, tp_group)
    del pairs, teachers
    gc.collect()
    return metrics


def _train_on_labels(ctx: ParallelContext, method: MethodConfig, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg,
                     run_dir, eval_micro_batch_size, prepare_student, dtype=None, teacher_dtype=None,
                     recompute="none", recompute_modules=("core_attn",)) -> dict:
    """sft / lora: the student alone trains on next-token CE; the teacher only validates."""
    student, arch, _ = load_model(student_ckpt, ctx, dtype or default_dtype(), **recompute_overrides(recompute, recompute_modules))
    prepare_student(student)
    before = validation_metrics(ctx, student, arch, student_ckpt, valid_rows, eval_micro_batch_size, teacher_ckpt, teacher_dtype)

    def evaluate(_model):  # periodic validation while training: the LM loss, without the teacher
        return validation_metrics(ctx, student, arch, student_ckpt, valid_rows, eval_micro_batch_size)

    tp_group = ctx.tp_group if ctx.tp_size > 1 else None
    trainer = Trainer(ctx, student, arch, lm_loss_fn(tp_group), train_rows, train_cfg, run_dir, name=method.method,
                      evaluate=evaluate if len(valid_rows) else None, tokenizer_src=student_ckpt)
    result = trainer.fit()
    result["before"] = before
    result["after"] = validation_metrics(ctx, student, arch, student_ckpt, valid_rows, eval_micro_batch_size,
                                         teacher_ckpt, teacher_dtype)
    return result


def _after_from_final(final: dict) -> dict | None:
    """distill() validates at its last step (val_kl / val_loss / val_perplexity); None when the
    run resumed from its last checkpoint and took no step."""
    after = {k.removeprefix("val_"): v for k, v in final.items() if k.startswith("val_")}
    return after if "kl" in after else None


def train_student(ctx: ParallelContext, method: MethodConfig, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg: TrainConfig,
                  run_dir, out_ckpt=None, eval_micro_batch_size: int = 4, teacher_cache=None, **pair_options) -> dict:
    """Train the student with `method`; write the final full student checkpoint to `out_ckpt`
    (default <run_dir>/final, atomically). Collective: every rank of the TP/PP/DP world calls it.

    teacher_ckpt: required by kd / llm_neo; optional for sft / lora (then only the LM loss is reported).
    teacher_cache: kd / llm_neo read the teacher's top-K targets from this teacher cache instead of
        running the teacher (no teacher weights loaded; `teacher_ckpt`, if given, is only checked
        against the cache's fingerprint); before / after then hold the LM loss and the sparse top-K +
        tail KL against the cache's validation split (the LM loss alone for a cache without one).
    pair_options: dtype, teacher_dtype, recompute, recompute_modules (as `build_pair`).
    Returns {method, before, after, history, final, resumed_from, trainable, checkpoint[, adapters]};
    before / after hold the validation loss, perplexity and (with a teacher) kl."""
    method.validate()
    if teacher_cache is not None and not method.trains_on_teacher:
        raise MethodConfigError(f"a teacher cache is for the methods that distil (kd, llm_neo), not {method.method!r}")
    if method.trains_on_teacher and teacher_ckpt is None and teacher_cache is None:
        raise MethodConfigError(f"method {method.method!r} distils from a teacher: pass teacher_ckpt")
    run_dir = Path(run_dir)
    out_ckpt = Path(out_ckpt) if out_ckpt is not None else run_dir / "final"
    prepared = {"students": []}

    def prepare(student):  # once per model chunk under an interleaved pipeline (adapters in every chunk)
        if method.uses_lora:
            apply_lora(student, method.lora, ctx)
        prepared["students"].append(student)
        prepared["trainable"] = trainable_report(prepared["students"])

    if teacher_cache is not None:
        result = distill_from_cache(ctx, student_ckpt, teacher_cache, train_rows, valid_rows, train_cfg, run_dir,
                                    method.training_loss(), eval_micro_batch_size, prepare_student=prepare,
                                    teacher_ckpt=teacher_ckpt, **pair_options)
    elif method.trains_on_teacher:
        result = distill(ctx, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg, run_dir,
                         method.training_loss(), eval_micro_batch_size, prepare_student=prepare, **pair_options)
    else:
        result = _train_on_labels(ctx, method, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg, run_dir,
                                  eval_micro_batch_size, prepare, **pair_options)
    students = prepared["students"]
    student = students if len(students) > 1 else students[0]  # this rank's chunks, or its one model
    arch, _ = read_index(student_ckpt)
    if "after" not in result:
        result["after"] = _after_from_final(result["final"]) or validation_metrics(
            ctx, student, arch, student_ckpt, valid_rows, eval_micro_batch_size, teacher_ckpt,
            pair_options.get("teacher_dtype"))
    if method.uses_lora:
        result["adapters"] = str(run_dir / ADAPTERS_FILE)
        save_adapters(run_dir / ADAPTERS_FILE, student, arch, ctx, method.lora)
        for chunk in students:
            merge_lora(chunk)
    save_distributed(out_ckpt, arch, student, ctx, tokenizer_src=student_ckpt, overwrite=True,
                     metadata={"method": asdict(method), "steps": train_cfg.steps, "after": result["after"]})
    result.update(method=method.method, trainable=prepared["trainable"], checkpoint=str(out_ckpt))
    return result

