"""torchrun worker: one KD forward+backward (student + frozen teacher on the same pipeline stages)
at a given TP/PP; writes the loss and the student's full (gathered) gradients.

    torchrun --nproc_per_node N tests/workers/kd_worker.py --student S --teacher T --out O --tp T --pp P --kind K
"""

import argparse
from pathlib import Path

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.checkpoint.native import gather_stage_tensors  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.distill.objective import kd_loss_fn  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.parallel.reduce import merge_stage_dicts  # noqa: E402
from nemo_neo.recipes.distill import build_pair  # noqa: E402
from nemo_neo.train.schedule import run_microbatches, wrap_ddp  # noqa: E402


def random_batches(vocab_size: int, count: int) -> list[dict]:
    """`count` seeded micro-batches of 2 x 10 tokens, ~20% of them not counted (loss_mask 0)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab_size, (2, 11), generator=g)
        mask = (torch.rand(2, 10, generator=g) > 0.2).float()
        batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
    return batches


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--kind", default="forward_kl")
    args = p.parse_args()
    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    pair, arch = build_pair(ctx, args.student, args.teacher)
    pair.config.calculate_per_token_loss = True
    ddp = wrap_ddp(pair)
    batches = random_batches(arch.vocab_size, 3)
    loss_config = KDLossConfig(kind=args.kind, temperature=2.0, alpha=0.3, t2_scaling=True, chunk_tokens=7)
    reports = run_microbatches(ddp, batches, kd_loss_fn(loss_config, ctx.tp_group if ctx.tp_size > 1 else None),
                               adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
    student = pair.student
    assert all(p.grad is None and not p.requires_grad for p in pair.teacher.parameters()), "teacher got gradients"
    grads = gather_stage_tensors(
        {n: p.main_grad for n, p in student.named_parameters() if not (arch.tie_embeddings and n == "output_layer.weight")},
        arch, ctx)
    everything = merge_stage_dicts(grads, ctx)
    if ctx.is_last_stage and ctx.tp_rank == 0:
        total = sum(r["loss_sum"].double() for r in reports) / sum(r["tokens"].double() for r in reports)
        torch.save({"loss": total}, Path(args.out) / "loss.pt")
    if ctx.is_main:
        torch.save(everything, Path(args.out) / "grads.pt")
    destroy()


if __name__ == "__main__":
    main()
