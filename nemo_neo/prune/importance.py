"""Activation-based importance of heads, MLP neurons and embedding channels (Minitron).

Forward-only calibration: hooks record, for every sample,
  * head h of layer l:   ||attention output of head h||_2 over head_dim, taken at the input of the
                         attention output projection (linear_proj);
  * neuron n of layer l: |activation| at the input of the second MLP linear (linear_fc2);
  * channel c:           |LN(X)_c| at the outputs of every layer norm (input and pre-MLP), summed
                         over layers;
then aggregates over the sequence (default: mean) and over the batch of samples (default: L2 norm),
the paper's best setting. Absolute values are taken before the sequence mean so that a neuron that
fires strongly with either sign is not scored as zero. Alternatives per axis: mean, l2, var.

TP: heads and neurons are split over the TP ranks (each rank sees its own heads/neurons at those
hook points, in global order rank by rank) and are all-gathered; channels are replicated. PP: each
stage scores its own layers; results are gathered with global layer numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train.schedule import run_microbatches

AGGREGATIONS = ("mean", "l2", "var")


@dataclass
class ImportanceConfig:
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    num_samples: int = 1024
    micro_batch_size: int = 4

    def __post_init__(self):
        for axis, value in (("seq_agg", self.seq_agg), ("batch_agg", self.batch_agg)):
            if value not in AGGREGATIONS:
                raise ValueError(f"{axis}={value!r} is not one of {AGGREGATIONS}")


def _over_sequence(x: torch.Tensor, how: str) -> torch.Tensor:
    """x: [s, b, n] non-negative -> [b, n]."""
    if how == "mean":
        return x.mean(0)
    if how == "l2":
        return x.pow(2).sum(0).sqrt()
    return x.var(0, unbiased=False)


class _BatchAccumulator:
    """Streaming aggregation over samples: sum, sum of squares and count of [b, n] rows."""

    def __init__(self):
        self.sum = self.sumsq = None
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        s, q = rows.sum(0), rows.pow(2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += rows.shape[0]

    def result(self, how: str) -> torch.Tensor:
        if how == "l2":
            return self.sumsq.sqrt()
        mean = self.sum / self.count
        return mean if how == "mean" else self.sumsq / self.count - mean.pow(2)


class ImportanceRecorder:
    """Forward hooks on one pipeline stage of a megatron-core GPT (local or TE spec)."""

    def __init__(self, model, config: ImportanceConfig):
        self.config = config
        self.heads, self.neurons, self.channels = {}, {}, {}
        self.handles = []
        mc = model.config
        self.head_dim = mc.kv_channels
        for i, layer in enumerate(model.decoder.layers):
            self._hook(layer.self_attention.linear_proj, self.heads, (i, "proj"), pre=True, heads=True)
            self._hook(layer.mlp.linear_fc2, self.neurons, (i, "fc2"), pre=True)
            for name in ("input_layernorm", "pre_mlp_layernorm"):
                norm = getattr(layer, name, None)
                if norm is not None and not isinstance(norm, torch.nn.Identity):
                    self._hook(norm, self.channels, (i, name), pre=False)

    def _hook(self, module, store: dict, key: tuple, pre: bool, heads: bool = False):
        def record(x: torch.Tensor):
            x = x.detach().float()
            if heads:  # [s, b, heads * d] -> per-head L2 over head_dim
                x = x.view(*x.shape[:2], -1, self.head_dim).norm(dim=-1)
            else:
                x = x.abs()
            store.setdefault(key, _BatchAccumulator()).add(_over_sequence(x, self.config.seq_agg))

        if pre:
            self.handles.append(module.register_forward_pre_hook(lambda m, args: record(args[0])))
        else:
            self.handles.append(module.register_forward_hook(lambda m, args, out: record(out[0] if isinstance(out, tuple) else out)))

    def remove(self):
        for h in self.handles:
            h.remove()

    def local_scores(self) -> dict:
        agg = self.config.batch_agg
        layers = sorted({k[0] for k in self.heads})
        heads = torch.stack([self.heads[(i, "proj")].result(agg) for i in layers])
        neurons = torch.stack([self.neurons[(i, "fc2")].result(agg) for i in layers])
        channels = sum(acc.result(agg) for acc in self.channels.values())
        return {"heads": heads, "neurons": neurons, "channels": channels}


@torch.no_grad()
def compute_importance(model, arch, ctx: ParallelContext, rows: torch.Tensor, config: ImportanceConfig | None = None) -> dict:
    """Score every head, neuron and channel of `model` (this rank's TP/PP slice) on calibration rows
    [n, s(+1)]. Returns full scores on every rank: heads [L, H], neurons [L, F], channels [h]."""

    config = config or ImportanceConfig()
    rows = rows[: config.num_samples]
    model.eval()
    recorder = ImportanceRecorder(model, config)
    mbs = config.micro_batch_size
    try:
        for i in tqdm(range(0, len(rows), mbs), desc="importance", unit="batch", disable=not ctx.is_main, dynamic_ncols=True):
            batch = {"input_ids": rows[i : i + mbs, :-1].to(ctx.device)}
            run_microbatches(model, [batch], lambda out, b: (out.sum() * 0.0, {}), forward_only=True)
    finally:
        recorder.remove()
    local = recorder.local_scores()
    if ctx.tp_size > 1:  # heads and neurons are split over TP ranks: concatenate in rank order
        for key in ("heads", "neurons"):
            parts = [torch.empty_like(local[key]) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, local[key].contiguous().to(ctx.device), group=ctx.tp_group)
            local[key] = torch.cat([p.cpu() for p in parts], dim=1)
    if ctx.pp_size > 1:
        stages = [None] * ctx.pp_size
        dist.all_gather_object(stages, {k: v.cpu() for k, v in local.items()}, group=ctx.pp_group)
        local = {
            "heads": torch.cat([s["heads"] for s in stages]),
            "neurons": torch.cat([s["neurons"] for s in stages]),
            "channels": sum(s["channels"] for s in stages),
        }
    assert local["heads"].shape == (arch.num_layers, arch.num_attention_heads)
    return {**{k: v.cpu() for k, v in local.items()}, "config": asdict(config), "num_samples": len(rows)}


def save_scores(scores: dict, path) -> None:
    torch.save(scores, path)


def load_scores(path) -> dict:
    return torch.load(path, weights_only=False)
