"""Every TP/PP/VPP/DP/SP/distributed-optimizer/recompute layout of a distillation run, with its
per-rank memory (`memory_plan.rank_memory`), whether it fits, and an estimated step time to rank
the layouts that fit.

Step time (an estimate for ranking, not a prediction of wall time), per DP rank:
  compute  = tokens x (6 P_s + 2 P_t [+ 2 P_s with full recompute]) / (TP x PP) / (peak x MFU)
             (P: non-embedding + head parameters; LoRA trains no base weight: 4 P_s instead of 6 P_s)
  bubble   = compute x (PP - 1) / (VPP x M)              (1F1B / interleaved, M micro-batches)
  TP comm  = per layer and micro-batch, 4 (student, fwd + bwd) + 2 (teacher, fwd) ring
             all-reduces (or SP all-gather + reduce-scatter, the same bytes) of [s, b, h]:
             2 (TP - 1) / TP x s b h x dtype bytes / link bandwidth, summed over the stage's layers
  DP comm  = ring all-reduce of the fp32 grad buffer, 2 (DP - 1) / DP x bytes / inter-node bandwidth
             (the distributed optimizer's reduce-scatter + all-gather moves the same bytes)
Intra-node links: NVLink (default 450 GB/s); a group spanning nodes uses the network (50 GB/s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nemo_neo.checkpoint.native import INDEX, read_index
from nemo_neo.distill.memory_plan import Layout, Memory, PlanError, Workload, layout_problem, rank_memory
from nemo_neo.models.arch import GPTArch, arch_from_hf_config


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 989.0  # H100 dense bf16
    mfu: float = 0.4
    nvlink_gbps: float = 450.0
    network_gbps: float = 50.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> int:
        return int(self.gpu_memory_gb * 2**30)


@dataclass
class Plan:
    layout: Layout
    memory: Memory
    fits: bool
    step_seconds: float
    time_arithmetic: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "dp": lay.dp, "sequence_parallel": lay.sequence_parallel,
                "distributed_optimizer": lay.distributed_optimizer, "recompute": lay.recompute, "fits": self.fits,
                "per_rank_bytes": self.memory.as_dict(), "worst_stage": self.memory.stage,
                "estimated_step_seconds": self.step_seconds, "arithmetic": {**self.memory.arithmetic, **self.time_arithmetic}}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cluster: Cluster, teacher: GPTArch, student: GPTArch, work: Workload) -> list[Layout]:
    """Layouts megatron can run for both models: TP within a node, PP x VPP dividing both depths."""
    out = []
    for tp in _divisors(cluster.gpus_per_node):
        for pp in _divisors(cluster.world // tp):
            dp = cluster.world // (tp * pp)
            for vpp in [1] + ([v for v in (2, 3, 4, 5, 8) if pp > 1]):
                for sp in (False, True) if tp > 1 else (False,):
                    for distopt in (False, True) if dp > 1 else (False,):
                        for recompute in ("none", "selective", "full"):
                            layout = Layout(tp, pp, vpp, dp, sp, distopt, recompute)
                            if layout_problem(teacher, student, layout, work) is None:
                                out.append(layout)
    return out


def _compute_params(arch: GPTArch) -> int:
    return arch.num_parameters(include_embeddings=False) + arch.vocab_size * arch.hidden_size  # + the head matmul


def step_time(cluster: Cluster, teacher: GPTArch, student: GPTArch, layout: Layout, work: Workload) -> tuple[float, dict]:
    t, p, v, dp = layout.tp, layout.pp, layout.vpp, layout.dp
    m = work.global_batch_size // (work.micro_batch_size * dp)
    tokens = m * work.micro_batch_size * work.seq_length
    ps, pt = _compute_params(student), _compute_params(teacher)
    student_factor = (4 if work.method == "llm_neo" else 6) + (2 if layout.recompute == "full" else 0)
    flops = tokens * (student_factor * ps + 2 * pt) / (t * p)
    rate = cluster.peak_tflops * 1e12 * cluster.mfu
    compute = flops / rate
    bubble = compute * (p - 1) / (v * m)
    tp_bw = (cluster.nvlink_gbps if t <= cluster.gpus_per_node else cluster.network_gbps) * 1e9
    ring = 2 * (t - 1) / t
    per_mb = work.seq_length * work.micro_batch_size * work.bytes * ring / tp_bw
    tp_comm = m * per_mb * (4 * student.num_layers * student.hidden_size + 2 * teacher.num_layers * teacher.hidden_size) / p
    dp_bw = (cluster.nvlink_gbps if t * p * dp <= cluster.gpus_per_node else cluster.network_gbps) * 1e9
    grad_bytes = rank_memory(teacher, student, layout, work).grads
    dp_comm = 2 * (dp - 1) / dp * grad_bytes / dp_bw
    total = compute + bubble + tp_comm + dp_comm
    why = {"step_time": (f"compute {tokens} tok x ({student_factor} x {ps:.3g} + 2 x {pt:.3g}) FLOP / (TP {t} x PP {p}) / "
                         f"{rate / 1e12:.0f} TFLOP/s = {compute:.2f} s; bubble x (PP-1)/(VPP x M) = ({p}-1)/({v} x {m}) "
                         f"-> {bubble:.2f} s; TP comm {tp_comm:.2f} s; DP grad all-reduce {dp_comm:.2f} s; "
                         f"total {total:.2f} s")}
    return total, why


def plan_layouts(cluster: Cluster, teacher: GPTArch, student: GPTArch, work: Workload,
                 layouts: list[Layout] | None = None) -> list[Plan]:
    """Plans for `layouts` (default: every candidate), fitting ones first, each group fastest first."""
    layouts = candidate_layouts(cluster, teacher, student, work) if layouts is None else layouts
    if not layouts:
        raise PlanError(f"no TP x PP x DP layout of {cluster.world} GPUs splits both models with global batch "
                        f"{work.global_batch_size} and micro batch {work.micro_batch_size}")
    plans = []
    for layout in layouts:
        memory = rank_memory(teacher, student, layout, work)
        seconds, why = step_time(cluster, teacher, student, layout, work)
        plans.append(Plan(layout, memory, memory.total <= cluster.memory_bytes, seconds, why))
    return sorted(plans, key=lambda pl: (not pl.fits, pl.step_seconds, pl.memory.total))


def cheapest_fitting(plans: list[Plan]) -> Plan | None:
    return next((pl for pl in plans if pl.fits), None)


def read_arch(path) -> GPTArch:
    """A model's shape from a HF config.json, a HF directory or a nemo_neo checkpoint (no weights read)."""
    path = Path(path)
    if (path / INDEX).is_file():
        return read_index(path)[0]
    config = path / "config.json" if path.is_dir() else path
    if not config.is_file():
        raise PlanError(f"{path}: not a config.json, a Hugging Face directory or a nemo_neo checkpoint")
    try:
        return arch_from_hf_config(json.loads(config.read_text()))
    except (ValueError, KeyError) as e:
        raise PlanError(f"{config}: not a readable Hugging Face config ({type(e).__name__}: {e})") from None
