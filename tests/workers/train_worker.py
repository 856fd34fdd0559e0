"""torchrun worker: distil a student from a teacher on real text with the full training loop;
writes <run_dir>/result.json (loss history, validation before/after) when it finishes.

    torchrun --nproc_per_node N tests/workers/train_worker.py --student S --teacher T --run-dir R --data F [...]
"""

import argparse
import json
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.data import indexed_from_text  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.recipes.distill import distill  # noqa: E402
from nemo_neo.train.loop import TrainConfig  # noqa: E402
from nemo_neo.train.optim import OptimConfig  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    for name in ("--student", "--teacher", "--run-dir", "--data"):
        p.add_argument(name, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--best-metric", default=None)
    p.add_argument("--eval-every", type=int, default=None, help="default: at the last step only")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--gbs", type=int, default=4)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-valid", type=int, default=8)
    p.add_argument("--kind", default="forward_kl")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: LLM-Neo (KD into LoRA adapters of this rank)")
    p.add_argument("--alpha", type=float, default=0.5, help="LLM-Neo: weight of CE in alpha*CE + (1-alpha)*KL")
    p.add_argument("--distributed-optimizer", action="store_true", help="optimizer state sharded over DP ranks")
    args = p.parse_args()
    from transformers import AutoTokenizer

    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    # the recipe's loader: the text tokenized once into the indexed format (beside the run directory, so
    # a killed run and its rerun share it), read back through megatron-core's GPTDataset
    train, valid = indexed_from_text([args.data], tokenizer, args.seq, train_samples=args.steps * args.gbs,
                                     valid_fraction=0.1, max_valid=args.max_valid,
                                     cache_dir=Path(args.run_dir).parent / "data_cache", progress=False)
    cfg = TrainConfig(steps=args.steps, global_batch_size=args.gbs, micro_batch_size=args.mbs,
                      save_every=args.save_every, eval_every=args.eval_every or args.steps,
                      save_keep_last=args.keep_last, save_best_metric=args.best_metric,
                      optim=OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=2,
                                        use_distributed_optimizer=args.distributed_optimizer))
    if args.lora_rank > 0:
        from nemo_neo.peft import LoRAConfig
        from nemo_neo.recipes.llm_neo import llm_neo

        lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        result = llm_neo(ctx, args.student, args.teacher, train, valid, cfg, args.run_dir, lora, alpha=args.alpha)
    else:
        result = distill(ctx, args.student, args.teacher, train, valid, cfg, args.run_dir, KDLossConfig(kind=args.kind))
    if ctx.is_main:
        (Path(args.run_dir) / "result.json").write_text(json.dumps(result, indent=1))
    destroy()


if __name__ == "__main__":
    main()
