"""Export a checkpoint for TensorRT-LLM / vLLM: FP8 (nvidia-modelopt PTQ) or BF16.

  python tools/export_fp8.py --ckpt <nemo_neo ckpt | HF dir> --calib-data <text.txt|.jsonl> --out <dir> [--kv-cache-fp8]
  python tools/export_fp8.py --ckpt <dir> --precision bf16 --out <dir>

FP8: per-tensor E4M3 weights and activations calibrated (max) on --calib-samples windows of
--calib-seq-len tokens from --calib-data; embeddings and lm_head stay BF16. The output is modelopt's
unified Hugging Face checkpoint (float8_e4m3fn weights + weight_scale/input_scale,
hf_quant_config.json with quant_algo FP8) that `trtllm-bench --model_path`, TensorRT-LLM's
`LLM(model=<dir>)`, vLLM and SGLang load. Then e.g.:

  trtllm-bench --model <name> --model_path <out> throughput --dataset requests.jsonl --backend pytorch

An existing non-empty --out is refused unless --overwrite; output appears atomically.
"""

import argparse
import json
import sys

from nemo_neo import enable_compat
from nemo_neo.checkpoint.atomic import check_output_dir
from nemo_neo.errors import exit_on_user_error
from nemo_neo.export.fp8 import export_bf16, export_fp8
from nemo_neo.export.hf import ExportError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="nemo_neo checkpoint or Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--precision", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--calib-data", nargs="+", help="calibration text: .txt files or .jsonl with a \"text\" field (fp8)")
    p.add_argument("--calib-samples", type=int, default=64, help="number of calibration windows (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size")
    p.add_argument("--kv-cache-fp8", action="store_true", help="also calibrate an FP8 KV cache (kv_cache_quant_algo FP8)")
    p.add_argument("--tokenizer", help="directory with tokenizer files, if the checkpoint has none")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = p.parse_args(argv)
    enable_compat()

    with exit_on_user_error():
        check_output_dir(args.out, args.overwrite)  # refuse before any slow import
        if args.precision == "bf16":
            result = export_bf16(args.ckpt, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer)
        else:
            if not args.calib_data:
                raise ExportError("--precision fp8 needs --calib-data <text file> to calibrate activation scales.")

            result = export_fp8(args.ckpt, args.out, args.calib_data, calib_samples=args.calib_samples,
                                calib_seq_len=args.calib_seq_len, batch_size=args.batch_size,
                                kv_cache_fp8=args.kv_cache_fp8, overwrite=args.overwrite,
                                tokenizer=args.tokenizer, device=args.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
