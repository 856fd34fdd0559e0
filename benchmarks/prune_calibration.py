#!/usr/bin/env python
"""Cost of importance calibration vs plain forward passes over the same samples (goal <= 1.15x),
and the time to score and width-prune the real SmolLM2-135M on this machine.

    python benchmarks/prune_calibration.py [--samples 64 --seq 256 --repeats 3]
"""

import argparse
import json
import platform
import statistics
import time

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.checkpoint.native import load_full_state
    from nemo_neo.data import indexed_from_text
    from nemo_neo.parallel import initialize
    from nemo_neo.prune import ImportanceConfig, compute_importance, prune_width
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
    from nemo_neo.train.schedule import run_microbatches

    ckpt = default_teacher_checkpoint()
    ctx = initialize()
    rows = indexed_from_text([], AutoTokenizer.from_pretrained(str(ckpt)), args.seq, train_samples=args.samples,
                             progress=False)[0].rows(args.samples)
    model, arch, _ = load_model(ckpt, ctx)
    model.eval()

    def plain():
        with torch.no_grad():
            for i in range(0, len(rows), args.mbs):
                run_microbatches(model, [{"input_ids": rows[i : i + args.mbs, :-1]}], lambda o, b: (o.sum() * 0.0, {}), forward_only=True)

    config = ImportanceConfig(num_samples=args.samples, micro_batch_size=args.mbs)
    times = {"plain_forward": [], "calibration": []}
    scores = None
    plain()  # warm-up
    for _ in range(args.repeats):  # alternate so machine noise hits both alike
        t = time.perf_counter()
        plain()
        times["plain_forward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = compute_importance(model, arch, ctx, rows, config)
        times["calibration"].append(time.perf_counter() - t)
    _, state, _ = load_full_state(ckpt)
    t = time.perf_counter()
    prune_width(arch, state, scores, {"hidden_size": 432, "ffn_hidden_size": 768})
    prune_seconds = time.perf_counter() - t
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "samples": args.samples, "seq": args.seq,
        "plain_forward_s": round(med["plain_forward"], 2), "calibration_s": round(med["calibration"], 2),
        "ratio_calibration_over_forward": round(med["calibration"] / med["plain_forward"], 3),
        "width_prune_s": round(prune_seconds, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
