"""torchrun worker: KD and LLM-Neo under an interleaved (virtual) pipeline, or the same at PP=1 as the
reference. Writes into --out:
  kd.pt     loss and the student's full gradients (global names) of one KD forward+backward
  neo.pt    the same for LLM-Neo (LoRA adapters on every chunk's student layers): adapter gradients
  train/    a 3-step KD Trainer run (its final checkpoint holds the student's weights); history.json
  resumed/  (--resume) the same run stopped after step 2 and resumed to step 3
  reloaded/ (--reload CKPT) CKPT loaded into this layout's chunks and saved again

    torchrun --nproc_per_node N tests/workers/vpp_worker.py --student S --teacher T --out O --pp P --vpp V
"""

import argparse
import json
import zlib
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

import torch  # noqa: E402
from kd_worker import random_batches  # noqa: E402  (this directory: the worker runs as a script)

from nemo_neo.checkpoint import sharding  # noqa: E402
from nemo_neo.checkpoint.load import load_chunks  # noqa: E402
from nemo_neo.checkpoint.native import gather_stage_tensors, save_distributed  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.distill.objective import kd_loss_fn  # noqa: E402
from nemo_neo.parallel import ParallelConfig, chunks, destroy, initialize  # noqa: E402
from nemo_neo.parallel.reduce import merge_stage_dicts, sum_from_last_stage  # noqa: E402
from nemo_neo.peft import LoRAConfig, apply_lora  # noqa: E402
from nemo_neo.recipes.distill import build_pairs  # noqa: E402
from nemo_neo.train.loop import TrainConfig, Trainer  # noqa: E402
from nemo_neo.train.optim import OptimConfig  # noqa: E402
from nemo_neo.train.schedule import run_microbatches, wrap_ddp  # noqa: E402

LOSS = KDLossConfig(kind="ce_kl", temperature=2.0, alpha=0.3, t2_scaling=True, chunk_tokens=7)


def global_names(student, ctx) -> dict:
    """local parameter name -> checkpoint (global) name of this chunk's student."""
    offset = chunks.layer_offset(student, ctx)
    return {n: sharding.to_global(sharding.canonical_name(n), offset) for n, _ in student.named_parameters()}


def one_step(ctx, args, lora: bool, num_micro: int) -> dict:
    """Loss and full gradients (global names) of one forward+backward over `num_micro` micro-batches."""
    pairs, arch = build_pairs(ctx, args.student, args.teacher)
    for pair in pairs:
        if lora:
            apply_lora(pair.student, LoRAConfig(rank=4, alpha=8.0), ctx)
            with torch.no_grad():  # B = 0 at init would leave A without gradient: seeded by global name
                for n, prm in pair.student.named_parameters():
                    if n.endswith("lora_B"):
                        g = torch.Generator().manual_seed(zlib.crc32(global_names(pair.student, ctx)[n].encode()))
                        prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
        pair.config.calculate_per_token_loss = True
    ddp = wrap_ddp(pairs)
    reports = run_microbatches(ddp, random_batches(arch.vocab_size, num_micro), kd_loss_fn(LOSS),
                               adjust_tensor_shapes_fn=pairs[0].pair_tensor_shapes)
    assert all(p.grad is None and not p.requires_grad for pair in pairs for p in pair.teacher.parameters())
    grads = {}
    for pair in pairs:
        names = global_names(pair.student, ctx)
        local = {sharding.canonical_name(n): p.main_grad for n, p in pair.student.named_parameters()
                 if p.requires_grad and not (arch.tie_embeddings and n == "output_layer.weight")}
        grads.update(gather_stage_tensors(local, arch, ctx, pair.vp_stage))
        assert set(grads) >= {names[n] for n, p in pair.student.named_parameters()
                              if p.requires_grad and n != "output_layer.weight"}
    sums = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        sums += torch.stack([r["loss_sum"].double(), r["tokens"].double()])
    loss_sum, tokens = sum_from_last_stage(sums, ctx).tolist()
    return {"loss": loss_sum / tokens, "grads": merge_stage_dicts(grads, ctx), "chunks": len(pairs)}


def train(ctx, args, run_dir: Path, steps: int) -> list[float]:
    pairs, arch = build_pairs(ctx, args.student, args.teacher)
    model = pairs if len(pairs) > 1 else pairs[0]
    students = [p.student for p in pairs] if len(pairs) > 1 else pairs[0].student
    rows = torch.randint(0, arch.vocab_size, (32, 13), generator=torch.Generator().manual_seed(1))
    # constant LR: a run stopped at step 2 and resumed to 3 follows the same schedule as one of 3 steps
    cfg = TrainConfig(steps=steps, global_batch_size=8, micro_batch_size=2, save_every=2, eval_every=100,
                      optim=OptimConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0, lr_decay_style="constant", clip_grad=0.5))
    trainer = Trainer(ctx, model, arch, kd_loss_fn(LOSS), rows, cfg, run_dir, "distill", checkpoint_module=students,
                      adjust_tensor_shapes_fn=pairs[0].pair_tensor_shapes)
    result = trainer.fit()
    return [h["loss"] for h in result["history"]], [h["grad_norm"] for h in result["history"]], result["resumed_from"]


def main():
    p = argparse.ArgumentParser()
    for name in ("--student", "--teacher", "--out"):
        p.add_argument(name, required=True, type=Path)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--reload", type=Path, default=None)
    args = p.parse_args()
    ctx = initialize(ParallelConfig(pipeline_parallel=args.pp, virtual_pipeline=args.vpp))
    for name, lora in (("kd", False), ("neo", True)):
        result = one_step(ctx, args, lora, num_micro=3 if lora else 4)  # 3: not a multiple of PP (one group)
        if ctx.is_main:
            torch.save(result, args.out / f"{name}.pt")
    losses, norms, _ = train(ctx, args, args.out / "train", steps=3)
    history = {"losses": losses, "grad_norms": norms}
    if args.resume:
        train(ctx, args, args.out / "resumed", steps=2)
        history["resumed_losses"], _, history["resumed_from"] = train(ctx, args, args.out / "resumed", steps=3)
    if args.reload is not None:
        students, arch, _ = load_chunks(args.reload, ctx)
        save_distributed(args.out / "reloaded", arch, students, ctx)
    if ctx.is_main:
        (args.out / "history.json").write_text(json.dumps(history))
    destroy()


if __name__ == "__main__":
    main()
