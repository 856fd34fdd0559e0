#!/usr/bin/env python
"""Step time and peak memory of LLM-Neo vs full-parameter KD vs LoRA vs SFT, and of a peer.

Same student, same data, one run. Teacher: SmolLM2-135M-Instruct (30 layers); student: the teacher
without layers 15-29; real text (WikiText-2 valid from ../shared/data when present, else the
offline default corpus). Our four methods run through `nemo_neo.recipes.methods.train_student`
itself (the real entry point: Trainer, megatron DDP and optimizer, chunked KD loss); LoRA rank 128
on every linear layer (the LLM-Neo default), alpha = 0.5.

The peer (benchmarks/peer_llm_neo.py) is the same LLM-Neo objective written the way the reference
implementation does it: transformers LlamaForCausalLM + peft LoRA (same rank and target layers),
teacher logits under no_grad, both logits upcast to full fp32, KL over the full vocabulary with
F.kl_div. It sees exactly the same batches (same sampler) as our runs.

Each (method, repeat) runs in a fresh subprocess; methods are interleaved (the order rotates every
repeat) so that load from other jobs on a shared machine spreads over all of them; still, time it on
a quiet machine (a one-process variant that interleaved the methods' steps was tried and dropped:
with all models in one process beside another job, every ratio drifted towards 1).
  time:   median step time of the steps after `--warmup` (the step alone: no validation, no saving),
          wall clock and process CPU time (with --threads 1 the CPU time is what the step costs even
          when other jobs share the cores; wall time then also counts waiting for them).
  memory: CPU: the process's peak RSS (VmHWM), reset (/proc/self/clear_refs) once the models are
          loaded, read at the end of every step (before the final checkpoint is written); reported
          as the total and as the training share = peak - RSS after loading (what the method adds
          on top of the weights: grads, optimizer state, activations, logits, loss buffers).
          CUDA: torch.cuda.max_memory_allocated, reset the same way (total and training share).

    python benchmarks/peft_methods.py [--device cpu|cuda] [--dtype float32|bfloat16] [--seq 256]
        [--gbs 4 --mbs 2 --warmup 2 --steps 4 --repeats 2 --rank 128 --threads N --recompute]
        [--methods sft,lora,kd,llm_neo,peer] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
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

METHODS = ("sft", "lora", "kd", "llm_neo", "peer")
ALPHA = 0.5


# --------------------------------------------------------------------------------------------
# Workers (one method, one fresh process)


def run_ours(args, probe: MemoryProbe) -> dict:
    """train_student itself, with a Trainer that resets the peak once the models are loaded and
    reads it after every step."""
    import nemo_neo.recipes.distill as run
    import nemo_neo.recipes.methods as methods
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.parallel import initialize
    from nemo_neo.peft import LoRAConfig
    from nemo_neo.train.loop import TrainConfig, Trainer

    record = {}

    class MeasuredTrainer(Trainer):
        def __init__(self, *a, **k):
            record["loaded"] = probe.current()  # every model is loaded (and LoRA-wrapped) by now
            probe.reset_peak()
            record["step_peaks"] = []
            super().__init__(*a, **k)

        def _log(self, step, metrics):  # after the optimizer step, before any checkpoint write
            record["step_peaks"].append(probe.peak())
            record.setdefault("cpu_marks", []).append(time.process_time())
            super()._log(step, metrics)

    methods.Trainer = run.Trainer = MeasuredTrainer
    ctx = initialize()
    rows = torch.load(Path(args.work_dir) / "rows.pt")
    work = Path(args.work_dir)
    method = methods.MethodConfig(method=args.worker, loss=KDLossConfig(alpha=ALPHA),
                                  lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank))
    teacher = work / "teacher" if method.trains_on_teacher else None  # sft / lora: no teacher at all
    cfg = TrainConfig(steps=args.warmup + args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs,
                      save_every=10**9, eval_every=10**9)
    with tempfile.TemporaryDirectory(dir=work) as run_dir:
        result = methods.train_student(ctx, method, work / "student", teacher, rows, rows[:0], cfg, run_dir,
                                       dtype=getattr(torch, args.dtype), recompute="full" if args.recompute else "none")
    tokens = args.gbs * args.seq
    step_s = [tokens / h["tokens_per_s"] for h in result["history"]]
    marks = record["cpu_marks"]  # one per step: CPU time between them is one step (logging aside)
    return {"step_s": step_s[args.warmup:], "cpu_s": [b - a for a, b in zip(marks[args.warmup - 1:], marks[args.warmup:])],
            "loaded": record["loaded"], "peak": max(record["step_peaks"]), "trainable": result["trainable"]["trainable"]}


def run_peer(args, probe: MemoryProbe) -> dict:
    """LLM-Neo as the reference implementation computes it (benchmarks/peer_llm_neo.py)."""
    from peer_llm_neo import PeerLLMNeo

    from nemo_neo.data.dataset import DistributedBatchSampler
    from nemo_neo.train.loop import TrainConfig

    work = Path(args.work_dir)
    torch.manual_seed(0)
    rows = torch.load(work / "rows.pt")
    peer = PeerLLMNeo(work / "teacher_hf", work / "student_hf", args.rank, ALPHA, torch.device(args.device),
                      getattr(torch, args.dtype), args.recompute)
    loaded = probe.current()
    probe.reset_peak()
    sampler = iter(DistributedBatchSampler(len(rows), args.gbs, args.mbs, seed=TrainConfig().seed))  # the Trainer's batches
    step_s, cpu_s, peaks = [], [], []
    for _ in range(args.warmup + args.steps):
        probe.sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        peer.step([rows[idx] for idx in next(sampler)])
        probe.sync()
        step_s.append(time.perf_counter() - start)
        cpu_s.append(time.process_time() - start_cpu)
        peaks.append(probe.peak())
    return {"step_s": step_s[args.warmup:], "cpu_s": cpu_s[args.warmup:], "loaded": loaded, "peak": max(peaks),
            "trainable": sum(p.numel() for p in peer.trainable)}


# --------------------------------------------------------------------------------------------
# Parent: prepare once, run every (method, repeat) in its own process, compare


def prepare(args) -> None:
    """Student, HF copies for the peer, and the token rows, into the work dir."""
    from transformers import AutoTokenizer

    from nemo_neo.checkpoint.convert import convert_neo_to_hf
    from nemo_neo.data import indexed_from_text
    from nemo_neo.prune import drop_layers_checkpoint
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

    work = Path(args.work_dir)
    teacher = default_teacher_checkpoint()
    if not (work / "teacher").exists():
        (work / "teacher").symlink_to(teacher)
    student = drop_layers_checkpoint(teacher, work / "student", range(15, 30), overwrite=True)
    convert_neo_to_hf(teacher, work / "teacher_hf", overwrite=True)
    convert_neo_to_hf(student, work / "student_hf", overwrite=True)
    text = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
    sources = [text] if text.is_file() else []
    samples = args.gbs * (args.warmup + args.steps)
    train, _ = indexed_from_text(sources, AutoTokenizer.from_pretrained(str(teacher)), args.seq, train_samples=samples,
                                 valid_fraction=0.0, cache_dir=work / "data", progress=False)
    rows = train.rows(samples)
    torch.save(rows, work / "rows.pt")


def run_worker_process(args, method: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--work-dir", args.work_dir, "--device", args.device,
           "--dtype", args.dtype, "--seq", str(args.seq), "--gbs", str(args.gbs), "--mbs", str(args.mbs),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--rank", str(args.rank),
           *(["--threads", str(args.threads)] if args.threads else []), *(["--recompute"] if args.recompute else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {method} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarize(runs: dict, args) -> dict:
    """runs: {method: [one dict per run with step_s, cpu_s lists (and loaded, peak, trainable)]}."""
    tokens = args.gbs * args.seq
    table = {}
    for method, reps in runs.items():
        step = statistics.median(s for r in reps for s in r["step_s"])
        cpu = statistics.median(s for r in reps for s in r["cpu_s"])
        row = table[method] = {"step_s": round(step, 3), "tokens_per_s": round(tokens / step, 1), "cpu_s": round(cpu, 3)}
        if "peak" in reps[0]:
            row.update(peak_gib=round(statistics.median(r["peak"] for r in reps) / 2**30, 3),
                       training_gib=round(statistics.median(r["peak"] - r["loaded"] for r in reps) / 2**30, 3),
                       trainable_params=reps[0]["trainable"])
        row.update(step_s_all=[round(s, 3) for r in reps for s in r["step_s"]],
                   cpu_s_all=[round(s, 3) for r in reps for s in r["cpu_s"]])

    def ratio(a, b, key):
        return round(table[a][key] / table[b][key], 3) if key in table.get(a, {}) and key in table.get(b, {}) else None

    ratios = {}
    for method in ("llm_neo", "lora", "sft"):
        ratios[f"{method}_vs_kd"] = {"time": ratio(method, "kd", "step_s"), "cpu_time": ratio(method, "kd", "cpu_s"),
                                     "peak_memory": ratio(method, "kd", "peak_gib"),
                                     "training_memory": ratio(method, "kd", "training_gib")}
    ratios["llm_neo_vs_peer"] = {"tokens_per_s": ratio("llm_neo", "peer", "tokens_per_s"),
                                 "tokens_per_cpu_s": ratio("peer", "llm_neo", "cpu_s"),
                                 "peak_memory": ratio("llm_neo", "peer", "peak_gib"),
                                 "training_memory": ratio("llm_neo", "peer", "training_gib")}
    goals = {"llm_neo_vs_kd": "time <= 0.6 and memory <= 0.6 (paper: 0.8x time, 0.77x memory)",
             "llm_neo_vs_peer": "tokens_per_s >= 1.3 and memory <= 0.5"}
    return {"methods": table, "ratios": ratios, "goals": goals}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    from nemo_neo.recipes.throughput import machine as machine_info

    return f"{machine_info()['cpu']}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help=">= 1")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's); with 1, "
                   "CPU seconds per step are a timing that other jobs on a shared machine barely disturb")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--recompute", action="store_true", help="activation recomputation in every method "
                   "(ours: full recompute, parallel.recompute=full; the peer: transformers gradient checkpointing)")
    p.add_argument("--work-dir", default=None, help="where the student, HF copies and rows go (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv=None):
    args = parse_args(argv)
    probe = MemoryProbe(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = run_peer(args, probe) if args.worker == "peer" else run_ours(args, probe)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.methods = [m.strip() for m in args.methods.split(",")]
    with tempfile.TemporaryDirectory(prefix="peft_methods_") as tmp:
        args.work_dir = args.work_dir or tmp
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
        prepare(args)
        runs = {m: [] for m in args.methods}
        for repeat in range(args.repeats):
            shift = repeat % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                runs[method].append(run_worker_process(args, method))
                last = runs[method][-1]
                print(f"repeat {repeat} {method}: wall {last['step_s']} cpu {last['cpu_s']}", file=sys.stderr, flush=True)
    out = {"machine": machine(args.device), "device": args.device, "dtype": args.dtype,
           "setup": {"teacher": "SmolLM2-135M-Instruct (30 layers)", "student": "teacher minus layers 15-29",
                     "seq": args.seq, "global_batch": args.gbs, "micro_batch": args.mbs, "lora_rank": args.rank,
                     "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "recompute_activations": args.recompute},
           **summarize(runs, args)}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
