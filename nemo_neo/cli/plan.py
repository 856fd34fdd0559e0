"""Plan the memory of a distillation run: per-rank bytes of every TP/PP/VPP/DP/SP/distributed-
optimizer/recompute layout, which fit, ranked by an estimated step time, with the arithmetic.

  nemo-neo-plan --teacher llama31_8b/config.json --student-target hidden_size=3072,ffn_hidden_size=9216 \\
      --gpus-per-node 8 --gpu-memory-gb 80 --nodes 1 --seq-length 8192 --micro-batch-size 1 --dtype bf16
  nemo-neo-plan --teacher ckpt/ --student student/config.json ... --method llm_neo --json

The formulas are in nemo_neo/distill/memory_plan.py (memory) and nemo_neo/distill/layouts.py (time).
"""

import argparse
import json
import sys

from nemo_neo.cli.prune import student_arch
from nemo_neo.distill.layouts import Cluster, cheapest_fitting, plan_layouts, read_arch
from nemo_neo.distill.memory_plan import PlanError, Workload, gib
from nemo_neo.errors import exit_on_user_error

BASELINE = dict(tp=1, pp=1, vpp=1, sequence_parallel=False, distributed_optimizer=False, recompute="none")


def _parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="config.json, Hugging Face directory or nemo_neo checkpoint")
    student = p.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", help="the student's config.json (or directory / checkpoint)")
    student.add_argument("--student-target", help="prune the teacher to key=value[,...] (as nemo-neo-prune --target)")
    student.add_argument("--student-drop-layers", help="drop these teacher layers, e.g. 16-31 (as nemo-neo-prune)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None, help="default: 8 micro-batches per GPU")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (weights; grads and optimizer are fp32)")
    p.add_argument("--method", default="kd", help="kd (full-parameter student) | llm_neo (LoRA adapters train)")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--device", default="cuda", help="cuda | cpu (CPU: unfused AdamW temporaries, CPU loss chunks)")
    p.add_argument("--top", type=int, default=10, help="layouts shown in the text output")
    p.add_argument("--json", action="store_true", help="print {\"layouts\": [...]} for other tools")
    return p


def _text(plans, cluster, work, top: int) -> str:
    fitting = [pl for pl in plans if pl.fits]
    lines = [f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs x {cluster.gpu_memory_gb:g} GB, seq {work.seq_length}, "
             f"micro batch {work.micro_batch_size}, global batch {work.global_batch_size}, {work.dtype}, {work.method}: "
             f"{len(fitting)} of {len(plans)} layouts fit"]
    for i, pl in enumerate(fitting[:top]):
        mem = pl.memory
        lines.append(f"\n{i + 1}. {pl.layout}: {gib(mem.total)} per rank (stage {mem.stage}), ~{pl.step_seconds:.2f} s/step")
        for key in ("teacher_weights", "student_weights", "grads", "optimizer", "activations", "logits", "p2p"):
            lines.append(f"   {key:<16} {gib(getattr(mem, key)):>11}  {mem.arithmetic.get(key, '')}")
        lines.append(f"   {'step time':<16} {pl.time_arithmetic['step_time']}")
    base = next((pl for pl in plans if all(getattr(pl.layout, k) == v for k, v in BASELINE.items())), None)
    if base is not None and not base.fits:
        mem = base.memory
        lines.append(f"\n{base.layout} does not fit: {gib(mem.total)} > {cluster.gpu_memory_gb:g} GB per rank -- every rank "
                     f"holds the whole teacher ({gib(mem.teacher_weights)}) and student ({gib(mem.student_weights)}), fp32 "
                     f"grads ({gib(mem.grads)}) and unsharded Adam state ({gib(mem.optimizer)}: {mem.arithmetic['optimizer']}), "
                     f"plus {gib(mem.activations + mem.logits)} of activations and logits; shard the optimizer over DP "
                     f"(distributed optimizer) and/or split the models with TP/PP.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    with exit_on_user_error():
        teacher = read_arch(args.teacher)
        if args.student:
            student = read_arch(args.student)
        else:
            student, _, _ = student_arch(teacher, args.student_target or "", args.student_drop_layers)
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb)
        if min(args.nodes, args.gpus_per_node) < 1 or args.gpu_memory_gb <= 0:
            raise PlanError("--nodes and --gpus-per-node must be >= 1 and --gpu-memory-gb > 0")
        gbs = args.global_batch_size or 8 * cluster.world * args.micro_batch_size
        work = Workload(args.seq_length, args.micro_batch_size, gbs, args.dtype, args.method, args.lora_rank, args.device)
        plans = plan_layouts(cluster, teacher, student, work)
        if args.json:
            print(json.dumps({"layouts": [pl.as_dict() for pl in plans]}, indent=1))
        else:
            print(_text(plans, cluster, work, args.top))
        best = cheapest_fitting(plans)
        return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
