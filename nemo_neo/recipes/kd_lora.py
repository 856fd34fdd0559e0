"""KD-LoRA (task-specific) and its baselines on GLUE, with decoder LMs as classifiers.

KD-LoRA (Azimi et al., ENLSP @ NeurIPS 2024): (a) fully fine-tune the teacher on the task,
(b) take a smaller student of the same family with LoRA on the attention query / value projections,
(c) train only the adapters with alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) on the
task logits. Baselines from the same entry point (`run_task(task, method)`):

    fft      full fine-tune of the student, CE
    lora     LoRA (q, v) on the student, CE only
    kd_lora  LoRA (q, v) on the student, CE + T^2 KL from the fine-tuned teacher

Classifier: the LM's scores of label words at the last prompt token (`nemo_neo.peft.label_words`,
which says why).

Training loop: a plain single-process loop with torch.optim.AdamW over the trainable parameters
and HF Trainer's default linear warm-up / linear decay schedule, as in the reference implementation
(which uses transformers.Trainer). Frozen base weights get no gradients and no optimizer state.
Teacher soft labels are computed once over the training set after its fine-tuning (eval mode, as
the reference implementation does with `trainer.predict`). Single process, TP = PP = 1: the
label-word head reads whole vocabulary rows; multi-GPU training is left to the LM recipes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nemo_neo.checkpoint.load import load_model
from nemo_neo.checkpoint.native import read_index, save_distributed
from nemo_neo.data.glue import compute_metrics, get_task, read_glue
from nemo_neo.distill.losses import KDLossConfig, distillation_loss
from nemo_neo.parallel import initialize
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.peft.apply import LoRAConfig, apply_lora, save_adapters, trainable_report
from nemo_neo.peft.label_words import (
    class_logits,
    collate,
    encode_examples,
    evaluate,
    label_token_ids,
    load_tokenizer,
    predict_logits,
)
from nemo_neo.prune import drop_layers_checkpoint
from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

METHODS = ("fft", "lora", "kd_lora")


@dataclass
class StageConfig:
    """One fine-tuning stage (teacher FFT, student FFT / LoRA / KD-LoRA)."""

    lr: float = 5e-5
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0  # HF Trainer default: no warm-up, linear decay to 0
    clip_grad: float = 1.0


@dataclass
class KDLoRATaskConfig:
    task: str = "SST-2"
    method: str = "kd_lora"
    glue_root: str | None = None  # <root>/<TASK>/{train,dev}.tsv
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
    run_dir: str | None = None  # metrics.json (+ adapters / fine-tuned teacher when save_models)
    save_models: bool = False
    evaluate_teacher: bool = True  # dev metrics of the teacher before / after its fine-tuning


# ---------------------------------------------------------------------------------------------
# Training


def _num_steps(cfg: StageConfig, n: int) -> int:
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    return max(1, math.ceil(cfg.epochs * n / cfg.batch_size))


def finetune(model, encoded, labels, label_ids, cfg: StageConfig, pad_id: int, seed: int,
             teacher_logits: torch.Tensor | None = None, kd_alpha: float = 0.5, temperature: float = 2.0,
             name: str = "finetune", log_dir: Path | None = None) -> dict:
    """Train the parameters of `model` that require grad. CE on the class logits, or with
    `teacher_logits` ([N, C], aligned with `encoded`) alpha * CE + (1 - alpha) * T^2 * KL.
    Shows a progress bar; with `log_dir` the loss and LR also go to TensorBoard there."""
    from tqdm.auto import tqdm
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay (HF convention)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps = _num_steps(cfg, len(encoded))
    warmup = int(cfg.warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(warmup, 1) if s < warmup else max(0.0, (steps - s) / max(steps - warmup, 1)))
    kd = KDLossConfig(kind="ce_kl", alpha=kd_alpha, temperature=temperature, t2_scaling=True, chunk_tokens=None)
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels, dtype=torch.long)
    perm, pos, losses = torch.randperm(len(encoded), generator=gen), 0, []
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(log_dir))
    model.train()
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc=name, unit="step", dynamic_ncols=True):
        if pos + cfg.batch_size > len(perm):  # new epoch (drop the last partial batch)
            perm, pos = torch.randperm(len(encoded), generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        ids, last = collate([encoded[i] for i in idx.tolist()], pad_id)
        logits = class_logits(model, ids, last, label_ids)
        y = labels_t[idx].to(logits.device)
        if teacher_logits is None:
            loss = F.cross_entropy(logits, y)
        else:
            t = teacher_logits[idx].to(logits.device)
            loss_sum, n = distillation_loss(logits[:, None, :], t[:, None, :], kd, labels=y[:, None])
            loss = loss_sum / n
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if writer is not None:
            writer.add_scalar("train/loss", losses[-1], step + 1)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step + 1)
    if writer is not None:
        writer.close()
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "mean_loss_last_10": sum(losses[-10:]) / len(losses[-10:]), "train_time_s": time.perf_counter() - t0,
            "optimizer_state_tensors": sum(len(s) for s in opt.state.values()),
            "optimizer_params": len(opt.state)}


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
    teacher's before / after its fine-tuning."""

    cfg = config or KDLoRATaskConfig()
    cfg = KDLoRATaskConfig(**{**asdict(cfg), "task": task, "method": method, **overrides})
    for k in ("teacher", "student"):
        if isinstance(getattr(cfg, k), dict):
            setattr(cfg, k, StageConfig(**getattr(cfg, k)))
    if isinstance(cfg.lora, dict):
        cfg.lora = LoRAConfig(**cfg.lora)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
    spec = get_task(cfg.task)
    if ctx is None:
        ctx = initialize()
    if cfg.glue_root is None:
        raise ValueError("glue_root is required (<root>/<TASK>/{train,dev}.tsv)")
    teacher_ckpt = cfg.teacher_ckpt
    if teacher_ckpt is None:
        teacher_ckpt = default_teacher_checkpoint()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
    student_ckpt = cfg.student_ckpt
    if student_ckpt is None:
        if run_dir is None:
            raise ValueError("student_ckpt or run_dir (to write the depth-pruned student into) is required")
        student_ckpt = make_student_checkpoint(teacher_ckpt, run_dir / "student", cfg.student_drop_layers)

    tok = load_tokenizer(student_ckpt)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    label_ids = label_token_ids(tok, spec)
    train = read_glue(cfg.glue_root, spec.name, "train", cfg.train_limit)
    dev = read_glue(cfg.glue_root, spec.name, "dev", cfg.dev_limit)
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
            result["teacher_train"] = finetune(teacher, train_enc, train_y, label_ids, cfg.teacher, pad_id, cfg.seed,
                                               name=f"{spec.name} teacher fft",
                                               log_dir=run_dir / "tensorboard" / "teacher" if run_dir else None)
            if cfg.evaluate_teacher:
                result["teacher_after"] = ev(teacher)
            if cfg.save_models and run_dir:
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
    result["student_train"] = finetune(student, train_enc, train_y, label_ids, cfg.student, pad_id, cfg.seed,
                                       teacher_logits=teacher_logits, kd_alpha=cfg.kd_alpha,
                                       temperature=cfg.temperature, name=f"{spec.name} student {cfg.method}",
                                       log_dir=run_dir / "tensorboard" / cfg.method if run_dir else None)
    result["student_after"] = ev(student)
    if run_dir:
        if cfg.save_models and cfg.method != "fft":
            save_adapters(run_dir / "adapters.safetensors", student, s_arch, ctx, cfg.lora)
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    """python -m nemo_neo.recipes.kd_lora [--config conf/kd_lora.yaml] key=value ... (OmegaConf dotlist)."""
    import sys

    from omegaconf import OmegaConf

    argv = list(sys.argv[1:] if argv is None else argv)
    conf_path = Path(__file__).resolve().parents[2] / "conf" / "kd_lora.yaml"
    if argv[:1] == ["--config"]:
        conf_path, argv = Path(argv[1]), argv[2:]
    conf = OmegaConf.merge(OmegaConf.load(conf_path), OmegaConf.from_dotlist(argv))
    data = OmegaConf.to_container(conf, resolve=True)
    data.pop("paper", None)  # documentation only
    if data.get("glue_root") is None:
        data["glue_root"] = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glue")
    data["teacher"] = StageConfig(**data.get("teacher", {}))
    data["student"] = StageConfig(**data.get("student", {}))
    data["lora"] = LoRAConfig(**data.get("lora", {}))
    task, method = data.pop("task"), data.pop("method")
    result = run_task(task, method, KDLoRATaskConfig(task=task, method=method, **data))
    print(json.dumps({k: result[k] for k in result if k not in ("config",)}, indent=2))
    return result


if __name__ == "__main__":
    main()
