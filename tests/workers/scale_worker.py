"""torchrun worker (DP=2): training with megatron's distributed optimizer against the same training
without it, and a stop + resume with it against the uninterrupted run; writes <out>/result.json.

    torchrun --nproc_per_node 2 tests/workers/scale_worker.py --pair DIR --out DIR
"""

import argparse
import json
import shutil
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.distill.objective import kd_loss_fn  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.peft import LoRAConfig, apply_lora  # noqa: E402
from nemo_neo.recipes.distill import build_pair  # noqa: E402
from nemo_neo.train.loop import TrainConfig, Trainer  # noqa: E402
from nemo_neo.train.optim import OptimConfig  # noqa: E402

STEPS = 5


def train(ctx, pair_dir, run_dir, distributed: bool, lora: bool = False):
    """A fresh student/teacher pair from the checkpoints, trained (or resumed) to STEPS; returns the
    history and the final student weights."""
    pair, arch = build_pair(ctx, pair_dir / "student", pair_dir / "teacher")
    if lora:  # LLM-Neo / KD-LoRA: only the adapters are in the optimizer
        apply_lora(pair.student, LoRAConfig(rank=4, alpha=8.0), ctx)
    rows = torch.randint(0, arch.vocab_size, (32, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=STEPS, global_batch_size=4, micro_batch_size=1, save_every=3, eval_every=100,
                      optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, use_distributed_optimizer=distributed))
    trainer = Trainer(ctx, pair, arch, kd_loss_fn(KDLossConfig(kind="ce_kl" if lora else "forward_kl")), rows, cfg,
                      run_dir, "distill", checkpoint_module=pair.student)
    result = trainer.fit()
    weights = {k: v.detach().clone() for k, v in pair.student.state_dict().items() if torch.is_tensor(v) and "extra" not in k}
    return result, weights


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def compare(a, b) -> dict:
    (ra, wa), (rb, wb) = a, b
    la, lb = [h["loss"] for h in ra["history"]], [h["loss"] for h in rb["history"]]
    return {"losses": [la, lb], "loss_rel": max(abs(x - y) / abs(y) for x, y in zip(la, lb)),
            "weights_rel": max(rel(wa[k].float(), wb[k].float()) for k in wb), "same_keys": sorted(wa) == sorted(wb),
            "weights_equal": all(torch.equal(wa[k], wb[k]) for k in wb)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pair", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    ctx = initialize(ParallelConfig())
    out, pair_dir = args.out, args.pair
    result = {"dp": ctx.dp_size}
    plain = train(ctx, pair_dir, out / "plain", distributed=False)
    sharded = train(ctx, pair_dir, out / "sharded", distributed=True)
    result["kd"] = compare(sharded, plain)
    # the optimizer state really is sharded: each DP rank holds Adam moments for part of the parameters
    state = torch.load(out / "sharded" / "checkpoints" / "step_0000003" / "train_state" / f"rank{ctx.rank:05d}.pt",
                       weights_only=False)
    result["has_shards"] = bool(state["optimizer_shards"])
    # stop + resume: back to the step-3 checkpoint (step 5's removed), rebuilt from scratch, trained on
    dist.barrier()
    ckpts = out / "sharded" / "checkpoints"
    if ctx.is_main:
        shutil.rmtree(ckpts / "step_0000005")
        (ckpts / "latest.json").write_text(json.dumps({"name": "step_0000003", "step": 3}) + "\n")
    dist.barrier()
    resumed = train(ctx, pair_dir, out / "sharded", distributed=True)
    result["resumed_from"] = resumed[0]["resumed_from"]
    result["resume"] = compare(resumed, sharded)
    result["lora"] = compare(train(ctx, pair_dir, out / "lora_sharded", True, lora=True),
                             train(ctx, pair_dir, out / "lora_plain", False, lora=True))
    if ctx.is_main:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    destroy()


if __name__ == "__main__":
    main()
