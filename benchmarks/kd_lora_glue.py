#!/usr/bin/env python
"""KD-LoRA and its baselines on real GLUE tasks (issue 5), through `nemo_neo.recipes.kd_lora.run_task`.

Per task: (a) the real SmolLM2-135M-Instruct is fully fine-tuned on the task (the paper's FFT of the
large model, and KD-LoRA's teacher); (b) the student is the teacher without half its layers (15 of
30, the block before the last layer), shared by every task and method; (c) the student is trained
three ways on the same examples for the same steps:
    fft      full fine-tune, CE
    lora     LoRA rank 8 on query / value, CE
    kd_lora  LoRA rank 8 on query / value, 0.5 * CE + 0.5 * T^2 * KL(teacher || student), T = 2
Metrics are the papers': accuracy (SST-2, RTE), F1 (MRPC), Matthews correlation (CoLA), on the full
dev sets. CPU budget: the training sets are cut to --train-limit examples and every stage runs a
fixed number of steps (batch 16), so these are small-budget numbers, not the paper's 3 epochs.

    python benchmarks/kd_lora_glue.py [--glue DIR (default $NEMO_NEO_SHARED_DATA/glue)] [--root runs/kd_lora_glue] [--tasks ...]
        [--train-limit 1024] [--teacher-steps 64] [--student-steps 64] [--max-length 128]

Every finished (task, method) keeps its <root>/<task>/<method>/metrics.json and is skipped on a
rerun; an interrupted one resumes from its training checkpoints (<root>/<task>/<method>/*_train/,
the shared Trainer's); <root>/glue.json, glue.md and glue.png are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)
METHODS = ("kd_lora", "fft", "lora")  # kd_lora first: it fine-tunes (and saves) the task's teacher


def run(task: str, method: str, args, student: Path, teacher: Path, ctx) -> dict:
    from nemo_neo.recipes.kd_lora import KDLoRATaskConfig, StageConfig, run_task

    run_dir = args.root / task / method
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    finetuned = args.root / task / "kd_lora" / "teacher_finetuned"
    student_lr = args.fft_lr if method == "fft" else args.lora_lr
    cfg = KDLoRATaskConfig(
        glue_root=str(args.glue), teacher_ckpt=str(teacher), student_ckpt=str(student), max_length=args.max_length,
        finetuned_teacher_ckpt=str(finetuned) if method == "kd_lora" and finetuned.is_dir() else None,
        train_limit=args.train_limit, run_dir=str(run_dir), save_models=method == "kd_lora",
        evaluate_teacher=method == "kd_lora",
        teacher=StageConfig(lr=args.teacher_lr, max_steps=args.teacher_steps, batch_size=16, warmup_ratio=0.1),
        student=StageConfig(lr=student_lr, max_steps=args.student_steps, batch_size=16, warmup_ratio=0.1))
    print(f"\n=== {task} {method}", flush=True)
    return run_task(task, method, cfg, ctx=ctx)


def table_rows(results: dict) -> list[dict]:
    rows = []
    for task, by_method in results.items():
        kd = by_method.get("kd_lora", {})
        any_run = next(iter(by_method.values()))
        row = {"task": task, "metric": any_run["metric"], "dev": any_run["num_dev"], "train": any_run["num_train"],
               "teacher_zero_shot": kd.get("teacher_before", {}).get("score"),
               "teacher_fft": kd.get("teacher_after", {}).get("score"),
               "student_untrained": any_run["student_before"]["score"],
               "teacher_steps": kd.get("teacher_train", {}).get("steps"),
               "student_steps": any_run["student_train"]["steps"]}
        for method in METHODS:
            if method in by_method:
                row[method] = by_method[method]["student_after"]["score"]
                row[f"{method}_trainable"] = by_method[method]["trainable"]["trainable"]
                row[f"{method}_train_s"] = round(by_method[method]["student_train"]["train_time_s"], 1)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [("task", "task"), ("metric", "metric"), ("train", "train ex."), ("teacher_steps", "teacher steps"),
            ("student_steps", "student steps"), ("teacher_zero_shot", "teacher 0-shot"),
            ("teacher_fft", "teacher FFT"), ("student_untrained", "student untrained"), ("fft", "student FFT"),
            ("lora", "student LoRA"), ("kd_lora", "student KD-LoRA")]
    fmt = lambda v: "-" if v is None else (f"{100 * v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("student_untrained", "student untrained"), ("fft", "student FFT"), ("lora", "student LoRA"),
            ("kd_lora", "student KD-LoRA"), ("teacher_fft", "teacher FFT")]
    fig, ax = plt.subplots(figsize=(1.8 + 2.0 * len(rows), 4))
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        xs = [j + (i - len(bars) / 2 + 0.5) * width for j in range(len(rows))]
        ax.bar(xs, [100 * (r.get(key) or 0.0) for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['task']}\n({r['metric']})" for r in rows])
    ax.set_ylabel("dev score (x100)")
    ax.set_title("KD-LoRA on GLUE: SmolLM2-135M teacher -> half-depth student")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "kd_lora_glue")
    shared = os.environ.get("NEMO_NEO_SHARED_DATA")
    p.add_argument("--glue", type=Path, default=Path(shared) / "glue" if shared else None, required=not shared,
                   help="GLUE root (<root>/<TASK>/{train,dev}.tsv); default $NEMO_NEO_SHARED_DATA/glue")
    p.add_argument("--tasks", default="RTE,MRPC,CoLA,SST-2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--train-limit", type=int, default=1024)
    p.add_argument("--teacher-steps", type=int, default=64)
    p.add_argument("--student-steps", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--teacher-lr", type=float, default=5e-5)
    p.add_argument("--fft-lr", type=float, default=5e-5)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    args = p.parse_args()
    args.root = args.root.resolve()

    from nemo_neo.parallel import initialize
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
    from nemo_neo.recipes.kd_lora import make_student_checkpoint

    ctx = initialize()
    teacher = default_teacher_checkpoint()
    student = args.root / "student"
    if not (student / "nemo_neo.json").is_file():
        make_student_checkpoint(teacher, student)
    results = {}
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            results.setdefault(task, {})[method] = run(task, method, args, student, teacher, ctx)
            rows = table_rows(results)
            (args.root / "glue.json").write_text(json.dumps({"setup": vars(args) | {"root": str(args.root),
                                                                                      "glue": str(args.glue)},
                                                             "rows": rows}, indent=1, default=str) + "\n")
            (args.root / "glue.md").write_text(markdown(rows))
            plot(rows, args.root / "glue.png")
            print(markdown(rows), flush=True)


if __name__ == "__main__":
    main()
