"""torchrun worker: the fused KD loss (hidden states x vocab-parallel head weights) vs the unfused one.

    torchrun --nproc_per_node 2 tests/workers/fused_worker.py --out O --tp T --pp P [--sp]
        [--tensors IN.pt] [--pair NAME=STUDENT_CKPT ...] --teacher T_CKPT

--tensors: IN.pt (from tests/distill/test_distill_fused.py) holds full fp64 student/teacher hidden states and
    output weights, labels, loss_mask, the cases {name: KDLossConfig kwargs} and chunk sizes. Every
    rank of the TP group takes its contiguous vocab shard of both weights and computes the fused loss;
    the weight-gradient shards are all-gathered along the vocab. Written to O/tensors.pt as
    {"case|chunk": {loss_sum, loss_sum_per_rank, num_tokens, grad_hidden, grad_weight}}.
--pair: for each student checkpoint a DistillationPair with the teacher at this TP/PP runs the same
    micro-batches through megatron-core's schedule twice, unfused then fused (pair.fused), under
    megatron DDP; O/pair.pt gets {"name|kind|fused": {loss, grads (gathered, every student
    parameter), teacher_grads (None if the teacher got none)}} and "sequence_parallel": whether the
    student's output layer ran under SP (--sp, megatron's sequence parallelism at TP > 1).
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from kd_worker import random_batches  # noqa: E402

from nemo_neo.distill.fused import HeadInputs, fused_distillation_loss  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402

PAIR_KINDS = {
    "forward_kl": dict(kind="forward_kl"),
    "ce_kl": dict(kind="ce_kl", temperature=2.0, alpha=0.3, t2_scaling=True),
}


def gather_along(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def tensor_cases(path, tp_group) -> dict:
    inputs = torch.load(path)
    rank, size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    vocab = inputs["student_weight"].shape[0]
    shard = slice(rank * vocab // size, (rank + 1) * vocab // size)
    results = {}
    for name, kwargs in inputs["cases"].items():
        for chunk in inputs["chunks"]:
            hidden = inputs["student_hidden"].clone().requires_grad_(True)
            weight = inputs["student_weight"][shard].clone().requires_grad_(True)
            teacher = HeadInputs(inputs["teacher_hidden"], inputs["teacher_weight"][shard])
            out = fused_distillation_loss(HeadInputs(hidden, weight), teacher, KDLossConfig(**kwargs, chunk_tokens=chunk),
                                          labels=inputs["labels"], loss_mask=inputs["loss_mask"], tp_group=tp_group)
            (out.loss_sum / out.num_tokens).backward()
            results[f"{name}|{chunk}"] = {
                "loss_sum": out.loss_sum.detach(), "num_tokens": out.num_tokens,
                "loss_sum_per_rank": gather_along(out.loss_sum.detach().reshape(1), 0, tp_group),
                "grad_hidden": hidden.grad, "grad_weight": gather_along(weight.grad, 0, tp_group),
            }
    return results


def pair_cases(args) -> dict:
    from nemo_neo.checkpoint.native import gather_stage_tensors
    from nemo_neo.distill.objective import kd_loss_fn
    from nemo_neo.parallel import ParallelConfig, initialize
    from nemo_neo.parallel.reduce import merge_stage_dicts
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.schedule import run_microbatches, wrap_ddp

    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, sequence_parallel=args.sp))
    tp_group = ctx.tp_group if ctx.tp_size > 1 else None
    results = {}
    for spec in args.pair:
        name, ckpt = spec.split("=", 1)
        pair, arch = build_pair(ctx, ckpt, args.teacher)
        pair.config.calculate_per_token_loss = True
        ddp = wrap_ddp(pair)
        head = getattr(pair.student, "output_layer", None)  # None on a stage without the head
        results["sequence_parallel"] = bool(getattr(head, "sequence_parallel", False))
        batches = random_batches(arch.vocab_size, 2)
        for kind, kwargs in PAIR_KINDS.items():
            for fused in (False, True):
                ddp.zero_grad_buffer()
                pair.fused = fused
                config = KDLossConfig(**kwargs, chunk_tokens=7, fused=fused)
                reports = run_microbatches(ddp, batches, kd_loss_fn(config, tp_group),
                                           adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
                teacher_grads = [p.grad for p in pair.teacher.parameters() if p.grad is not None or p.requires_grad]
                grads = gather_stage_tensors(
                    {n: p.main_grad.clone() for n, p in pair.student.named_parameters()
                     if not (arch.tie_embeddings and n == "output_layer.weight")}, arch, ctx)
                everything = merge_stage_dicts(grads, ctx)
                loss = None
                if reports:
                    loss = sum(r["loss_sum"].double() for r in reports) / sum(r["tokens"].double() for r in reports)
                results[f"{name}|{kind}|{fused}"] = {"loss": loss, "grads": everything,
                                                     "teacher_grads": teacher_grads or None}
        del ddp, pair
    # the loss lives on the last stage: send it to rank 0 with everything else
    gathered = [None] * dist.get_world_size()
    losses = {k: v["loss"] for k, v in results.items() if isinstance(v, dict)}
    dist.all_gather_object(gathered, losses)
    for key in losses:
        results[key]["loss"] = next(g[key] for g in gathered if g[key] is not None)
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallelism (with --tp > 1)")
    p.add_argument("--tensors")
    p.add_argument("--pair", nargs="*", default=[])
    p.add_argument("--teacher")
    args = p.parse_args()
    out = Path(args.out)
    if args.pair:
        pair = pair_cases(args)  # initializes megatron's groups (and the default group)
        if dist.get_rank() == 0:
            torch.save(pair, out / "pair.pt")
    if args.tensors:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        tp_group = dist.new_group(ranks=list(range(dist.get_world_size())))
        tensors = tensor_cases(args.tensors, tp_group)
        if dist.get_rank() == 0:
            torch.save(tensors, out / "tensors.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
