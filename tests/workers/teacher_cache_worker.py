"""torchrun worker: write a teacher cache at a TP/PP/DP layout (--teacher, --write-to; --valid: with
its validation split), and/or read the targets of a cache through the training sampler at that
layout and save what each sample got (--out), and/or distil --student from the cache for a few
steps and save its losses and validation metrics (--train-out; `cached_kd`, which the tests run at
PP=1 in-process as the reference).

    torchrun --nproc_per_node N tests/workers/teacher_cache_worker.py --rows R.pt [--valid V.pt]
        [--teacher T --write-to C] [--cache C --out O] [--student S --train-out D] [--tp T] [--pp P]
"""

import argparse
from pathlib import Path

import torch

from nemo_neo import chaos, enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.data.dataset import DistributedBatchSampler  # noqa: E402
from nemo_neo.distill.cache_writer import write_teacher_cache  # noqa: E402
from nemo_neo.distill.losses import KDLossConfig  # noqa: E402
from nemo_neo.distill.teacher_cache import TARGET_KEYS, CachedTargetSamples, TeacherCache  # noqa: E402
from nemo_neo.errors import exit_on_user_error  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.recipes.methods import MethodConfig, train_student  # noqa: E402
from nemo_neo.train.loop import TrainConfig  # noqa: E402
from nemo_neo.train.optim import OptimConfig  # noqa: E402

TEMPERATURE = 1.5


def cached_kd(ctx, student, cache, rows, valid, run_dir) -> dict:
    """3 steps of KD from `cache` (2 micro-batches a step): the losses and validation before / after."""
    cfg = TrainConfig(steps=3, global_batch_size=4, micro_batch_size=2, save_every=100, eval_every=100,
                      optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0))
    method = MethodConfig(method="kd", loss=KDLossConfig(kind="forward_kl", temperature=TEMPERATURE))
    result = train_student(ctx, method, student, None, rows, valid, cfg, run_dir, teacher_cache=cache)
    return {"losses": [r["loss"] for r in result["history"]], "before": result["before"], "after": result["after"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher")
    p.add_argument("--write-to")
    p.add_argument("--rows", required=True)
    p.add_argument("--cache")
    p.add_argument("--out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--valid")
    p.add_argument("--student")
    p.add_argument("--train-out")
    args = p.parse_args()
    rows = torch.load(args.rows)
    valid = torch.load(args.valid) if args.valid else None
    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    with exit_on_user_error():
        if args.teacher:
            chaos.set_stage("cache_teacher")  # the SIGKILL test names this stage in NEMO_NEO_CHAOS_KILL
            write_teacher_cache(ctx, args.teacher, rows, args.write_to, args.top_k, temperature=TEMPERATURE, chunk_samples=3,
                                micro_batch_size=2, progress=False, valid_samples=valid)
        if args.out:  # what each sample's micro-batch holds over two epochs of the sampler, as the Trainer reads it
            samples = CachedTargetSamples(rows, TeacherCache(args.cache))
            sampler = DistributedBatchSampler(len(rows), 4, 2, ctx.dp_rank, ctx.dp_size, seed=7)
            got = {}
            for _, step in zip(range(2 * sampler.steps_per_epoch), sampler):
                for indices in step:
                    batch = samples[indices]
                    for j, i in enumerate(indices.tolist()):
                        got[i] = {k: batch[k][j] for k in TARGET_KEYS}
            torch.save(got, Path(args.out) / f"rank{ctx.rank}.pt")
        if args.train_out:
            result = cached_kd(ctx, args.student, args.cache, rows, valid, Path(args.train_out) / "run")
            if ctx.is_main:  # every rank returns the same history and metrics
                torch.save(result, Path(args.train_out) / "cached_kd.pt")
    destroy()


if __name__ == "__main__":
    main()
