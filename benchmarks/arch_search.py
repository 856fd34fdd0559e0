#!/usr/bin/env python
"""Minitron's architecture search on the real SmolLM2-135M-Instruct teacher (issue 19): every candidate
under a parameter budget pruned by importance and scored by the validation loss (quick score), the
best --top-k distilled for --kd-steps each and scored again (KD score); the time per candidate split
into pruning / quick score / short KD, and whether the two scores rank the candidates alike
(Spearman's rank correlation). The same workflow as the recipe's prune.search and `nemo-neo-prune --search`.

    python benchmarks/arch_search.py [--budget params=100e6 --top-k 3 --kd-steps 10 --out runs/arch_search]

Writes <out>/results.json, results.md, search.png (params vs score, Pareto front) and bench.json
(machine, timings); rerunning with the same --out resumes (finished candidates are kept).
"""

import argparse
import json
import time
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="params=100e6")
    p.add_argument("--axes", default="num_layers,hidden_size,ffn_hidden_size,num_attention_heads")
    p.add_argument("--multiple-of", default="hidden_size=64,ffn_hidden_size=256")
    p.add_argument("--max-depth-pruning", type=float, default=0.1)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--kd-steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", default="4,2", help="global,micro batch of the short distillations")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--valid-rows", type=int, default=16)
    p.add_argument("--out", default="runs/arch_search")
    args = p.parse_args()

    from nemo_neo.parallel import initialize
    from nemo_neo.prune.importance import ImportanceConfig
    from nemo_neo.prune.search import parse_budget
    from nemo_neo.prune.width import parse_target
    from nemo_neo.recipes.arch_search import ArchSearch, SearchConfig
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
    from nemo_neo.recipes.methods import MethodConfig
    from nemo_neo.recipes.prune import text_samples
    from nemo_neo.recipes.throughput import machine
    from nemo_neo.train.loop import TrainConfig
    from nemo_neo.train.optim import OptimConfig

    teacher = default_teacher_checkpoint()
    gbs, mbs = (int(x) for x in args.batch.split(","))
    cfg = SearchConfig(budget=parse_budget(args.budget), axes=args.axes.split(","), multiple_of=parse_target(args.multiple_of),
                       max_depth_pruning=args.max_depth_pruning, top_k=args.top_k, kd_steps=args.kd_steps)
    # the recipe's CPU default text (CPython's docs); held-out documents only for validation
    train, valid = text_samples(teacher, [], args.seq, max(args.calib_samples, args.kd_steps * gbs))
    out = Path(args.out)
    train_cfg = TrainConfig(global_batch_size=gbs, micro_batch_size=mbs, optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=1))
    search = ArchSearch(initialize(), cfg, teacher, teacher, train, valid[: args.valid_rows], train.rows(args.calib_samples), out,
                        MethodConfig(method="kd"), train_cfg, ImportanceConfig(num_samples=args.calib_samples))
    start = time.perf_counter()
    result = search.run(out / "winner")
    keys = ("prune_seconds", "quick_seconds", "kd_seconds", "kd_score_seconds")
    bench = {"machine": machine(), "args": vars(args), "wall_seconds": round(time.perf_counter() - start, 1),
             "importance_seconds": result["importance_seconds"], "winner": result["winner"],
             "rank_correlation": result["rank_correlation"],
             "per_candidate": {c["id"]: {k: c.get(k) for k in ("parameters", "quick_score", "kd_score", *keys)}
                               for c in result["candidates"]}}
    (out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    print((out / "results.md").read_text())
    print(json.dumps(bench, indent=2))


if __name__ == "__main__":
    main()
