"""Convert checkpoints between Hugging Face (directory or GGUF) and nemo_neo.

  python tools/convert_checkpoint.py hf-to-neo --hf <dir|file.gguf> --out <dir> [--tp N --pp M]
  python tools/convert_checkpoint.py neo-to-hf --ckpt <dir> --out <dir>

A nemo_neo checkpoint stores unsharded tensors, so one checkpoint loads at any TP/PP; --tp/--pp
check that the model can be split that way (heads, groups, FFN and vocab divisible by TP, layers
by PP) so that a bad layout fails here rather than at launch.
"""

import argparse
import json
import sys

from nemo_neo import enable_compat
from nemo_neo.checkpoint.convert import convert_hf_to_neo, convert_neo_to_hf
from nemo_neo.errors import exit_on_user_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-neo", help="Hugging Face directory or GGUF file -> nemo_neo checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors) or a .gguf file")
    a.add_argument("--out", required=True, help="output nemo_neo checkpoint directory (must not exist or be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size the model must support")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the model must support")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    b = sub.add_parser("neo-to-hf", help="nemo_neo checkpoint -> Hugging Face directory")
    b.add_argument("--ckpt", required=True, help="nemo_neo checkpoint directory")
    b.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="cast weights (default: keep)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    enable_compat()

    import torch

    with exit_on_user_error():
        if args.command == "hf-to-neo":
            result = convert_hf_to_neo(args.hf, args.out, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            result = convert_neo_to_hf(args.ckpt, args.out, overwrite=args.overwrite, dtype=dtype)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
