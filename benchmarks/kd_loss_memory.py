#!/usr/bin/env python
"""Peak memory and time of the chunked KD loss vs the naive full-vocab formula (forward + backward).

ours:  distillation_loss(student, teacher, KDLossConfig(kind="forward_kl", chunk_tokens=C)),
       loss = loss_sum / num_tokens, backward.
naive: F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1),
       log_target=True, reduction="batchmean"), backward -- the textbook fp32 formula.

Both get the same bf16 logits [tokens, vocab] (the training dtype), the student requiring grad; both
end with the bf16 student gradient. Cases: tokens x vocab (default 2048/4096/8192 x 49152/128256).

Memory is measured in a fresh subprocess per (case, implementation), after the inputs exist and a
tiny warm-up call has initialised the libraries, as growth over that state:

* ``tensor_peak_bytes`` (CPU; the figure the ratios use): the peak of live bytes handed out by
  PyTorch's CPU allocator during forward + backward. It is read from the profiler's allocator
  events (``torch.profiler.profile(profile_memory=True)``: every allocation and free with its size,
  including temporaries inside kernels), summed in time order. Exact and independent of
  glibc/page behaviour -- unlike tracemalloc, which does not see torch's allocations.
* ``rss_peak_bytes`` (CPU; cross-check): the process's peak resident set growth, from VmHWM after
  resetting it through /proc/self/clear_refs (``ru_maxrss`` growth where that is not allowed). Includes
  allocator and page granularity effects; measured in a run without the profiler.
* On CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call.

Time: one subprocess per case builds the inputs once, warms both implementations up, then runs
them alternately (ours, naive, ours, ...) ``--repeats`` times; the median is reported (min too).

A naive case whose estimated peak (NAIVE_BYTES_PER_ELEMENT x tokens x vocab, plus the inputs)
exceeds ``--naive-mem-fraction`` of physical memory is recorded as skipped with the reason.

    python benchmarks/kd_loss_memory.py [--tokens 2048,4096,8192 --vocab 49152,128256
        --chunk-tokens default --repeats 3 --device auto --out kd_loss_memory.json]

``--sweep-chunks 8,16,32,...`` instead times ours at each chunk_tokens (alternated with each other and
with naive, one subprocess per case) to choose the default; no memory runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

# The naive formula's peak in bytes per logit (measured 20.0 on CPU: fp32 log-softmax of student and
# teacher, kl_div's elementwise temporaries, fp32 gradients, the bf16 gradient). Only used to decide
# whether a naive case can run at all.
NAIVE_BYTES_PER_ELEMENT = 20


# ---------------------------------------------------------------------------------------------
# Worker side (runs in a subprocess)
# ---------------------------------------------------------------------------------------------


def _make_inputs(tokens, vocab, device):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(tokens, vocab, generator=g, dtype=torch.bfloat16, device=device).mul_(2.0)
    student = torch.randn(tokens, vocab, generator=g, dtype=torch.bfloat16, device=device).mul_(2.0)
    return student.requires_grad_(True), teacher


def _device(choice) -> str:
    """--device auto: cuda when available (the default), else cpu."""
    import torch

    if choice in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    return choice


def _chunk_arg(value):
    return None if value == "none" else (value if value == "auto" else int(value))


def _runner(impl, chunk_tokens):
    """impl: "naive", "ours" (chunk_tokens from --chunk-tokens) or "ours@<chunk_tokens>"."""
    import torch
    import torch.nn.functional as F

    from nemo_neo.distill import KDLossConfig, distillation_loss

    if impl.startswith("ours"):
        chunk_tokens = impl.partition("@")[2] or chunk_tokens
        kwargs = {} if chunk_tokens == "default" else {"chunk_tokens": _chunk_arg(chunk_tokens)}
        config = KDLossConfig(kind="forward_kl", **kwargs)

        def run(student, teacher):
            out = distillation_loss(student, teacher, config)
            (out.loss_sum / out.num_tokens).backward()

    else:
        def run(student, teacher):
            log_q = F.log_softmax(student.float(), dim=-1)
            log_p = F.log_softmax(teacher.float(), dim=-1)
            F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").backward()

    def call(student, teacher):
        student.grad = None
        run(student, teacher)
        if student.is_cuda:
            torch.cuda.synchronize()

    return call


def _profiler_peak(fn) -> int:
    """Peak live bytes allocated through PyTorch's CPU allocator while fn() runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def worker_memory(args) -> dict:
    device = _device(args.device)
    call = _runner(args.impl, args.chunk_tokens)
    warm = _make_inputs(16, 256, device)
    call(*warm)
    del warm
    student, teacher = _make_inputs(args.tokens, args.vocab, device)
    out = {"impl": args.impl, "tokens": args.tokens, "vocab": args.vocab, "device": device}
    # the probe first, without the profiler in the process's history of this run
    from memory_probe import MemoryProbe

    probe = MemoryProbe(device)
    probe.reset_peak()
    call(student, teacher)
    peak = probe.growth()
    if device == "cuda":
        out["cuda_peak_bytes"] = out["peak_bytes"] = peak
        return out
    out["rss_peak_bytes"], out["rss_method"] = peak, probe.method()
    student.grad = None
    out["tensor_peak_bytes"] = _profiler_peak(lambda: call(student, teacher))
    out["peak_bytes"] = out["tensor_peak_bytes"]
    return out


def worker_time(args) -> dict:
    device = _device(args.device)
    impls = args.impls.split(",")
    calls = {impl: _runner(impl, args.chunk_tokens) for impl in impls}
    student, teacher = _make_inputs(args.tokens, args.vocab, device)
    for call in calls.values():  # warm-up
        call(student, teacher)
    seconds = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl, call in calls.items():
            start = time.perf_counter()
            call(student, teacher)
            seconds[impl].append(time.perf_counter() - start)
    return {"seconds": seconds}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _subprocess(argv, timeout) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,4096,8192")
    p.add_argument("--vocab", default="49152,128256")
    p.add_argument("--chunk-tokens", default="default",
                   help="KDLossConfig.chunk_tokens for ours: an int, 'auto', 'none', or 'default' (the config default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-chunks", default=None, help="time ours at these chunk_tokens values (comma-separated)")
    p.add_argument("--naive-mem-fraction", type=float, default=0.6,
                   help="skip a naive case whose estimated peak + inputs exceed this share of physical memory")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the logits live (auto: cuda when available, else cpu)")
    # internal: worker mode
    p.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--impls", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        args.tokens, args.vocab = int(args.tokens), int(args.vocab)
        result = worker_memory(args) if args.worker == "memory" else worker_time(args)
        print(json.dumps(result))
        return

    import torch

    from nemo_neo.distill import KDLossConfig
    from nemo_neo.recipes.throughput import machine

    cuda = _device(args.device) == "cuda"
    phys = (torch.cuda.get_device_properties(0).total_memory if cuda
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    chunk = args.chunk_tokens if args.chunk_tokens != "default" else KDLossConfig().chunk_tokens
    result = {
        "machine": torch.cuda.get_device_name(0) if cuda else f"{machine()['cpu']}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        **({"cuda": torch.version.cuda} if cuda else {}),
        "threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
        "dtype": "bfloat16 logits, fp32 math",
        "ours_chunk_tokens": chunk,
        "memory_metric": "cuda max_memory_allocated growth" if cuda else "tensor_peak_bytes (profiler allocator events)",
        "goal": "ours/naive peak <= 0.2, time <= 1.1",
        "cases": [],
    }
    common = ["--chunk-tokens", args.chunk_tokens, "--device", "cuda" if cuda else "cpu"]
    for tokens in map(int, args.tokens.split(",")):
        for vocab in map(int, args.vocab.split(",")):
            case = {"tokens": tokens, "vocab": vocab}
            naive_estimate = (NAIVE_BYTES_PER_ELEMENT + 4) * tokens * vocab  # + the two bf16 inputs
            impls = ["ours", "naive"]
            if naive_estimate > args.naive_mem_fraction * phys:
                impls = ["ours"]
                case["naive_skipped"] = (
                    f"estimated naive peak + inputs {naive_estimate / 2**30:.1f} GiB > "
                    f"{args.naive_mem_fraction:.0%} of {phys / 2**30:.1f} GiB physical memory"
                )
            size = ["--tokens", str(tokens), "--vocab", str(vocab)]
            if args.sweep_chunks:
                impls = [f"ours@{c}" for c in args.sweep_chunks.split(",")] + impls[1:]
                timing = _subprocess(["--worker", "time", "--impls", ",".join(impls), "--repeats",
                                      str(args.repeats), *size, *common], args.timeout)
                case["seconds"] = {k: round(_median(v), 4) for k, v in timing["seconds"].items()}
                case["seconds_min"] = {k: round(min(v), 4) for k, v in timing["seconds"].items()}
                print(json.dumps(case), file=sys.stderr, flush=True)
                result["cases"].append(case)
                continue
            for impl in impls:
                mem = _subprocess(["--worker", "memory", "--impl", impl, *size, *common], args.timeout)
                case[f"{impl}_peak_bytes"] = mem["peak_bytes"]
                for key in ("rss_peak_bytes", "tensor_peak_bytes", "cuda_peak_bytes"):
                    if key in mem:
                        case[f"{impl}_{key}"] = mem[key]
            timing = _subprocess(["--worker", "time", "--impls", ",".join(impls), "--repeats", str(args.repeats),
                                  *size, *common], args.timeout)
            for impl, secs in timing["seconds"].items():
                case[f"{impl}_seconds"] = round(_median(secs), 4)
                case[f"{impl}_seconds_min"] = round(min(secs), 4)
                case[f"{impl}_seconds_all"] = [round(s, 4) for s in secs]
            if "naive" in impls:
                case["peak_ratio"] = round(case["ours_peak_bytes"] / case["naive_peak_bytes"], 4)
                if "ours_rss_peak_bytes" in case:
                    case["rss_peak_ratio"] = round(case["ours_rss_peak_bytes"] / case["naive_rss_peak_bytes"], 4)
                case["time_ratio"] = round(case["ours_seconds"] / case["naive_seconds"], 4)
            print(json.dumps(case), file=sys.stderr, flush=True)
            result["cases"].append(case)
    compared = [c for c in result["cases"] if "peak_ratio" in c]
    if not args.sweep_chunks:
        result["memory_goal_met"] = all(c["peak_ratio"] <= 0.2 for c in compared)
        result["time_goal_met"] = all(c["time_ratio"] <= 1.1 for c in compared)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
