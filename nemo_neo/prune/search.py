"""Minitron's architecture search, the pure part: budgets, bounds, and the candidate grid.

A candidate is a target shape (num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
num_query_groups) the source model can be pruned to. The grid per axis is every multiple of that
axis' `multiple_of` (hardware-friendly sizes) between the most pruning the bounds allow and the
source size, plus the source size itself. Each grid point is counted with the same arithmetic as
the dry run (`GPTArch.num_parameters`, equal to a meta-device build) and validated exactly as
pruning validates a target (`pruned_arch`: GQA groups, heads per group, TP/PP divisibility), and
hidden_size must be a multiple of num_attention_heads (transformers' Llama config requires it, so
every candidate converts back to Hugging Face).

Only *maximal* candidates are listed: within budget, and no single axis can grow to its next grid
value and stay within budget. A shape that could keep more units for free would only lose quality
(every budget here grows with every axis), so the search never spends time on it.

Budgets (all must hold, AND):
  params                total parameters (tied embeddings counted once)
  non_embedding_params  parameters outside the embedding and output layer
  memory_gb             inference memory in GB (1e9 bytes): weights at `memory.dtype` plus the KV
                        cache for `memory.batch_size` sequences of `memory.seq_length` tokens
  latency_ms, throughput  measured on this machine by the workflow (nemo_neo.recipes.arch_search.measure,
                        a random-weight model of each shape through the throughput tool's torch
                        backend); applied to the maximal arithmetic candidates, so a candidate that is
                        too slow is dropped, not replaced by a smaller one
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from nemo_neo.errors import ConfigError
from nemo_neo.models.arch import GPTArch
from nemo_neo.prune.width import PruneTargetError, parse_key_values, pruned_arch

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
WIDTH_AXES = AXES[1:]
ARITHMETIC_BUDGETS = ("params", "non_embedding_params", "memory_gb")
MEASURED_BUDGETS = ("latency_ms", "throughput")  # latency: at most; throughput (output tokens/s): at least
BUDGETS = ARITHMETIC_BUDGETS + MEASURED_BUDGETS
DEFAULT_AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")
DEFAULT_MULTIPLES = {"num_layers": 1, "hidden_size": 64, "ffn_hidden_size": 64, "num_attention_heads": 1,
                     "num_query_groups": 1}
BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1, "int8": 1}


class SearchError(PruneTargetError):
    """A search that cannot run as configured (budget, bounds); the message names the fix."""


@dataclass
class MemorySpec:
    """Inference memory: weights plus the KV cache of `batch_size` x `seq_length` tokens."""

    batch_size: int = 1
    seq_length: int = 4096
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.dtype not in BYTES:
            raise SearchError(f"memory.dtype={self.dtype!r} is not one of {sorted(BYTES)}")
        if self.batch_size < 1 or self.seq_length < 1:
            raise SearchError(f"memory.batch_size / seq_length must be >= 1 (got {self.batch_size} / {self.seq_length})")


@dataclass
class SearchSpace:
    """budget: {name: value} over BUDGETS. axes: which shape keys may change (the rest stay at the
    source's size). max_width_pruning / max_depth_pruning: the largest fraction of each width axis /
    of the layers that may go. multiple_of: grid step per axis. tp / pp: the layout the pruned
    model must support."""

    budget: dict = field(default_factory=dict)
    axes: list = field(default_factory=lambda: list(DEFAULT_AXES))
    max_width_pruning: float = 0.5
    max_depth_pruning: float = 0.5
    multiple_of: dict = field(default_factory=dict)
    tp: int = 1
    pp: int = 1
    memory: MemorySpec = field(default_factory=MemorySpec)

    def __post_init__(self):
        if isinstance(self.memory, dict):
            self.memory = MemorySpec(**self.memory)
        self.budget = {k: float(v) for k, v in dict(self.budget).items()}
        if not self.budget:
            raise SearchError(f"the search needs a budget: any of {', '.join(BUDGETS)} (e.g. params=4.6e9)")
        unknown = sorted(set(self.budget) - set(BUDGETS))
        if unknown:
            raise SearchError(f"unknown budget(s) {unknown}; use {', '.join(BUDGETS)}")
        bad = {k: v for k, v in self.budget.items() if not v > 0}
        if bad:
            raise SearchError(f"budgets must be positive numbers, got {bad}")
        unknown = sorted(set(self.axes) - set(AXES)) + sorted(set(self.multiple_of) - set(AXES))
        if unknown:
            raise SearchError(f"unknown search axis {unknown}; use {', '.join(AXES)}")
        for name in ("max_width_pruning", "max_depth_pruning"):
            if not 0 <= getattr(self, name) < 1:
                raise SearchError(f"{name}={getattr(self, name)} must be in [0, 1): the fraction that may be pruned")
        bad = {k: v for k, v in self.multiple_of.items() if int(v) < 1}
        if bad:
            raise SearchError(f"multiple_of values must be >= 1, got {bad}")

    def multiple(self, axis: str) -> int:
        return int(self.multiple_of.get(axis, DEFAULT_MULTIPLES[axis]))

    def describe_budget(self) -> str:
        return " and ".join(f"{k}{'>=' if k == 'throughput' else '<='}{v:g}" for k, v in self.budget.items())


def parse_budget(text: str) -> dict:
    """'params=4.6e9,memory_gb=12' -> {'params': 4.6e9, 'memory_gb': 12.0}."""
    return parse_key_values(text, BUDGETS, float, what="budget")


def shape(arch: GPTArch) -> dict:
    return {k: getattr(arch, k) for k in AXES}


def memory_gb(arch: GPTArch, spec: MemorySpec) -> float:
    """Weights + KV cache (K and V, every layer, every query group) in GB."""
    nbytes = BYTES[spec.dtype]
    kv = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * spec.batch_size * spec.seq_length
    return (arch.num_parameters() + kv) * nbytes / 1e9


def measures(arch: GPTArch, spec: MemorySpec) -> dict:
    """The arithmetic budget quantities of one shape."""
    return {"params": arch.num_parameters(), "non_embedding_params": arch.num_parameters(include_embeddings=False),
            "memory_gb": memory_gb(arch, spec)}


def within(values: dict, budget: dict) -> bool:
    """Every budget that `values` has a number for holds (throughput: at least; the rest: at most)."""
    for key, limit in budget.items():
        if key not in values:
            continue
        if (values[key] < limit) if key == "throughput" else (values[key] > limit):
            return False
    return True


def axis_values(arch: GPTArch, space: SearchSpace, axis: str) -> list[int]:
    """Grid of one axis, ascending: multiples of its step from the bound up to the source size."""
    top = getattr(arch, axis)
    if axis not in space.axes:
        return [top]
    ratio = space.max_depth_pruning if axis == "num_layers" else space.max_width_pruning
    low = max(1, math.ceil(top * (1 - ratio) - 1e-9))
    m = space.multiple(axis)
    return sorted({v for v in range(m * math.ceil(low / m), top + 1, m) if v >= 1} | {top})


def arch_for(arch: GPTArch, point: dict) -> GPTArch:
    """The pruned shape by arithmetic only (no validation): a cheap copy with the five keys set
    (also what the workflow builds random-weight models of, to time them)."""
    new = GPTArch(**{**{f: getattr(arch, f) for f in arch.__dataclass_fields__ if f != "hf_config"}, **point})
    new.hf_config = arch.hf_config
    return new


def _valid(arch: GPTArch, point: dict, space: SearchSpace) -> bool:
    try:
        # every key explicitly: pruned_arch scales the heads with the groups when only groups are given
        pruned_arch(arch, dict(point), space.tp, space.pp)
        return True
    except ConfigError:
        return False


def grid(arch: GPTArch, space: SearchSpace):
    """Every grid point (dict of the five keys), valid or not."""
    values = [axis_values(arch, space, axis) for axis in AXES]
    for combo in itertools.product(*values):
        yield dict(zip(AXES, combo))


def candidate_record(arch: GPTArch, point: dict, space: SearchSpace) -> dict:
    new = arch_for(arch, point)
    kinds = ["width"] if any(point[k] != getattr(arch, k) for k in WIDTH_AXES) else []
    kinds += ["depth"] if point["num_layers"] != arch.num_layers else []
    m = measures(new, space.memory)
    return {"id": candidate_id(point), **point, "head_dim": arch.head_dim, "kind": "+".join(kinds) or "none",
            "parameters": m["params"], "non_embedding_parameters": m["non_embedding_params"],
            "memory_gb": round(m["memory_gb"], 4)}


def candidate_id(point: dict) -> str:
    return "L{num_layers}-h{hidden_size}-f{ffn_hidden_size}-a{num_attention_heads}-g{num_query_groups}".format(**point)


def enumerate_candidates(arch: GPTArch, space: SearchSpace) -> list[dict]:
    """The maximal valid candidates within every arithmetic budget, largest first. Raises one
    `SearchError` naming the smallest reachable size when none is.

    Every budget grows with every axis, so along the axis with the most grid values (the inner
    axis) only the largest value that fits can be maximal, and along any other axis a point grows
    iff the next *valid* larger value fits: a grid of millions of points costs a few thousand counts."""
    arithmetic = {k: v for k, v in space.budget.items() if k in ARITHMETIC_BUDGETS}
    values = {axis: axis_values(arch, space, axis) for axis in AXES}
    source = shape(arch)
    scratch = arch_for(arch, source)

    def fits(point: dict) -> bool:
        for key, value in point.items():  # one reused arch: counting must not allocate per point
            setattr(scratch, key, value)
        return within(measures(scratch, space.memory), arithmetic)

    valid = _validator(arch, space)
    inner = max(AXES, key=lambda a: len(values[a]))
    others = [a for a in AXES if a != inner]
    out = []
    for combo in itertools.product(*(values[a] for a in others)):
        base = dict(zip(others, combo))
        at = lambda v: {a: (v if a == inner else base[a]) for a in AXES}  # noqa: E731
        lo, hi = 0, len(values[inner])  # bisect: the first inner value that no longer fits
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if fits(at(values[inner][mid])) else (lo, mid)
        point = next((at(v) for v in reversed(values[inner][:lo]) if at(v) != source and valid(at(v))), None)
        if point is None or any(_grows(point, axis, values[axis], source, fits, valid) for axis in others):
            continue
        out.append(candidate_record(arch, point, space))
    if not out:
        raise SearchError(_nothing_fits(arch, space, valid))
    return sorted(out, key=lambda c: (-c["parameters"], c["id"]))


def _grows(point: dict, axis: str, axis_grid: list[int], source: dict, fits, valid) -> bool:
    """Whether `axis` can take a larger grid value and still fit (the next valid one decides)."""
    for bigger in (v for v in axis_grid if v > point[axis]):
        other = {**point, axis: bigger}
        if other != source and valid(other):
            return fits(other)
    return False


def _validator(arch: GPTArch, space: SearchSpace):
    """`valid(point)`, cached: pruning's own target check (`pruned_arch`) on a light copy."""
    light = arch_for(arch, shape(arch))
    light.hf_config = {}  # pruned_arch deep-copies the arch; the HF dict plays no part in its checks
    cache: dict[tuple, bool] = {}

    def valid(point: dict) -> bool:
        # pruned_arch's checks (GQA groups, heads per group, TP/PP) never read hidden_size: one
        # check serves every hidden size, which keeps a fine grid's validation to thousands of calls
        if point["hidden_size"] % point["num_attention_heads"]:
            return False  # transformers' Llama config refuses it: the pruned model could not be exported
        key = tuple(v for k, v in point.items() if k != "hidden_size")
        if key not in cache:
            cache[key] = _valid(light, {**point, "hidden_size": light.hidden_size}, space)
        return cache[key]

    return valid


def smallest_reachable(arch: GPTArch, space: SearchSpace, valid=None) -> dict | None:
    """The valid grid point with the fewest parameters (every budget grows with every axis)."""
    valid = valid or _validator(arch, space)
    best = None
    for point in grid(arch, space):
        if point == shape(arch) or not valid(point):
            continue
        params = arch_for(arch, point).num_parameters()
        if best is None or params < best[0]:
            best = (params, point)
    return candidate_record(arch, best[1], space) if best else None


def _nothing_fits(arch: GPTArch, space: SearchSpace, valid) -> str:
    small = smallest_reachable(arch, space, valid)
    bounds = (f"axes {list(space.axes)}, max_width_pruning={space.max_width_pruning}, "
              f"max_depth_pruning={space.max_depth_pruning}, multiples {[space.multiple(a) for a in space.axes]}, "
              f"TP={space.tp} PP={space.pp}")
    if small is None:
        return (f"the bounds ({bounds}) exclude every candidate: no pruned shape is reachable from "
                f"{candidate_id(shape(arch))} ({arch.num_parameters():,} parameters); allow more axes or more pruning")
    return (f"no candidate meets {space.describe_budget()} within the bounds ({bounds}): the smallest reachable size "
            f"is {small['parameters']:,} parameters ({small['non_embedding_parameters']:,} non-embedding, "
            f"{small['memory_gb']:.3f} GB) at {small['id']}; raise the budget or allow more pruning")
