#!/usr/bin/env python
"""LM heads + KD loss, forward + backward: fused (no logits) vs our unfused vs naive vs torchtune's.

Every implementation gets the same inputs in --dtype: student hidden [tokens, h] and head weight
[V, h] (both requiring grad), teacher hidden and weight [V, h] (frozen), and ends with the gradients
of the student hidden states and weight, for forward KL (T = 1), the Minitron default:

    fused      nemo_neo.distill.fused.fused_distillation_loss (KDLossConfig(fused=True), chunk "auto")
    ours       logits = hidden @ W.T (in --dtype, autograd), teacher logits under no_grad, then
               nemo_neo.distill.distillation_loss (chunked, in place) -- the unfused path
    naive      the same logits, F.kl_div(F.log_softmax(s.float()), F.log_softmax(t.float())) -- fp32
    torchtune  torchtune 0.6.1's ForwardKLWithChunkedOutputLoss(num_output_chunks=8) on logits made
               per sequence chunk, as its KD recipe does (loaded standalone from the wheel's
               torchtune/modules/loss/kd_losses.py: `pip download --no-deps torchtune==0.6.1 -d DIR`)

Settings (--settings): "plain" -- the student weight's gradient ends in `.grad`, the loss is the
token mean; "megatron" -- as under megatron-core's DistributedDataParallel (how nemo_neo trains):
the weight has an fp32 `main_grad` (allocated before the measurement, like DDP's grad buffer) and a
hook that adds `.grad` into it and frees `.grad`, so every implementation's weight gradient ends in
main_grad (the fused loss accumulates into it directly, see nemo_neo.distill.fused._main_grad), and
the loss back-propagated is the token SUM, as megatron's calculate_per_token_loss does (`_runner`).

--dtype (default fp32): the dtype of hidden states, weights and logits; the loss math is fp32 in
every implementation. bf16 is what training uses, but on a CPU without AVX-512 bf16 / AMX, torch
has no fast bf16 GEMM and falls back to a scalar cpublas loop that is pathologically slow when the
vocab is the reduction dimension (`g @ W`): a single 2048 x 49152 x 576 case did not finish in
25 min (BENCHMARKS.md). Such times measure that fallback, not the loss, so CPU runs use fp32 (MKL
for every product). --share-teacher-weight makes the teacher's weight the student's tensor
(detached), to fit large vocab x hidden cases in memory: it changes neither the arithmetic nor the
measured growth (the inputs are allocated before the measurement).

Memory: growth of live PyTorch CPU-allocator bytes during forward + backward, from the profiler's
allocator events (the method of benchmarks/kd_loss_memory.py), one fresh subprocess per
(case, setting, implementation), after a warm-up. Gradients are part of it for every implementation.
Implementations whose estimated process size (inputs + weight gradient + BYTES_PER_LOGIT per
student logit, `_estimated_bytes`) exceeds --max-gb are not run, and the JSON says so.
Time: one subprocess per (case, setting) runs the implementations alternately, --repeats rounds:
per implementation the median and the fastest; fused/ours as the median of the per-round ratios
and as fastest/fastest. --out is rewritten (atomically) after every measurement, so a run that is
stopped keeps what it measured.

    python benchmarks/kd_fused_head.py --torchtune-dir /tmp/tt [--cases 2048x49152x576,...]
        [--settings plain,megatron] [--dtype fp32] [--fused-chunks 64,128,256] [--out kd_fused_head.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from kd_loss_memory import _median, _profiler_peak  # noqa: E402

# estimated peak growth per student logit (tokens x vocab) beyond the weight gradient: bf16 from the
# 2026-12-01 measurement (+ margin); fp32 from the 2026-12-03 fp32 one (BENCHMARKS.md, + margin)
BYTES_PER_LOGIT = {"bf16": {"naive": 26, "torchtune": 16, "ours": 8, "fused": 0},
                   "fp32": {"naive": 20, "torchtune": 18, "ours": 12, "fused": 0}}
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _estimated_bytes(impl, tokens, vocab, hidden, setting, dtype, shared) -> float:
    """What the process must hold: inputs (+ fp32 main_grad), the weight gradient, the logits."""
    size = 2 if dtype == "bf16" else 4
    weight = vocab * hidden
    inputs = (1 if shared else 2) * weight * size + 2 * tokens * hidden * size
    if setting == "megatron":
        inputs += weight * 4
    # d W: `.grad` in the weight's dtype (ours, naive, torchtune; also fused "plain", as an fp32
    # accumulator); fused "megatron" adds into main_grad; fused chunk buffers are < 200 MiB
    grad = weight * (4 if impl == "fused" else size) if setting == "plain" or impl != "fused" else 0
    return inputs + grad + BYTES_PER_LOGIT[dtype][impl] * tokens * vocab + (2 << 27 if impl == "fused" else 0)


def _subprocess(argv, timeout, on_line=None) -> dict:
    """Run this script's worker mode in a fresh process; each stdout line is a JSON result so far
    (passed to `on_line` as it comes, so that partial timings are saved), the last one the final."""
    import subprocess
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=REPO)
        # a timer, not a check between lines: a worker that hangs prints nothing
        timer, last = threading.Timer(timeout, proc.kill), None
        timer.start()
        try:
            for line in proc.stdout:
                last = json.loads(line)
                if on_line is not None:
                    on_line(last)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0 or last is None:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}"
                               f"{', killed after --timeout' if proc.returncode == -9 else ''}):\n{err.read()[-3000:]}")
    return last


def _inputs(tokens, vocab, hidden, dtype, shared):
    """Teacher-like student: the student's hidden states and weight are the teacher's plus noise.

    Drawn in fp32, then cast (in place where possible, so that a 128256 x 4096 weight is not held
    twice); with `shared` the teacher's weight is the student's, detached."""
    import torch

    g, dt = torch.Generator().manual_seed(0), getattr(torch, DTYPES[dtype])
    t_hidden = torch.randn(tokens, hidden, generator=g)
    s_hidden = (t_hidden + 0.5 * torch.randn(tokens, hidden, generator=g)).to(dt).requires_grad_(True)
    s_weight = torch.randn(vocab, hidden, generator=g).mul_(2.0 / hidden**0.5)
    t_weight = None if shared else s_weight.to(dt, copy=True)
    s_weight.add_(torch.randn(vocab, hidden, generator=g), alpha=0.5 / hidden**0.5)
    s_weight = s_weight.to(dt).requires_grad_(True)
    return s_hidden, s_weight, t_hidden.to(dt), s_weight.detach() if shared else t_weight


def _as_megatron_ddp(weight):
    """What megatron DDP does to a trained parameter: an fp32 main_grad and a hook adding .grad into it."""
    import torch

    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32)
    weight.grad_added_to_main_grad = False

    def hook(param):
        if param.grad is not None and not param.grad_added_to_main_grad:
            param.main_grad.add_(param.grad)
        param.grad = None

    weight.register_post_accumulate_grad_hook(hook)
    return weight


def _torchtune_loss(directory):
    path = Path(directory) / "torchtune" / "modules" / "loss" / "kd_losses.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: unpack torchtune 0.6.1's wheel into --torchtune-dir "
                         "(pip download --no-deps torchtune==0.6.1 -d DIR && cd DIR && unzip torchtune-*.whl)")
    spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ForwardKLWithChunkedOutputLoss(num_output_chunks=8)


def _runner(impl, torchtune_dir, loss_sum=False):
    """forward + backward of `impl`; with `loss_sum` the loss is the sum over tokens, not the mean.

    Under megatron (calculate_per_token_loss, how nemo_neo trains: train.loop) the schedule
    back-propagates the loss SUM with grad_output 1 and divides the gradients by the global token
    count later; the fused loss relies on that to add d W to main_grad in forward. A mean would
    send grad_output 1 / tokens, for which it must recompute the chunks in backward (exact, but a
    second pass over the heads): the "megatron" setting therefore measures the sum."""
    import torch
    import torch.nn.functional as F

    from nemo_neo.distill import KDLossConfig, distillation_loss
    from nemo_neo.distill.fused import HeadInputs, fused_distillation_loss

    name, _, chunk = impl.partition("@")
    if name == "fused":
        config = KDLossConfig(kind="forward_kl", fused=True, **({"chunk_tokens": int(chunk)} if chunk else {}))

        def loss(sh, sw, th, tw):
            out = fused_distillation_loss(HeadInputs(sh, sw), HeadInputs(th, tw), config)
            return out.loss_sum if loss_sum else out.loss_sum / out.num_tokens
    elif name == "ours":
        config = KDLossConfig(kind="forward_kl")

        def loss(sh, sw, th, tw):
            with torch.no_grad():
                teacher = th @ tw.t()
            out = distillation_loss(sh @ sw.t(), teacher, config)
            return out.loss_sum if loss_sum else out.loss_sum / out.num_tokens
    elif name == "naive":

        def loss(sh, sw, th, tw):
            with torch.no_grad():
                log_p = F.log_softmax((th @ tw.t()).float(), dim=-1)
            log_q = F.log_softmax((sh @ sw.t()).float(), dim=-1)
            return F.kl_div(log_q, log_p, log_target=True, reduction="sum" if loss_sum else "batchmean")
    elif name == "torchtune":
        peer = _torchtune_loss(torchtune_dir)

        def loss(sh, sw, th, tw):
            n = peer.num_output_chunks
            with torch.no_grad():
                teacher = [(c @ tw.t()).unsqueeze(0) for c in th.chunk(n)]
            student = [(c @ sw.t()).unsqueeze(0) for c in sh.chunk(n)]
            labels = torch.zeros(1, sh.shape[0], dtype=torch.long)  # no ignored token: all counted
            return peer(student, teacher, labels) * (sh.shape[0] if loss_sum else 1)  # its API: a mean
    else:
        raise SystemExit(f"error: unknown implementation {impl!r}")

    def call(sh, sw, th, tw):
        sh.grad = sw.grad = None
        loss(sh, sw, th, tw).backward()

    return call


def worker(args) -> dict:
    tokens, vocab, hidden = map(int, args.case.split("x"))
    megatron = args.setting == "megatron"

    def inputs_for(*size):
        s_hidden, s_weight, t_hidden, t_weight = _inputs(*size, args.dtype, args.share_teacher_weight)
        if megatron:
            _as_megatron_ddp(s_weight)
        return s_hidden, s_weight, t_hidden, t_weight

    if args.worker == "memory":
        call = _runner(args.impl, args.torchtune_dir, megatron)
        call(*inputs_for(64, 512, 32))  # warm-up: library initialisation outside the measurement
        inputs = inputs_for(tokens, vocab, hidden)
        start = time.perf_counter()
        peak = _profiler_peak(lambda: call(*inputs))
        return {"peak_bytes": peak, "seconds": time.perf_counter() - start}
    impls = args.impls.split(",")
    calls = {impl: _runner(impl, args.torchtune_dir, megatron) for impl in impls}
    inputs = inputs_for(tokens, vocab, hidden)
    for call in calls.values():
        call(*inputs)
    seconds = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl, call in calls.items():
            start = time.perf_counter()
            call(*inputs)
            seconds[impl].append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds}), flush=True)  # every round, for the parent to save
    return {"seconds": seconds}


def _ratios(case, fused, ours):
    """fused / ours: memory, time as the median of per-round ratios, and fastest / fastest."""
    f, o = case["seconds"][fused], case["seconds"][ours]
    case["peak_fused_over_ours"] = round(case[f"{fused}_peak_MiB"] / case[f"{ours}_peak_MiB"], 3)
    case["time_fused_over_ours_median"] = round(_median([a / b for a, b in zip(f, o)]), 3)
    case["time_fused_over_ours_fastest"] = round(min(f) / min(o), 3)
    if "naive_peak_MiB" in case:
        case["peak_fused_over_naive"] = round(case[f"{fused}_peak_MiB"] / case["naive_peak_MiB"], 4)


def _summarise(case, impls, seconds):
    """Times per implementation (all rounds, median, fastest) and the fused / ours ratios."""
    case["seconds"] = {impl: [round(x, 3) for x in secs] for impl, secs in seconds.items()}
    for impl, secs in case["seconds"].items():
        case[f"{impl}_s_median"], case[f"{impl}_s_fastest"] = round(_median(secs), 3), round(min(secs), 3)
    for fused in [i for i in impls if i.startswith("fused")] if "ours" in impls else []:
        if fused == "fused":
            _ratios(case, fused, "ours")
        else:  # a chunk sweep
            per_round = [a / b for a, b in zip(case["seconds"][fused], case["seconds"]["ours"])]
            case.setdefault("per_chunk", {})[fused] = {
                "peak_MiB": case[f"{fused}_peak_MiB"], "time_over_ours_median": round(_median(per_round), 3),
                "time_over_ours_fastest": round(min(case["seconds"][fused]) / min(case["seconds"]["ours"]), 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="2048x49152x576,8192x49152x576,2048x128256x4096",
                   help="tokens x vocab x hidden, comma-separated")
    p.add_argument("--impls", default="fused,ours,naive,torchtune")
    p.add_argument("--settings", default="megatron,plain", help="megatron (DDP main_grad) and/or plain")
    p.add_argument("--fused-chunks", default=None, help="instead: fused at these chunk_tokens (and ours)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="hidden states, weights and logits (default fp32: CPU bf16 GEMMs, see above)")
    p.add_argument("--share-teacher-weight", action="store_true",
                   help="the teacher's weight is the student's (detached): saves a weight of memory")
    p.add_argument("--torchtune-dir", default="/tmp/tt")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds; 0 = none (the only time is that of the profiled memory run, one sample)")
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="skip implementations whose estimated process size (_estimated_bytes) exceeds this many GiB")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="plain", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = worker(args)
        if args.worker == "memory":  # the time worker has printed its last round already
            print(json.dumps(result))
        return

    import torch

    from nemo_neo.distill.fused import FUSED_AUTO_CHUNK_ELEMENTS
    from nemo_neo.recipes.throughput import machine

    result = {"machine": f"{machine()['cpu']}, {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtype": f"{args.dtype} hidden/weights/logits, fp32 loss math",
              "share_teacher_weight": args.share_teacher_weight, "argv": sys.argv[1:],
              "fused_auto_chunk_elements": FUSED_AUTO_CHUNK_ELEMENTS["cpu"], "load_before": os.getloadavg(),
              "goal": "fused/ours peak <= 0.25 at time <= 1.0", "cases": []}

    def save():  # after every measurement: a stopped run keeps what it measured
        if args.out:
            tmp = Path(f"{args.out}.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, args.out)

    common = ["--torchtune-dir", args.torchtune_dir, "--dtype", args.dtype]
    common += ["--share-teacher-weight"] if args.share_teacher_weight else []
    for case_name in args.cases.split(","):
        tokens, vocab, hidden = map(int, case_name.split("x"))
        for setting in args.settings.split(","):
            case = {"case": case_name, "setting": setting, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "load_start": os.getloadavg()}
            result["cases"].append(case)
            impls = args.impls.split(",")
            if args.fused_chunks:
                impls = [f"fused@{c}" for c in args.fused_chunks.split(",")] + ["ours"]
            estimate = {i: _estimated_bytes(i.partition("@")[0], tokens, vocab, hidden, setting, args.dtype,
                                            args.share_teacher_weight) / 2**30 for i in impls}
            skipped = {i: f"estimated process size {gib:.1f} GiB > --max-gb {args.max_gb:g}"
                       for i, gib in estimate.items() if gib > args.max_gb}
            if skipped:
                case["skipped"] = skipped
                impls = [i for i in impls if i not in skipped]
            flags = [*common, "--case", case_name, "--setting", setting]
            for impl in impls:
                mem = _subprocess(["--worker", "memory", "--impl", impl, *flags], args.timeout)
                case[f"{impl}_peak_MiB"] = round(mem["peak_bytes"] / 2**20, 1)
                case[f"{impl}_profiled_s"] = round(mem["seconds"], 1)
                case[f"load_after_{impl}_memory"] = os.getloadavg()
                save()
            if args.repeats == 0:
                _summarise(case, impls, {impl: [case[f"{impl}_profiled_s"]] for impl in impls})
            elif impls:

                def on_round(timing, case=case, impls=impls):
                    _summarise(case, impls, timing["seconds"])
                    case["load_after_round"] = os.getloadavg()
                    save()

                _subprocess(["--worker", "time", "--impls", ",".join(impls), "--repeats", str(args.repeats), *flags],
                            args.timeout, on_line=on_round)
            case["load_after"] = os.getloadavg()
            case["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            print(json.dumps(case), file=sys.stderr, flush=True)
            save()
    compared = [c for c in result["cases"] if "peak_fused_over_ours" in c]
    if compared:
        result["memory_goal_met"] = all(c["peak_fused_over_ours"] <= 0.25 for c in compared)
        result["time_goal_met"] = all(c["time_fused_over_ours_median"] <= 1.0 for c in compared)
    print(json.dumps(result, indent=2))
    save()


if __name__ == "__main__":
    main()
