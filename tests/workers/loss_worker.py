"""torchrun worker: vocab-parallel distillation losses on TP shards of the same full logits.

    torchrun --nproc_per_node 2 tests/workers/loss_worker.py --inputs IN.pt --out OUT.pt

IN.pt (written by tests/distill/test_distill_losses.py) holds the full float64 student/teacher logits
[b, s, V], labels, loss_mask, the loss cases {name: KDLossConfig kwargs} and the chunk sizes to try.
Every rank takes its contiguous vocab shard, computes each case's (loss_sum, num_tokens), back-
propagates loss_sum / num_tokens, and the shard gradients are all-gathered along the vocab. Rank 0
writes {"case|chunk": {loss_sum, num_tokens, loss_sum_per_rank, grad}} plus a `global_token_mean`
check to OUT.pt; the test compares everything with single-process full-vocab formulas.
"""

import argparse

import torch
import torch.distributed as dist

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.distill import KDLossConfig, distillation_loss, global_token_mean  # noqa: E402
from nemo_neo.distill.cached import cached_distillation_loss  # noqa: E402
from nemo_neo.distill.sparse_kl import TopKTargets  # noqa: E402


def gather_along_vocab(shard: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def run_case(inputs, kwargs, chunk, tp_group):
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    vocab = inputs["student"].shape[-1]
    shard = slice(tp_rank * vocab // tp_size, (tp_rank + 1) * vocab // tp_size)
    student = inputs["student"][..., shard].clone().requires_grad_(True)
    teacher = inputs["teacher"][..., shard].clone()
    config = KDLossConfig(**kwargs, chunk_tokens=chunk)
    out = distillation_loss(
        student, teacher, config, labels=inputs["labels"], loss_mask=inputs["loss_mask"], tp_group=tp_group
    )
    (out.loss_sum / out.num_tokens).backward()
    per_rank = [torch.zeros_like(out.loss_sum) for _ in range(tp_size)]
    dist.all_gather(per_rank, out.loss_sum.detach().clone(), group=tp_group)
    return {
        "loss_sum": out.loss_sum.detach(),
        "num_tokens": out.num_tokens,
        "loss_sum_per_rank": torch.stack(per_rank),
        "grad": gather_along_vocab(student.grad, tp_group),
    }


def run_cached_case(inputs, case, tp_group):
    """The cached-teacher loss of `case` ({"kwargs", "targets": (ids, log_probs, log_tail)}) on this rank's shard."""
    tp_rank, tp_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    vocab = inputs["student"].shape[-1]
    student = inputs["student"][..., tp_rank * vocab // tp_size : (tp_rank + 1) * vocab // tp_size].clone().requires_grad_(True)
    out = cached_distillation_loss(student, TopKTargets(*case["targets"]), KDLossConfig(**case["kwargs"]),
                                   labels=inputs["labels"], loss_mask=inputs["loss_mask"], tp_group=tp_group)
    (out.loss_sum / out.num_tokens).backward()
    return {"loss_sum": out.loss_sum.detach(), "grad": gather_along_vocab(student.grad, tp_group)}


def check_global_token_mean(group):
    """Each rank contributes a different (sum, count); record the mean and the local gradient."""
    rank = dist.get_rank(group)
    x = torch.tensor(float(rank + 1), dtype=torch.float64, requires_grad=True)
    loss_sum = 3.0 * x
    num_tokens = torch.tensor(float(rank + 2), dtype=torch.float64)
    mean = global_token_mean(loss_sum, num_tokens, group)
    mean.backward()
    means = [torch.zeros((), dtype=torch.float64) for _ in range(dist.get_world_size(group))]
    grads = [torch.zeros((), dtype=torch.float64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(means, mean.detach(), group=group)
    dist.all_gather(grads, x.grad, group=group)
    return {"mean": torch.stack(means), "grad": torch.stack(grads)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    # An explicit TP group (here all ranks), passed down like megatron's tensor-parallel group.
    tp_group = dist.new_group(ranks=list(range(dist.get_world_size())))
    inputs = torch.load(args.inputs)
    results = {}
    for name, kwargs in inputs["cases"].items():
        for chunk in inputs["chunks"]:
            results[f"{name}|{chunk}"] = run_case(inputs, kwargs, chunk, tp_group)
    for name, case in inputs.get("cached_cases", {}).items():  # tests/distill/test_cached_loss.py
        results[name] = run_cached_case(inputs, case, tp_group)
    results["global_token_mean"] = check_global_token_mean(tp_group)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
