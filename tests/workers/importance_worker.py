"""torchrun worker: importance scores of a checkpoint at a given TP/PP, saved by rank 0.

    torchrun --nproc_per_node N tests/workers/importance_worker.py --ckpt C --out F --tp T --pp P
"""

import argparse

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.checkpoint.load import load_model  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.prune.importance import ImportanceConfig, compute_importance, save_scores  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch-agg", default="l2")
    args = p.parse_args()
    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    model, arch, _ = load_model(args.ckpt, ctx)
    rows = torch.randint(0, arch.vocab_size, (10, 13), generator=torch.Generator().manual_seed(0))
    scores = compute_importance(model, arch, ctx, rows, ImportanceConfig(num_samples=10, micro_batch_size=3, batch_agg=args.batch_agg))
    if ctx.is_main:
        save_scores(scores, args.out)
    destroy()


if __name__ == "__main__":
    main()
