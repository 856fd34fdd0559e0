"""Command line for the NeMo integration (run in an environment with nemo_neo[nemo]).

    python -m nemo_neo.nemo to-nemo  NEO_CKPT  NEMO_OUT        # nemo_neo -> NeMo 2
    python -m nemo_neo.nemo to-neo   NEMO_CKPT NEO_OUT         # NeMo 2 -> nemo_neo
    python -m nemo_neo.nemo prune    NEMO_CKPT NEMO_OUT --target hidden_size=1024,num_layers=12 \\
        --calib-data text.txt [--num-samples 1024 --seq-length 256] [--drop 3,7] [--tp 2 --pp 1]
"""

from __future__ import annotations

import argparse
import json
import sys

from nemo_neo import _compat
from nemo_neo.errors import exit_on_user_error
from nemo_neo.prune.width import parse_target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nemo_neo.nemo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("to-nemo", "nemo_neo checkpoint -> NeMo 2 checkpoint (llm.LlamaModel)"),
                           ("to-neo", "NeMo 2 checkpoint -> nemo_neo checkpoint")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("source")
        p.add_argument("out")
        p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("prune", help="Minitron pruning: NeMo 2 checkpoint -> pruned NeMo 2 checkpoint")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--target", required=True, help="e.g. hidden_size=1024,ffn_hidden_size=3072,num_layers=12")
    p.add_argument("--calib-data", nargs="*", default=None, help="text files for activation importance")
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--drop", default=None, help="layers to drop instead of searching, e.g. 3,7")
    # The output checkpoint is TP/PP-independent; these only refuse a target that cannot be sharded so.
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism the pruned model must fit")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallelism the pruned model must fit")
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    _compat.enable_nemo()  # before NeMo's first import
    import nemo_neo.nemo as integration  # imports NeMo (slow): only after the arguments parse

    with exit_on_user_error():
        result = _run(integration, args)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _run(integration, args) -> dict:
    if args.command == "to-nemo":
        result = {"out": str(integration.neo_to_nemo(args.source, args.out, overwrite=args.overwrite))}
    elif args.command == "to-neo":
        result = integration.nemo_to_neo(args.source, args.out, overwrite=args.overwrite)
    else:
        drop = [int(x) for x in args.drop.split(",")] if args.drop else None
        result = integration.prune_nemo_checkpoint(
            args.source, args.out, parse_target(args.target), overwrite=args.overwrite, drop=drop,
            calib_data=args.calib_data, num_samples=args.num_samples, seq_length=args.seq_length, tp=args.tp, pp=args.pp)
    return result


if __name__ == "__main__":
    sys.exit(main())
