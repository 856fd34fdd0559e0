"""`nemo-neo-preprocess` (also `python tools/preprocess_data.py`): tokenize .jsonl / .txt / Hugging Face
datasets into a Megatron indexed dataset, PREFIX.bin/.idx + PREFIX.json (see `nemo_neo.data.preprocess`).

    nemo-neo-preprocess --input corpus.jsonl --output-prefix data/corpus_text_document \
        --tokenizer path/to/model --workers 4
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

from nemo_neo import enable_compat
from nemo_neo.data.preprocess import preprocess
from nemo_neo.errors import DataFileNotFoundError, exit_on_user_error


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nemo-neo-preprocess", description="Tokenize text into a Megatron indexed dataset (PREFIX.bin/.idx + PREFIX.json).")
    p.add_argument("--input", nargs="+", required=True, help=".jsonl / .txt files or HF save_to_disk directories")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    p.add_argument("--tokenizer", required=True, help="directory with the tokenizer (a HF model or nemo_neo checkpoint)")
    p.add_argument("--json-key", default="text", help="field of each .jsonl line / column of a HF dataset")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the tokenizer's EOS (default: yes)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "int32"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    enable_compat()
    with exit_on_user_error():
        if not Path(args.tokenizer).is_dir():
            raise DataFileNotFoundError(f"tokenizer directory {args.tokenizer} does not exist; pass the model's directory.")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        sidecar = preprocess(args.input, args.output_prefix, tokenizer, json_key=args.json_key, workers=args.workers,
                             append_eod=args.append_eod, dtype=args.dtype, overwrite=args.overwrite,
                             progress=not args.quiet)
    print(json.dumps({k: sidecar[k] for k in ("documents", "tokens", "dtype", "vocab_size", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
