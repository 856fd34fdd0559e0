"""The recipe's memory check at start: plan the distill stage's layout and refuse one that cannot fit.

`plan.gpu_memory_gb` (conf/prune_distill.yaml) gives the memory of one device; null means the
device's own memory on GPU and no check on CPU (where the planner's GPU numbers do not apply).
The student's shape comes from the config alone (distill.student, or the teacher pruned by
prune.target / prune.drop_layers), so the check runs before any model is loaded.
"""

from __future__ import annotations

import os

import torch

from nemo_neo.checkpoint.native import read_index
from nemo_neo.distill.layouts import Cluster, cheapest_fitting, plan_layouts, read_arch
from nemo_neo.distill.memory_plan import Layout, Workload, gib
from nemo_neo.models.dtype import default_dtype
from nemo_neo.prune.depth import check_drop_layers
from nemo_neo.prune.width import pruned_arch
from nemo_neo.recipes import config as rc


def _student(cfg: rc.RecipeConfig, teacher):
    if cfg.distill.student:
        return read_index(cfg.distill.student)[0]
    target = dict(cfg.prune.target or {})
    if cfg.prune.drop_layers:
        target["num_layers"] = teacher.num_layers - len(check_drop_layers(teacher.num_layers, cfg.prune.drop_layers))
    return pruned_arch(teacher, target) if target else teacher


def check_virtual_pipeline(cfg: rc.RecipeConfig, teacher_ckpt) -> None:
    """With parallel.virtual_pipeline=V the distill stage splits teacher and student into PP x V chunks
    of layers: both depths must divide, checked from the config before any stage runs."""
    par = cfg.parallel
    if par.vpp == 1 or "distill" not in cfg.stages:
        return
    teacher = read_arch(cfg.distill.teacher or teacher_ckpt)
    student = _student(cfg, teacher)
    chunks = par.pipeline_parallel * par.vpp
    bad = [f"{name} has {arch.num_layers} layers" for name, arch in (("the teacher", teacher), ("the student", student))
           if arch.num_layers % chunks]
    if bad:
        raise rc.RecipeConfigError(f"parallel.pipeline_parallel={par.pipeline_parallel} x virtual_pipeline={par.vpp} "
                                   f"splits each model into {chunks} chunks of layers, but {' and '.join(bad)}; choose "
                                   "a virtual_pipeline (or pipeline_parallel) whose product divides both, or null")


def check_layout_fits(cfg: rc.RecipeConfig, plan_node, world_size: int, teacher_ckpt) -> dict | None:
    """None when there is nothing to check; else the plan of the configured layout, or a
    RecipeConfigError naming the cheapest layout that fits. plan_node: the config's `plan:` section."""
    gpu_memory_gb = (plan_node or {}).get("gpu_memory_gb")
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if "distill" not in cfg.stages:
        return None
    if gpu_memory_gb is None:
        if not torch.cuda.is_available():
            return None
        gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    teacher = read_arch(teacher_ckpt)
    student = _student(cfg, teacher)
    par, train = cfg.parallel, cfg.distill.train
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    layout = Layout(tp=tp, pp=pp, vpp=par.vpp, dp=world_size // (tp * pp),
                    sequence_parallel=par.uses_sequence_parallel,
                    distributed_optimizer=train.optim.use_distributed_optimizer,
                    recompute=getattr(par, "recompute", None) or "none")
    dtype = "bf16" if default_dtype() == torch.bfloat16 else "fp32"
    method = "llm_neo" if cfg.distill.method.uses_lora else "kd"
    work = Workload(cfg.data.seq_length, train.micro_batch_size, train.global_batch_size, dtype, method,
                    cfg.distill.method.lora.rank, "cuda" if torch.cuda.is_available() else "cpu")
    nodes = max(1, world_size // gpus_per_node)
    cluster = Cluster(nodes=nodes, gpus_per_node=min(gpus_per_node, world_size), gpu_memory_gb=float(gpu_memory_gb))
    (chosen,) = plan_layouts(cluster, teacher, student, work, [layout])
    if chosen.fits:
        return chosen.as_dict()
    best = cheapest_fitting(plan_layouts(cluster, teacher, student, work))
    hint = f"the cheapest layout that fits is {best.layout} ({gib(best.memory.total)})" if best else "no layout fits"
    raise rc.RecipeConfigError(f"the distill stage at {layout} needs {gib(chosen.memory.total)} per rank "
                               f"(> plan.gpu_memory_gb={gpu_memory_gb:g}); {hint}; see `nemo-neo-plan` for the arithmetic")
