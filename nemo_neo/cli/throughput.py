"""Generation throughput of several models (e.g. teacher vs pruned students), as in the paper.

  python tools/throughput_bench.py --model teacher=<ckpt|hf dir> --model depth=<dir> --model width=<dir> \
      --isl-osl 2048,128 128,2048 --batch-sizes 32 64 --num-requests 256 --out runs/throughput

For every ISL/OSL pair it writes the request set in trtllm-bench's dataset format
(out/requests_isl{I}_osl{O}.jsonl), then runs each model x batch size with
  --backend trtllm: `trtllm-bench ... throughput --eos_id -1` (TensorRT-LLM; FP8 checkpoints from
                    tools/export_fp8.py run here), or
  --backend torch:  transformers generate, static KV cache, greedy, EOS disabled so every request
                    gets exactly OSL new tokens (checked), torch.compile/CUDA graphs on GPU; runs on CPU.
--backend auto (default) picks trtllm when `trtllm-bench` is installed. Output: out/results.json
(requests/s, output tokens/s, total tokens/s per model, ISL/OSL, batch size; speedups over the
first model; the machine) and out/throughput.png (grouped bar chart).
"""

import argparse
import json
import sys
from pathlib import Path

from nemo_neo import enable_compat
from nemo_neo.errors import exit_on_user_error
from nemo_neo.recipes.throughput import ThroughputError, parse_pairs, run_study


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model to time: nemo_neo checkpoint or HF dir (repeat; the first is the speedup baseline)")
    p.add_argument("--isl-osl", nargs="+", default=["128,32"], metavar="ISL,OSL", help="input/output length pairs")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--backend", choices=["auto", "torch", "trtllm"], default="auto")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16",
                   help="torch backend: the compute dtype; trtllm: a label (give an FP8 export for fp8)")
    p.add_argument("--device", help="torch backend device (default: cuda when available)")
    p.add_argument("--no-compile", action="store_true", help="torch backend: no torch.compile on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (results.json, throughput.png, request files)")
    args = p.parse_args(argv)
    enable_compat()

    with exit_on_user_error():
        models = {}
        for item in args.model:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ThroughputError(f"--model {item!r} must be NAME=PATH.")
            models[name] = path
        if any(b < 1 for b in args.batch_sizes) or args.num_requests < 1:
            raise ThroughputError("--batch-sizes and --num-requests must be >= 1.")
        result = run_study(models, parse_pairs(args.isl_osl), args.batch_sizes, args.num_requests, args.out,
                           backend=args.backend, precision=args.precision, device=args.device, seed=args.seed,
                           compile=False if args.no_compile else None)
    for row in result["rows"]:
        print(f"{row['model']:>12}  {row['isl']}/{row['osl']}  bs{row['batch_size']}: {row['requests_per_s']:.3f} req/s, "
              f"{row['output_tokens_per_s']:.1f} output tok/s, {row['total_tokens_per_s']:.1f} total tok/s")
    print(json.dumps({"results": str(Path(args.out) / "results.json"), "png": str(Path(args.out) / "throughput.png"),
                      "speedup_vs_first": result["speedup_vs_first"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
