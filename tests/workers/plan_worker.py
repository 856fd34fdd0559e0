"""torchrun worker: the measured per-rank peak of one distillation training step, to check the
memory planner (nemo_neo.distill.memory_plan) against.

    torchrun --nproc_per_node N tests/workers/plan_worker.py --cases cases.json --out R.json [--tp 2 --pp 1]

cases.json: a list of {"teacher": HF config dict, "student": HF config dict, "seq", "mbs", "gbs",
"method": kd | llm_neo, "lora_rank"}; one process group measures them all in turn (one torchrun
start-up for several models).

Teacher and student are built from HF config dicts with megatron's random init (fp32, CPU), put
in a DistillationPair, wrapped in megatron DDP with its optimizer -- what `distill` builds -- and
trained for two steps on random tokens. The second step (optimizer state already allocated) runs
inside `LiveTensorBytes`; every rank's peak of live tensor bytes goes to the output JSON, per case.
"""

import argparse
import gc
import json
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nemo_neo.checkpoint.load import build_for_context  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.distill.model import DistillationPair  # noqa: E402
from nemo_neo.distill.objective import kd_loss_fn  # noqa: E402
from nemo_neo.models.arch import arch_from_hf_config  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.peft.apply import LoRAConfig, apply_lora  # noqa: E402
from nemo_neo.train.memory_probe import LiveTensorBytes  # noqa: E402
from nemo_neo.train.optim import OptimConfig, build_optimizer  # noqa: E402
from nemo_neo.train.schedule import run_microbatches, wrap_ddp  # noqa: E402


def measure(ctx, case: dict) -> dict:
    teacher_arch, student_arch = arch_from_hf_config(case["teacher"]), arch_from_hf_config(case["student"])
    student, teacher = build_for_context(student_arch, ctx), build_for_context(teacher_arch, ctx)
    pair = DistillationPair(student, teacher)
    loss = KDLossConfig(kind="forward_kl")
    if case.get("method", "kd") == "llm_neo":
        rank = case["lora_rank"]
        apply_lora(student, LoRAConfig(rank=rank, alpha=2.0 * rank), ctx)
        loss = KDLossConfig(kind="ce_kl", alpha=0.5)
    ddp = wrap_ddp(pair)
    pair.config.calculate_per_token_loss = True
    optimizer, _ = build_optimizer(ddp, OptimConfig(lr=1e-4, warmup_steps=0), total_steps=2)
    loss_fn = kd_loss_fn(loss, ctx.tp_group if ctx.tp_size > 1 else None)
    generator = torch.Generator().manual_seed(ctx.dp_rank)
    mbs, seq = case["mbs"], case["seq"]
    num_micro = case["gbs"] // (mbs * ctx.dp_size)

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = []
        for _ in range(num_micro):
            tokens = torch.randint(0, student_arch.vocab_size, (mbs, seq + 1), generator=generator)
            batches.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                            "loss_mask": torch.ones(mbs, seq)})
        run_microbatches(ddp, batches, loss_fn, adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
        optimizer.step()

    step()  # allocates the optimizer state
    probe = LiveTensorBytes()
    with probe:
        step()
    peaks = [None] * ctx.world_size
    dist.all_gather_object(peaks, {"rank": ctx.rank, "pp_rank": ctx.pp_rank, "peak": probe.peak, "at_entry": probe.at_entry})
    return {"ranks": peaks}  # its models and optimizer go with this frame


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()
    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    results = []
    for case in json.loads(Path(args.cases).read_text()):
        results.append(measure(ctx, case))
        gc.collect()  # the previous case's tensors are gone before the next one is measured
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(results))
    destroy()


if __name__ == "__main__":
    main()
