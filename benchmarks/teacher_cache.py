#!/usr/bin/env python
"""Distillation from a teacher cache vs online KD: step time, peak memory, cache size and write cost.

Teacher: the real SmolLM2-135M-Instruct (30 layers); student: the recipe's LLM-Neo student (the
teacher without layers 14-28, conf/preset/llm_neo_smollm2_cpu.yaml); real text (WikiText-2 valid
from ../shared/data when present, else the offline default corpus). Every run is
`nemo_neo.recipes.methods.train_student` (Trainer, megatron DDP and optimizer), each in a fresh
subprocess so that its peak RSS is its own:

    kd / llm_neo          online: the teacher runs in the loop, full-vocab KL
    kd@K / llm_neo@K      from a cache of the teacher's top-K + tail written once (no teacher weights)

  cpu:    median CPU seconds of the process per step (steps 2 .. N-1; with --threads 1 the work itself)
  time:   median wall-clock step time of the steps after the first (validation and saving excluded),
          and the fastest of them: on a shared machine other jobs only ever add time, so the ratio of
          the fastest steps is the one that estimates a quiet machine's
  memory: peak RSS of the process (VmHWM, from the start: weights included)
  cache:  bytes per token on disk at each K, and the one-off wall time of writing it
  loss:   the student's validation LM loss after the same steps, and its validation KL (online: the
          full-vocab KL at T=1; from a cache: the top-K + tail KL against the cache's validation split)

    python benchmarks/teacher_cache.py [--seq 256 --gbs 4 --mbs 2 --steps 4 --ks 8,32,100 --rank 32]
        [--runs kd,llm_neo,llm_neo@32] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)
from memory_probe import MemoryProbe  # noqa: E402

ALPHA = 0.5
DROPPED = range(14, 29)  # the llm_neo_smollm2_cpu preset's student


def worker(args) -> dict:
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.parallel import initialize
    from nemo_neo.peft import LoRAConfig
    from nemo_neo.recipes import methods
    from nemo_neo.train import loop
    from nemo_neo.train.loop import TrainConfig

    work = Path(args.work_dir)
    method_name, _, k = args.worker.partition("@")
    if args.threads:
        torch.set_num_threads(args.threads)
    # CPU seconds of this process per step (all its threads), from the start of one step's micro-batches
    # to the next's: other jobs on a shared machine stretch wall time, much less the work a step does
    step_starts, run_microbatches = [], loop.run_microbatches

    def timed_microbatches(*a, **kw):
        step_starts.append(time.process_time())
        return run_microbatches(*a, **kw)

    loop.run_microbatches = timed_microbatches
    ctx = initialize()
    rows, valid = torch.load(work / "rows.pt"), torch.load(work / "valid.pt")
    method = methods.MethodConfig(method=method_name, loss=KDLossConfig(kind="ce_kl" if method_name == "llm_neo" else "forward_kl",
                                                                        alpha=ALPHA),
                                  lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    cfg = TrainConfig(steps=args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs, save_every=10**9,
                      eval_every=10**9)
    with tempfile.TemporaryDirectory(dir=work) as run_dir:
        result = methods.train_student(ctx, method, work / "student", work / "teacher", rows, valid, cfg, run_dir,
                                       teacher_cache=work / f"cache{k}" if k else None)
    tokens = args.gbs * args.seq
    step_s = [tokens / h["tokens_per_s"] for h in result["history"]][1:]
    # steps 2 .. N-1: the first warms up, the last one's successor is the validation
    cpu_s = [b - a for a, b in zip(step_starts[1:], step_starts[2:])]
    return {"step_s": step_s, "cpu_s": cpu_s, "peak": MemoryProbe("cpu").peak(), "val_loss": result["after"]["loss"],
            "val_kl": result["after"].get("kl")}


def prepare(args) -> dict:
    """Student, token rows (train and validation) and one cache per K; returns the caches' costs."""
    from transformers import AutoTokenizer

    from nemo_neo.data.from_text import indexed_from_text
    from nemo_neo.distill.cache_writer import write_teacher_cache
    from nemo_neo.parallel import initialize
    from nemo_neo.prune import drop_layers_checkpoint
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

    work = Path(args.work_dir)
    teacher = default_teacher_checkpoint()
    (work / "teacher").symlink_to(teacher)
    drop_layers_checkpoint(teacher, work / "student", DROPPED, overwrite=True)
    text = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
    samples, valid = indexed_from_text([text] if text.is_file() else [], AutoTokenizer.from_pretrained(str(teacher)),
                                       args.seq, train_samples=args.gbs * args.steps, valid_fraction=0.1, max_valid=8,
                                       cache_dir=work / "data_cache")
    train = samples.rows(args.gbs * args.steps)
    torch.save(train, work / "rows.pt")
    torch.save(valid, work / "valid.pt")
    ctx, caches = initialize(), {}
    for k in args.ks:
        start = time.perf_counter()
        info = write_teacher_cache(ctx, work / "teacher", train, work / f"cache{k}", k, 1.0, chunk_samples=args.gbs,
                                   micro_batch_size=args.mbs, progress=False, valid_samples=valid)
        seconds = time.perf_counter() - start
        on_disk = sum(p.stat().st_size for p in (work / f"cache{k}").glob("chunk_*"))
        caches[k] = {"bytes_per_token_on_disk": round(on_disk / (len(train) * args.seq), 1),  # training split
                     "bytes_per_token_payload": info["bytes_per_token"], "write_s": round(seconds, 2),
                     "tokens_written": (len(train) + len(valid)) * args.seq,  # both splits, teacher load included
                     "write_tokens_per_s": round((len(train) + len(valid)) * args.seq / seconds, 1)}
    return caches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    p.add_argument("--ks", default="8,32,100")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default); 1 makes "
                   "the CPU-time column free of thread spin-waits")
    p.add_argument("--runs", default=None, help="comma-separated subset of kd,llm_neo,kd@K,llm_neo@K (default: all)")
    p.add_argument("--out", default=None)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ks = [int(k) for k in str(args.ks).split(",")]
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="teacher_cache_") as tmp:
        args.work_dir = args.work_dir or tmp
        caches = prepare(args)
        runs = {}
        k_mid = args.ks[len(args.ks) // 2]
        names = args.runs.split(",") if args.runs else ["kd", "llm_neo", f"kd@{k_mid}", *(f"llm_neo@{k}" for k in args.ks)]
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--work-dir", args.work_dir, "--seq", str(args.seq),
                   "--threads", str(args.threads), "--gbs", str(args.gbs), "--mbs", str(args.mbs), "--steps", str(args.steps), "--rank", str(args.rank)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(lines[-1].removeprefix("RESULT "))
            runs[name] = {"step_s": round(statistics.median(r["step_s"]), 3), "step_s_min": round(min(r["step_s"]), 3),
                          "cpu_s": round(statistics.median(r["cpu_s"]), 3) if r["cpu_s"] else None,
                          "peak_gib": round(r["peak"] / 2**30, 3),
                          "val_loss": round(r["val_loss"], 4), "val_kl": r["val_kl"] and round(r["val_kl"], 4),
                          "step_s_all": [round(s, 3) for s in r["step_s"]],
                          "load_avg_1min_after": round(os.getloadavg()[0], 1)}  # the machine is shared
            print(name, runs[name], file=sys.stderr, flush=True)
    base = runs["kd"]
    for row in runs.values():
        row["time_vs_online_kd"] = round(row["step_s"] / base["step_s"], 3)
        row["fastest_step_vs_online_kd"] = round(row["step_s_min"] / base["step_s_min"], 3)
        if row["cpu_s"] and base["cpu_s"]:
            row["cpu_time_vs_online_kd"] = round(row["cpu_s"] / base["cpu_s"], 3)
        row["peak_vs_online_kd"] = round(row["peak_gib"] / base["peak_gib"], 3)
    from nemo_neo.recipes.throughput import machine

    out = {"machine": f"{machine()['cpu']}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "setup": {"seq": args.seq, "global_batch": args.gbs, "micro_batch": args.mbs, "steps": args.steps,
                     "lora_rank": args.rank, "alpha": ALPHA},
           "runs": runs, "caches": caches,
           "goal": "llm_neo from the cache <= 0.6x the step time and <= 0.5x the peak memory of online KD"}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
