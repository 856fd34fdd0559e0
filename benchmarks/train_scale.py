#!/usr/bin/env python
"""Per-rank peak memory and step time of KD training at DP=2 with each scale feature on and off
(megatron's distributed optimizer, bf16 parameters with fp32 main params), as ratios to the plain
fp32 DP=2 run. One torchrun launch (2 ranks) per setting, so each peak RSS is that setting's own.

    python benchmarks/train_scale.py --pair DIR [--steps 6]   # DIR holds student/ and teacher/ checkpoints

Without --pair, a random pair shaped like SmolLM2-135M's half-depth student (15 layers) and the
full teacher is built (needs no tokenizer). Prints a markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {"baseline (fp32, plain optimizer)": {}, "distributed optimizer": {"distributed": True},
            "bf16 + fp32 main params": {"bf16": True}, "bf16 + distributed optimizer": {"bf16": True, "distributed": True}}


def worker(args):
    from nemo_neo import enable_compat

    enable_compat()
    import torch

    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.distill.objective import kd_loss_fn
    from nemo_neo.parallel import ParallelConfig, destroy, initialize
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import TrainConfig, Trainer, peak_memory_bytes
    from nemo_neo.train.optim import OptimConfig

    ctx = initialize(ParallelConfig())
    setting = json.loads(args.setting)
    dtype = torch.bfloat16 if setting.get("bf16") else torch.float32
    pair, arch = build_pair(ctx, Path(args.pair) / "student", Path(args.pair) / "teacher", dtype=dtype)
    rows = torch.randint(0, arch.vocab_size, (64, args.seq + 1), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=args.steps, global_batch_size=4, micro_batch_size=2, save_every=10**6, eval_every=10**6,
                      optim=OptimConfig(lr=1e-4, use_distributed_optimizer=bool(setting.get("distributed"))))
    trainer = Trainer(ctx, pair, arch, kd_loss_fn(KDLossConfig()), rows, cfg, args.run_dir, "bench",
                      checkpoint_module=pair.student)
    history = trainer.fit()["history"]
    tokens = 4 * args.seq
    step_s = statistics.median(tokens / h["tokens_per_s"] for h in history[1:])  # after the warm-up step
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, {"peak": peak_memory_bytes(), "step_s": step_s})
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(out))
    destroy()


def random_pair(out: Path) -> Path:
    from nemo_neo import enable_compat

    enable_compat()
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    base = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
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
    for label, setting in SETTINGS.items():
        out = tmp / f"{len(results)}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", __file__,
               "--worker", "--pair", pair, "--steps", str(args.steps), "--seq", str(args.seq),
               "--setting", json.dumps(setting), "--run-dir", str(tmp / f"run{len(results)}"), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        results[label] = json.loads(out.read_text())
    base = results[next(iter(SETTINGS))]
    print("| DP=2 setting | rank 0 peak RSS | rank 1 peak RSS | peak ratio (max rank) | step time ratio |")
    print("|---|---|---|---|---|")
    for label, ranks in results.items():
        peak = max(r["peak"] for r in ranks) / max(r["peak"] for r in base)
        step = statistics.mean(r["step_s"] for r in ranks) / statistics.mean(r["step_s"] for r in base)
        print(f"| {label} | {ranks[0]['peak'] / 2**20:.0f} MiB | {ranks[1]['peak'] / 2**20:.0f} MiB | "
              f"{peak:.3f} | {step:.3f} |")


if __name__ == "__main__":
    main()
