"""torchrun worker: training with sequence parallelism against the same training without it, at this
launch's TP (and PP), for KD (student and teacher under SP) and LLM-Neo (LoRA adapters under SP);
writes <out>/result.json.

    torchrun --nproc_per_node N tests/workers/sp_worker.py --student S --teacher T --out DIR --tp 2 [--pp 1]
"""

import argparse
import dataclasses
import json
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

import torch  # noqa: E402

from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.distill.objective import kd_loss_fn  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.peft import LoRAConfig, apply_lora  # noqa: E402
from nemo_neo.recipes.distill import build_pair  # noqa: E402
from nemo_neo.train.loop import TrainConfig, Trainer  # noqa: E402
from nemo_neo.train.optim import OptimConfig  # noqa: E402

STEPS = 3


def train(ctx, args, run_dir: Path, lora: bool):
    pair, arch = build_pair(ctx, args.student, args.teacher)
    if lora:
        apply_lora(pair.student, LoRAConfig(rank=4, alpha=8.0, mixer=True), ctx)  # MoSLoRA: A, M and B all train
    rows = torch.randint(0, arch.vocab_size, (16, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=STEPS, global_batch_size=4, micro_batch_size=2, save_every=100, eval_every=100,
                      optim=OptimConfig(lr=3e-2, min_lr=3e-3, warmup_steps=0))
    kind = "ce_kl" if lora else "forward_kl"
    trainer = Trainer(ctx, pair, arch, kd_loss_fn(KDLossConfig(kind=kind)), rows, cfg, run_dir, "distill",
                      checkpoint_module=pair.student, adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
    history = [h["loss"] for h in trainer.fit()["history"]]
    weights = {k: v.detach().clone() for k, v in pair.student.state_dict().items() if torch.is_tensor(v) and "extra" not in k}
    marked = sorted(n for n, p in pair.student.named_parameters() if getattr(p, "sequence_parallel", False))
    return history, weights, marked


def gradients(ctx, args, lora: bool) -> dict:
    """Parameter gradients of one step (2 micro-batches, DDP-finalized: DP and SP all-reduces done)."""
    from nemo_neo.train.schedule import run_microbatches, wrap_ddp

    pair, arch = build_pair(ctx, args.student, args.teacher)
    if lora:
        apply_lora(pair.student, LoRAConfig(rank=4, alpha=8.0, mixer=True), ctx)
        with torch.no_grad():  # B = 0 at init would leave A and M without gradient
            for n, prm in pair.student.named_parameters():
                if n.endswith("lora_B"):
                    prm.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    ddp = wrap_ddp(pair)
    rows = torch.randint(0, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    micro = [{"input_ids": rows[i : i + 2, :-1], "labels": rows[i : i + 2, 1:], "loss_mask": torch.ones(2, 16)}
             for i in (0, 2)]
    loss_fn, logits = kd_loss_fn(KDLossConfig(kind="ce_kl" if lora else "forward_kl")), []

    def keeping_logits(output, batch):  # the last stage: (student, teacher) vocab-parallel logits
        logits.append(torch.cat([o.detach().float() for o in output], dim=-1))
        return loss_fn(output, batch)

    run_microbatches(ddp, micro, keeping_logits, adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
    grads = {n: prm.main_grad.detach().clone() for n, prm in pair.student.named_parameters() if prm.requires_grad}
    return grads, logits


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main():
    p = argparse.ArgumentParser()
    for name in ("--student", "--teacher", "--out"):
        p.add_argument(name, required=True, type=Path)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()
    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, sequence_parallel=True))
    assert ctx.sequence_parallel
    plain_ctx = dataclasses.replace(ctx, sequence_parallel=False)
    result = {}
    for lora in (False, True):
        name = "llm_neo" if lora else "kd"
        (hs, ws, marked), (hp, wp, _) = (train(c, args, args.out / f"{name}_{tag}", lora)
                                         for c, tag in ((ctx, "sp"), (plain_ctx, "plain")))
        (gs, ls), (gp, lp) = gradients(ctx, args, lora), gradients(plain_ctx, args, lora)
        grad_rel = {k: rel(gs[k], gp[k]) for k in gp}
        logits_rel = max((rel(a, b) for a, b in zip(ls, lp)), default=0.0)  # 0 on stages without the head
        result[name] = {"losses_sp": hs, "losses_plain": hp, "grad_rel": max(grad_rel.values()), "logits_rel": logits_rel,
                        "logits_compared": len(ls),
                        "worst_grad": max(grad_rel, key=grad_rel.get), "grads_nonzero": all(bool(g.abs().max() > 0) for g in gp.values()),
                        "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(hs, hp)) if hs else None,
                        "weights_rel": max(rel(ws[k], wp[k]) for k in wp), "same_keys": sorted(ws) == sorted(wp),
                        "changed": max(rel(ws[k], wp[k]) for k in wp) > 0 or any(hs), "sp_marked": marked}
    # every rank's view (the last pipeline stage holds the head and the loss): the worst over ranks
    import torch.distributed as dist

    views = [None] * ctx.world_size
    dist.all_gather_object(views, result)
    for name, r in result.items():
        for key in ("grad_rel", "weights_rel", "logits_rel"):
            r[key] = max(v[name][key] for v in views)
        r["logits_compared"] = sum(v[name]["logits_compared"] for v in views)
        r["grads_nonzero"] = all(v[name]["grads_nonzero"] for v in views)
        r["sp_marked"] = sorted({m for v in views for m in v[name]["sp_marked"]})
    if ctx.is_main:
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    destroy()


if __name__ == "__main__":
    main()
