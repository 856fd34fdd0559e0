#!/usr/bin/env python
"""Per-rank peak memory and step time of KD training with each scale feature on and off, as ratios
to the plain fp32 run of the same layout: at DP=2 megatron's distributed optimizer, bf16 parameters
with fp32 main params and activation recompute (selective, full); at TP=2 sequence parallelism.
One torchrun launch (2 ranks) per setting, so each peak is that setting's own.

    python benchmarks/train_scale.py --pair DIR [--steps 6]   # DIR holds student/ and teacher/ checkpoints

Per rank: the bytes of the optimizer's state tensors; from `nemo_neo.train.memory_probe.LiveTensorBytes`
over two steps of a Trainer in a process that holds only the pair, the live bytes that persist
after a step (weights, grads, optimizer state), what forward + backward add on top of them
(activations, logits, loss buffers) and the live peak (what `nemo-neo-plan` predicts); then the
process's peak RSS (interpreter and libraries included) and the median step time of a timed run. Without --pair, a random pair shaped like
SmolLM2-135M (hidden 576, MLP 1536, vocab 49152; 8 heads in 4 groups so that TP=2 divides them): the
30-layer teacher and a 15-layer student (needs no tokenizer). Prints a markdown table.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {  # the first setting of each layout is its baseline
    "DP=2 baseline (fp32, plain optimizer)": {}, "DP=2 distributed optimizer": {"distributed": True},
    "DP=2 bf16 + fp32 main params": {"bf16": True}, "DP=2 bf16 + distributed optimizer": {"bf16": True, "distributed": True},
    "DP=2 recompute selective (core_attn, mlp)": {"recompute": "selective"}, "DP=2 recompute full": {"recompute": "full"},
    "TP=2 baseline": {"tp": 2}, "TP=2 sequence parallel": {"tp": 2, "sp": True},
}


def worker(args):
    from nemo_neo import enable_compat

    enable_compat()
    import torch

    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.distill.objective import kd_loss_fn
    from nemo_neo.parallel import ParallelConfig, destroy, initialize
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import TrainConfig, Trainer, peak_memory_bytes
    from nemo_neo.train.memory_probe import LiveTensorBytes
    from nemo_neo.train.optim import OptimConfig

    setting = json.loads(args.setting)
    ctx = initialize(ParallelConfig(tensor_parallel=setting.get("tp", 1), sequence_parallel=setting.get("sp", False)))
    dtype = torch.bfloat16 if setting.get("bf16") else torch.float32
    recompute = setting.get("recompute", "none")
    pair, arch = build_pair(ctx, Path(args.pair) / "student", Path(args.pair) / "teacher", dtype=dtype,
                            recompute=recompute, recompute_modules=("core_attn", "mlp"))
    rows = torch.randint(0, arch.vocab_size, (64, args.seq + 1), generator=torch.Generator().manual_seed(0))
    tp_group = ctx.tp_group if ctx.tp_size > 1 else None

    def trainer(steps, run_dir):
        cfg = TrainConfig(steps=steps, global_batch_size=4, micro_batch_size=2, save_every=10**6, eval_every=10**6,
                          optim=OptimConfig(lr=1e-4, use_distributed_optimizer=bool(setting.get("distributed"))))
        return Trainer(ctx, pair, arch, kd_loss_fn(KDLossConfig(), tp_group), rows, cfg, run_dir, "bench",
                       checkpoint_module=pair.student)

    # The probe first, in a process that holds nothing but the pair: two steps of a Trainer under
    # LiveTensorBytes. The optimizer step is wrapped to split each step's peak into what persists
    # (weights, grads, optimizer state: live bytes after step 1) and what forward + backward add on
    # top in step 2 (activations, logits, loss buffers: what recompute and SP change); the optimizer
    # step's own transient (e.g. the distributed optimizer's gathers) is kept apart.
    probe = trainer(2, args.run_dir + "_probe")
    marks, optimizer_step = [], probe.optimizer.step

    def marked_step():
        forward_backward_peak, forward_backward_op = live.peak, live.peak_op
        live.peak = live.current
        result = optimizer_step()
        marks.append({"forward_backward_peak": forward_backward_peak, "peak_op": forward_backward_op,
                      "optimizer_peak": live.peak,
                      "after_step": live.current})
        live.peak = live.current  # the next step's forward starts its own peak
        return result

    probe.optimizer.step = marked_step
    with LiveTensorBytes() as live:
        probe.fit()
    inner = [getattr(o, "optimizer", o) for o in getattr(probe.optimizer, "chained_optimizers", [probe.optimizer])]
    optimizer_bytes = sum(t.numel() * t.element_size() for o in inner for s in o.state.values()
                          for t in s.values() if torch.is_tensor(t))
    state, second = marks[0]["after_step"], marks[1]
    del probe
    history = trainer(args.steps, args.run_dir).fit()["history"]
    tokens = 4 * args.seq
    step_s = statistics.median(tokens / h["tokens_per_s"] for h in history[1:])  # after the warm-up step
    figures = {"peak": peak_memory_bytes(), "live": max(second["forward_backward_peak"], second["optimizer_peak"]),
               "state": state, "optimizer_state": optimizer_bytes, "activations": second["forward_backward_peak"] - state,
               "optimizer_transient": second["optimizer_peak"] - state, "forward_backward_peak_op": second["peak_op"],
               "step_s": step_s}
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, figures)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(out))
    destroy()


def random_pair(out: Path) -> Path:
    from nemo_neo import enable_compat

    enable_compat()
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    base = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)
    for name, layers in (("teacher", 30), ("student", 15)):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", num_hidden_layers=layers, **base))
        model.save_pretrained(out / f"hf_{name}")
        convert_hf_to_neo(out / f"hf_{name}", out / name)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--only", help="comma-separated words; run the settings whose label contains one (baselines always run)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    tmp = Path(tempfile.mkdtemp(prefix="train_scale_"))
    pair = args.pair or str(random_pair(tmp / "pair"))
    results = {}
    wanted = args.only.split(",") if args.only else None
    for label, setting in SETTINGS.items():
        if wanted and "baseline" not in label and not any(w in label for w in wanted):
            continue
        out = tmp / f"{len(results)}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", __file__,
               "--worker", "--pair", pair, "--steps", str(args.steps), "--seq", str(args.seq),
               "--setting", json.dumps(setting), "--run-dir", str(tmp / f"run{len(results)}"), "--out", str(out)]
        run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        for run_dir in tmp.glob(f"run{len(results)}*"):  # its checkpoints: GBs per setting, kept by nothing
            shutil.rmtree(run_dir)
        if run.returncode:
            sys.exit(f"error: setting {label!r} failed:\n{run.stderr[-3000:]}")
        results[label] = json.loads(out.read_text())
        print(f"{label}: {results[label]}", file=sys.stderr, flush=True)
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    print("| setting | optimizer state | ratio | state (weights+grads+optimizer) | ratio | forward+backward on top "
          "| ratio | live peak | ratio | peak RSS | ratio | step time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    for label, ranks in results.items():
        if "baseline" in label:
            base = ranks
        cells = []
        for key in ("optimizer_state", "state", "activations", "live", "peak"):
            mine, theirs = max(r[key] for r in ranks), max(r[key] for r in base)
            cells += [f"{mine / 2**20:.0f} MiB", f"{mine / theirs:.3f}"]
        step = statistics.mean(r["step_s"] for r in ranks) / statistics.mean(r["step_s"] for r in base)
        print(f"| {label} | {' | '.join(cells)} | {step:.3f} |")
    print(f"(raw figures: {tmp / 'results.json'})")


if __name__ == "__main__":
    main()
