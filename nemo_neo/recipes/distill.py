"""Logit distillation of a student checkpoint from a frozen teacher checkpoint (one recipe stage)."""

from __future__ import annotations

import logging

from nemo_neo.checkpoint.load import load_chunks, load_model
from nemo_neo.checkpoint.native import read_index
from nemo_neo.distill.cached import cached_kd_loss_fn, cached_validation_metrics, check_loss_for_cache
from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.distill.model import DistillationPair, check_teacher_compatible
from nemo_neo.distill.objective import distillation_metrics, kd_loss_fn, kd_with_correction_loss_fn
from nemo_neo.distill.teacher_cache import CachedTargetSamples, TeacherCache
from nemo_neo.eval.lm_loss import validation_loss
from nemo_neo.models.dtype import default_dtype
from nemo_neo.models.gpt import recompute_overrides
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train import state as ckpt_state
from nemo_neo.train.loop import TrainConfig, Trainer

log = logging.getLogger("nemo_neo.recipes")


def build_pairs(ctx: ParallelContext, student_ckpt, teacher_ckpt, dtype=None, teacher_dtype=None, recompute="none",
                recompute_modules=("core_attn",), train_teacher=False):
    """Student (trainable) and frozen teacher stages for this rank: a list of one DistillationPair, or
    under an interleaved pipeline one per virtual stage (student and teacher split over the same
    virtual stages). `teacher_dtype` may be lower precision than the student's. recompute (none /
    selective of `recompute_modules` / full, see `models.gpt.recompute_overrides`) applies to the
    student, and to the teacher when it trains too (a frozen teacher runs without autograd and keeps
    no activations)."""
    student_arch, _ = read_index(student_ckpt)
    teacher_arch, _ = read_index(teacher_ckpt)
    check_teacher_compatible(student_arch, teacher_arch, student_ckpt, teacher_ckpt)  # before any compute
    dtype = dtype or default_dtype()
    settings = recompute_overrides(recompute, recompute_modules)
    students, _, _ = load_chunks(student_ckpt, ctx, dtype, **settings)
    teachers, _, _ = load_chunks(teacher_ckpt, ctx, teacher_dtype or dtype, **(settings if train_teacher else {}))
    return [DistillationPair(s, t, train_teacher=train_teacher) for s, t in zip(students, teachers)], student_arch


def build_pair(ctx: ParallelContext, student_ckpt, teacher_ckpt, **options):
    """`build_pairs` for one chunk per rank (no interleaved pipeline): (pair, student arch)."""
    if ctx.vpp_size > 1:
        raise ValueError("virtual_pipeline > 1: this rank holds one pair per virtual stage; use build_pairs")
    pairs, arch = build_pairs(ctx, student_ckpt, teacher_ckpt, **options)
    return pairs[0], arch


def distill(ctx: ParallelContext, student_ckpt, teacher_ckpt, train_rows, valid_rows, train_cfg: TrainConfig, run_dir,
            loss_cfg: KDLossConfig | None = None, eval_micro_batch_size: int = 4, prepare_student=None,
            correct_teacher_lr: tuple[float, float] | None = None, **pair_options) -> dict:
    """Train the student on KD(teacher) over `train_rows`; checkpoints (student only) and logs in run_dir.
    `prepare_student(student)` runs before training (e.g. LLM-Neo puts LoRA adapters on it).
    correct_teacher_lr=(max_lr, min_lr): teacher correction in parallel: the teacher also trains, on
    its LM loss at these rates, and is saved beside each student checkpoint (result["teacher_checkpoint"])."""
    loss_cfg = loss_cfg or KDLossConfig(kind="forward_kl")
    in_parallel = correct_teacher_lr is not None
    pairs, student_arch = build_pairs(ctx, student_ckpt, teacher_ckpt, train_teacher=in_parallel, **pair_options)
    for pair in pairs:
        pair.fused = loss_cfg.fused  # the last stage hands the loss hidden states instead of logits
        if prepare_student is not None:
            prepare_student(pair.student)
    # one pair per rank, or the list of its chunks (interleaved pipeline): the Trainer takes either
    model = pairs if len(pairs) > 1 else pairs[0]
    students = [p.student for p in pairs] if len(pairs) > 1 else pairs[0].student
    tp_group = ctx.tp_group if ctx.tp_size > 1 else None

    def evaluate(_model):
        return distillation_metrics(model, ctx, valid_rows, eval_micro_batch_size, tp_group)

    before = evaluate(model)
    extra = {}
    loss_fn = kd_loss_fn(loss_cfg, tp_group)
    if in_parallel:
        teacher_arch, _ = read_index(teacher_ckpt)
        loss_fn = kd_with_correction_loss_fn(loss_cfg, tp_group)
        teachers = [p.teacher for p in pairs] if len(pairs) > 1 else pairs[0].teacher
        extra = dict(lr_overrides={"*teacher.*": correct_teacher_lr}, companion=("teacher", teachers, teacher_arch))
    trainer = Trainer(ctx, model, student_arch, loss_fn, train_rows, train_cfg, run_dir,
                      name="distill", evaluate=evaluate, tokenizer_src=student_ckpt, checkpoint_module=students,
                      adjust_tensor_shapes_fn=pairs[0].pair_tensor_shapes, **extra)
    result = trainer.fit()
    result["before"] = before
    result["checkpoint"] = str(ckpt_state.latest_checkpoint(trainer.ckpt_root))
    if in_parallel:
        result["teacher_checkpoint"] = str(trainer.companion_checkpoint(train_cfg.steps))
    return result


def distill_from_cache(ctx: ParallelContext, student_ckpt, cache_dir, train_rows, valid_rows, train_cfg: TrainConfig,
                       run_dir, loss_cfg: KDLossConfig | None = None, eval_micro_batch_size: int = 4,
                       prepare_student=None, teacher_ckpt=None, dtype=None, recompute="none",
                       recompute_modules=("core_attn",), teacher_dtype=None) -> dict:
    """`distill` with the teacher's top-K targets read from a teacher cache (`nemo_neo.distill.
    teacher_cache`): no teacher weights are loaded. The cache must have been made for these samples,
    the student's tokenizer and (when `teacher_ckpt` is named; only its fingerprint is read) that
    teacher. Validation: the student's LM loss and the sparse KL against the cache's validation split
    (`cached_validation_metrics`); a cache written without that split (before it existed) gives the
    LM loss alone, with a warning saying how to add the split."""
    loss_cfg = loss_cfg or KDLossConfig(kind="forward_kl")
    cache = TeacherCache(cache_dir)
    check_loss_for_cache(loss_cfg, cache)
    arch, _ = read_index(student_ckpt)
    cache.check(train_rows, arch.vocab_size, student_ckpt, teacher_ckpt)
    student, _, _ = load_model(student_ckpt, ctx, dtype or default_dtype(), **recompute_overrides(recompute, recompute_modules))
    if prepare_student is not None:
        prepare_student(student)

    tp_group = ctx.tp_group if ctx.tp_size > 1 else None
    has_valid = len(valid_rows) > 0
    cached_valid = has_valid and cache.check_valid(valid_rows)
    if has_valid and not cached_valid and ctx.is_main:
        log.warning("teacher cache %s has no validation split: validation reports the student's LM loss only; rerun "
                    "the caching command on it (it adds the split, the training chunks stay) for the validation KL.",
                    cache.root)
    valid_samples = CachedTargetSamples(valid_rows, cache, with_targets=ctx.is_last_stage, split="valid")

    def evaluate(_model):
        if cached_valid:
            return cached_validation_metrics(student, ctx, valid_samples, eval_micro_batch_size, tp_group)
        was_training = student.training
        metrics = validation_loss(student, ctx, valid_rows, eval_micro_batch_size, desc="validation")
        student.train(was_training)
        return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}

    before = evaluate(student) if has_valid else {}
    samples = CachedTargetSamples(train_rows, cache, with_targets=ctx.is_last_stage)
    trainer = Trainer(ctx, student, arch, cached_kd_loss_fn(loss_cfg, tp_group), samples, train_cfg, run_dir,
                      name="distill", evaluate=evaluate if has_valid else None, tokenizer_src=student_ckpt,
                      collate_fn=None)
    result = trainer.fit()
    result["before"] = before
    result["after"] = {k.removeprefix("val_"): v for k, v in result["final"].items() if k.startswith("val_")} or (
        evaluate(student) if has_valid else {})
    result["checkpoint"] = str(ckpt_state.latest_checkpoint(trainer.ckpt_root))
    result["teacher_cache"] = str(cache.root)
    return result
