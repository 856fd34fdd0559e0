"""KD-LoRA (task-specific) and its baselines on GLUE, with decoder LMs as classifiers.

KD-LoRA (Azimi et al., ENLSP @ NeurIPS 2024): (a) fully fine-tune the teacher on the task,
(b) take a smaller student of the same family with LoRA on the attention query / value projections,
(c) train only the adapters with alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) on the
task logits. Baselines from the same entry point (`run_task(task, method)`):

    fft      full fine-tune of the student, CE
    lora     LoRA (q, v) on the student, CE only
    kd_lora  LoRA (q, v) on the student, CE + T^2 KL from the fine-tuned teacher

Classifier: the LM's scores of label words at the last prompt token (`nemo_neo.peft.label_words`,
which says why), wrapped as a `LabelWordClassifier` module.

Training: every stage (teacher FFT, student FFT / LoRA / KD-LoRA) runs through the shared
`nemo_neo.train.loop.Trainer`: megatron-core's AdamW and OptimizerParamScheduler with the
reference implementation's schedule (transformers.Trainer defaults: AdamW betas 0.9 / 0.999, linear
decay to 0, no warm-up), its data-parallel sampler, checkpoints with exact resume (rerun the same
command), TensorBoard scalars, progress bar and the non-finite-loss stop. Frozen base weights get
no gradients and no optimizer state. Teacher soft labels are computed once over the training set
after its fine-tuning (eval mode, as the reference implementation does with `trainer.predict`).
TP = PP = 1: the label-word head reads whole vocabulary rows (a ConfigError otherwise). Data
parallelism goes through the Trainer's sampler; it is not exercised by this recipe's tests.

Config: conf/glue_kd_lora.yaml, composed by hydra (`main`; see `load_config`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_neo import enable_compat
from nemo_neo.checkpoint.load import load_model
from nemo_neo.checkpoint.native import read_index, save_distributed
from nemo_neo.data.glue import compute_metrics, get_task, read_glue
from nemo_neo.distill.losses import KDLossConfig, distillation_loss
from nemo_neo.distill.objective import schedule_outputs
from nemo_neo.errors import ConfigError, exit_on_user_error
from nemo_neo.parallel import initialize
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.peft.apply import LoRAConfig, apply_lora, save_adapters, trainable_report
from nemo_neo.peft.label_words import (
    ClassifierExamples,
    LabelWordClassifier,
    class_logits,
    collate,
    encode_examples,
    evaluate,
    label_token_ids,
    load_tokenizer,
    predict_logits,
)
from nemo_neo.prune import drop_layers_checkpoint
from nemo_neo.recipes import config as rc
from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
from nemo_neo.train.loop import TrainConfig, Trainer
from nemo_neo.train.optim import LR_DECAY_STYLES, OptimConfig, optimizer_state_report

METHODS = ("fft", "lora", "kd_lora")
CONFIG_NAME = "glue_kd_lora"
GLUE_ENV = "NEMO_NEO_GLUE_ROOT"  # <root>/<TASK>/{train,dev}.tsv
SHARED_DATA_ENV = "NEMO_NEO_SHARED_DATA"  # <shared data>/glue

__all__ = ["METHODS", "KDLoRATaskConfig", "StageConfig", "class_logits", "collate", "encode_examples",
           "label_token_ids", "load_config", "load_tokenizer", "main", "make_student_checkpoint", "run_task"]


@dataclass
class StageConfig:
    """One fine-tuning stage (teacher FFT, student FFT / LoRA / KD-LoRA). Defaults: transformers.Trainer's."""

    lr: float = 5e-5
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16  # examples per optimizer step (the global batch, over all DP ranks)
    micro_batch_size: int | None = None  # None: batch_size / DP ranks (one micro-batch per step)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0  # HF Trainer default: no warm-up, linear decay to 0
    lr_decay_style: str = "linear"
    min_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    save_every: int | None = None  # checkpoint every N steps (None: at the end only); a rerun resumes

    def __post_init__(self):
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"lr_decay_style={self.lr_decay_style!r}: use one of {list(LR_DECAY_STYLES)}")
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ConfigError(f"batch_size={self.batch_size} and micro_batch_size={self.micro_batch_size} must be >= 1")

    def num_steps(self, num_examples: int) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))

    def train_config(self, num_examples: int, dp_size: int, seed: int) -> TrainConfig:
        steps = self.num_steps(num_examples)
        optim = OptimConfig(lr=self.lr, min_lr=self.min_lr, warmup_steps=int(self.warmup_ratio * steps),
                            weight_decay=self.weight_decay, adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2,
                            adam_eps=self.adam_eps, clip_grad=self.clip_grad, lr_decay_style=self.lr_decay_style)
        micro = self.micro_batch_size or max(1, self.batch_size // dp_size)
        return TrainConfig(steps=steps, global_batch_size=self.batch_size, micro_batch_size=micro,
                           save_every=self.save_every or steps, eval_every=steps, seed=seed, optim=optim)


@dataclass
class KDLoRATaskConfig:
    task: str = "SST-2"
    method: str = "kd_lora"
    glue_root: str | None = None  # <root>/<TASK>/{train,dev}.tsv; None: $NEMO_NEO_GLUE_ROOT or $NEMO_NEO_SHARED_DATA/glue
    teacher_ckpt: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    finetuned_teacher_ckpt: str | None = None  # skip step (a) with an already fine-tuned teacher
    student_ckpt: str | None = None  # None: the teacher with `student_drop_layers` removed
    student_drop_layers: list | None = None  # None: drop half (the block before the last layer)
    max_length: int = 128
    train_limit: int | None = None  # first N training examples (None = all)
    dev_limit: int | None = None
    eval_batch_size: int = 32
    teacher: StageConfig = field(default_factory=lambda: StageConfig(lr=5e-5))
    student: StageConfig = field(default_factory=lambda: StageConfig(lr=5e-4))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=8, alpha=16.0, dropout=0.1,
                                                                targets=["linear_qkv"], qkv_parts=["q", "v"]))
    kd_alpha: float = 0.5  # weight of CE; the KL gets 1 - kd_alpha
    temperature: float = 2.0
    seed: int = 0
    run_dir: str | None = None  # training state (checkpoints, TensorBoard), metrics.json, adapters
    save_models: bool = False
    evaluate_teacher: bool = True  # dev metrics of the teacher before / after its fine-tuning


def build_task_config(values: dict) -> KDLoRATaskConfig:
    """The typed config from plain values (the composed yaml, or keyword overrides): one
    ConfigError naming any unknown key, in the top level or a section."""
    values = dict(values)
    for key in ("teacher", "student"):
        if isinstance(values.get(key), dict):
            values[key] = rc.build_dataclass(StageConfig, values[key], key)
    if isinstance(values.get("lora"), dict):
        values["lora"] = rc.build_dataclass(LoRAConfig, values["lora"], "lora")
    cfg = rc.build_dataclass(KDLoRATaskConfig, values, "kd_lora config")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
    get_task(cfg.task)  # unknown GLUE task: a ConfigError naming the known ones
    return cfg


def resolve_glue_root(cfg: KDLoRATaskConfig) -> Path:
    if cfg.glue_root is not None:
        return Path(cfg.glue_root)
    if os.environ.get(GLUE_ENV):
        return Path(os.environ[GLUE_ENV])
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV]) / "glue"
    raise ConfigError(f"glue_root is not set: give glue_root=<dir holding <TASK>/train.tsv and dev.tsv> "
                      f"(or set ${GLUE_ENV}, or ${SHARED_DATA_ENV} with a glue/ directory)")


# ---------------------------------------------------------------------------------------------
# Training


def classifier_loss_fn(kd: KDLossConfig | None = None):
    """loss_fn for `Trainer` on a LabelWordClassifier: CE on the [b, C] class logits, or with `kd`
    (ce_kl) alpha * CE + (1 - alpha) * T^2 * KL against the batch's teacher_logits."""
    ce = KDLossConfig(kind="ce_kl", alpha=1.0, chunk_tokens=None)

    def loss_fn(logits, batch):
        labels = batch["labels"][:, None]
        if kd is None:
            out = distillation_loss(logits[:, None, :], logits.detach()[:, None, :], ce, labels=labels)
        else:
            out = distillation_loss(logits[:, None, :], batch["teacher_logits"][:, None, :], kd, labels=labels)
        return schedule_outputs(out)

    return loss_fn


def finetune(ctx, model, arch, examples: ClassifierExamples, label_ids, cfg: StageConfig, seed: int, run_dir,
             name: str, kd: KDLossConfig | None = None, tokenizer_src=None) -> dict:
    """Train the parameters of `model` (a GPT) that require grad as a label-word classifier through
    the shared Trainer; run_dir holds its checkpoints (a rerun resumes), TensorBoard and log."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    train_cfg = cfg.train_config(len(examples), ctx.dp_size, seed)
    trainer = Trainer(ctx, LabelWordClassifier(model, label_ids), arch, classifier_loss_fn(kd), examples, train_cfg,
                      run_dir, name=name, tokenizer_src=tokenizer_src, checkpoint_module=model, collate_fn=None)
    t0 = time.perf_counter()
    fit = trainer.fit()
    model.eval()
    losses = [h["loss"] for h in fit["history"]]
    return {"steps": train_cfg.steps, "resumed_from": fit["resumed_from"], "train_time_s": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "final": fit["final"], **optimizer_state_report(trainer.optimizer)}


def default_student_drop(num_layers: int) -> list[int]:
    """Half the layers: the contiguous block just before the last layer (the first layers and the
    last one matter most for depth-pruned LMs, cf. Minitron / ShortGPT)."""
    n_drop = num_layers // 2
    return list(range(num_layers - 1 - n_drop, num_layers - 1))


def make_student_checkpoint(teacher_ckpt, out, drop_layers=None, overwrite: bool = True) -> Path:
    arch, _ = read_index(teacher_ckpt)
    drop = default_student_drop(arch.num_layers) if drop_layers is None else list(drop_layers)
    drop_layers_checkpoint(teacher_ckpt, out, drop, overwrite=overwrite)
    return Path(out)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def run_task(task: str = "SST-2", method: str = "kd_lora", config: KDLoRATaskConfig | None = None, ctx: ParallelContext | None = None,
             on_student_ready=None, **overrides) -> dict:
    """Fine-tune / distill a student on one GLUE task and return its metrics (a JSON-able dict).

    method: fft | lora | kd_lora. For kd_lora the teacher is fine-tuned first (step a) unless
    `finetuned_teacher_ckpt` is given. `on_student_ready(student)` is called once the student is
    built and (for lora / kd_lora) wrapped, before training (e.g. to snapshot its weights).
    The result holds the student's dev metrics before and after training, and for kd_lora the
    teacher's before / after its fine-tuning. Training state lives in run_dir/<stage>_train/
    (checkpoints, TensorBoard, <stage>_log.jsonl): rerunning the same call resumes there."""

    cfg = config or KDLoRATaskConfig()
    cfg = build_task_config({**asdict(cfg), "task": task, "method": method, **overrides})
    spec = get_task(cfg.task)
    glue_root = resolve_glue_root(cfg)
    if cfg.run_dir is None:
        raise ConfigError("run_dir is not set: give run_dir=<dir> (training checkpoints, TensorBoard, metrics.json)")
    if ctx is None:
        ctx = initialize()
    if ctx.tp_size != 1 or ctx.pp_size != 1:
        raise ConfigError(f"KD-LoRA's label-word classifier runs at TP = PP = 1 (this run: TP={ctx.tp_size}, "
                          f"PP={ctx.pp_size}); use data parallelism alone")
    teacher_ckpt = cfg.teacher_ckpt
    if teacher_ckpt is None and (cfg.method == "kd_lora" and not cfg.finetuned_teacher_ckpt or cfg.student_ckpt is None):
        teacher_ckpt = default_teacher_checkpoint()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    student_ckpt = cfg.student_ckpt
    if student_ckpt is None:
        student_ckpt = run_dir / "student"
        if not (student_ckpt / "nemo_neo.json").is_file():  # a rerun reuses it
            make_student_checkpoint(teacher_ckpt, student_ckpt, cfg.student_drop_layers)

    tok = load_tokenizer(student_ckpt)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0  # never read back: last_index is explicit
    label_ids = label_token_ids(tok, spec)
    train = read_glue(glue_root, spec.name, "train", cfg.train_limit)
    dev = read_glue(glue_root, spec.name, "dev", cfg.dev_limit)
    train_enc = encode_examples(tok, spec, train, cfg.max_length)
    dev_enc = encode_examples(tok, spec, dev, cfg.max_length)
    train_y, dev_y = [e.label for e in train], [e.label for e in dev]
    ev = lambda m: evaluate(m, spec.name, dev_enc, dev_y, label_ids, cfg.eval_batch_size, pad_id)  # noqa: E731

    result = {"task": spec.name, "method": cfg.method, "metric": spec.metric, "label_words": list(spec.label_words),
              "num_train": len(train), "num_dev": len(dev), "student_ckpt": str(student_ckpt),
              "config": json.loads(json.dumps(asdict(cfg), default=str))}

    teacher_logits = None
    if cfg.method == "kd_lora":
        # (a) the teacher, fully fine-tuned on the task (or given already fine-tuned)
        _seed_all(cfg.seed)
        if cfg.finetuned_teacher_ckpt:
            teacher, _, _ = load_model(cfg.finetuned_teacher_ckpt, ctx)
            if cfg.evaluate_teacher:
                result["teacher_after"] = ev(teacher)
        else:
            teacher, t_arch, _ = load_model(teacher_ckpt, ctx)
            if cfg.evaluate_teacher:
                result["teacher_before"] = ev(teacher)
            result["teacher_train"] = finetune(ctx, teacher, t_arch, ClassifierExamples(train_enc, train_y, pad_id),
                                               label_ids, cfg.teacher, cfg.seed, run_dir / "teacher_train",
                                               name="teacher", tokenizer_src=teacher_ckpt)
            if cfg.evaluate_teacher:
                result["teacher_after"] = ev(teacher)
            if cfg.save_models:
                save_distributed(run_dir / "teacher_finetuned", t_arch, teacher, ctx, tokenizer_src=teacher_ckpt,
                                 metadata={"kd_lora_teacher": {"task": spec.name}}, overwrite=True)
        teacher_logits = predict_logits(teacher, train_enc, label_ids, cfg.eval_batch_size, pad_id)
        result["teacher_train_accuracy"] = compute_metrics(spec.name, teacher_logits.argmax(-1).tolist(), train_y)["accuracy"]
        del teacher

    # (b) the student: full fine-tune, or LoRA on q / v
    _seed_all(cfg.seed)
    student, s_arch, _ = load_model(student_ckpt, ctx)
    result["student_before"] = ev(student)
    if cfg.method in ("lora", "kd_lora"):
        apply_lora(student, cfg.lora, ctx)
    result["trainable"] = {k: v for k, v in trainable_report(student).items() if k != "modules"}
    if on_student_ready is not None:
        on_student_ready(student)
    # (c) train: CE, or alpha * CE + (1 - alpha) * T^2 * KL on the class logits
    kd = None
    if teacher_logits is not None:
        kd = KDLossConfig(kind="ce_kl", alpha=cfg.kd_alpha, temperature=cfg.temperature, t2_scaling=True,
                          chunk_tokens=None)
    result["student_train"] = finetune(ctx, student, s_arch, ClassifierExamples(train_enc, train_y, pad_id, teacher_logits),
                                       label_ids, cfg.student, cfg.seed, run_dir / f"{cfg.method}_train",
                                       name=cfg.method, kd=kd, tokenizer_src=student_ckpt)
    result["student_after"] = ev(student)
    if cfg.save_models and cfg.method != "fft":
        save_adapters(run_dir / "adapters.safetensors", student, s_arch, ctx, cfg.lora)  # collective
    if ctx.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------
# Entry point


def load_config(argv=None) -> KDLoRATaskConfig:
    """The typed config of `nemo-neo-kd-lora [--config-dir DIR] [--config-name NAME] key=value ...`:
    hydra composes <DIR>/<NAME>.yaml (default conf/glue_kd_lora.yaml, the directory found by
    `recipes.config.conf_dir`) with the overrides; unknown keys fail by name."""
    parser = argparse.ArgumentParser(prog="nemo-neo-kd-lora", description="KD-LoRA and its baselines on GLUE.")
    parser.add_argument("--config-dir", default=None,
                        help=f"hydra config directory (default: ${rc.CONF_DIR_ENV}, else the checkout's conf/)")
    parser.add_argument("--config-name", default=CONFIG_NAME)
    parser.add_argument("overrides", nargs="*", help="key=value (hydra override syntax), e.g. task=RTE method=lora")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    directory = rc.conf_dir(args.config_dir)
    if not (directory / f"{args.config_name}.yaml").is_file():
        raise ConfigError(f"no {args.config_name}.yaml in the config directory {directory}")
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            composed = compose(args.config_name, overrides=args.overrides)
        values = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        message = str(e).replace("\n", " ")
        if "Could not override" in message:  # hydra's hint (append with +key) would only fail later, by name
            message = message.split(". To append")[0] + f": no such key in {args.config_name}.yaml"
        raise ConfigError(f"{args.config_name} config: {message}") from None
    return build_task_config(values)


def main(argv=None) -> dict:
    """python -m nemo_neo.recipes.kd_lora (or nemo-neo-kd-lora) [--config-dir DIR] task=RTE method=kd_lora ..."""
    enable_compat()
    with exit_on_user_error():
        cfg = load_config(argv)
        result = run_task(cfg.task, cfg.method, cfg)
        print(json.dumps({k: result[k] for k in result if k not in ("config",)}, indent=2))
    return result


if __name__ == "__main__":
    main()
