"""Put LoRA adapters on a megatron-core GPT stage, report, merge, and save / load them alone."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_neo.checkpoint import sharding
from nemo_neo.checkpoint.native import gather_stage_tensors
from nemo_neo.errors import ConfigError
from nemo_neo.parallel import chunks
from nemo_neo.parallel.reduce import merge_stage_dicts
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.peft.lora import LoRALinear, qkv_part_rows

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class LoRAConfigError(ConfigError):
    pass


@dataclass
class LoRAConfig:
    """targets: any of linear_qkv, linear_proj, linear_fc1, linear_fc2, or "all".
    qkv_parts: which of q, k, v of the fused projection get an adapter (KD-LoRA: ["q", "v"])."""

    rank: int = 128  # LLM-Neo's default; larger ranks want a lower LR (paper's guidance)
    alpha: float = 256.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["all"])
    qkv_parts: list = field(default_factory=lambda: ["q", "k", "v"])
    mixer: bool = False  # MoSLoRA
    seed: int = 0

    def resolved_targets(self) -> list[str]:
        targets = list(TARGETS) if "all" in self.targets else list(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise LoRAConfigError(f"unknown LoRA target module(s) {unknown}; choose from {list(TARGETS)} or 'all'")
        bad_parts = [p for p in self.qkv_parts if p not in ("q", "k", "v")]
        if bad_parts or not self.qkv_parts:
            raise LoRAConfigError(f"qkv_parts={self.qkv_parts}: use a non-empty subset of q, k, v")
        return targets


def _full_init(name: str, shape, seed: int) -> torch.Tensor:
    """The same full-size init on every rank (seeded by layer name), so TP shards agree."""
    digest = int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(digest)
    bound = 1.0 / (shape[1] ** 0.5)
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def apply_lora(model: torch.nn.Module, config: LoRAConfig, ctx: ParallelContext) -> dict[str, LoRALinear]:
    """Wrap the target linears of every layer of this stage; freeze everything else. Returns
    {global module name: adapter}."""

    targets = config.resolved_targets()
    for p in model.parameters():
        p.requires_grad_(False)
    offset = chunks.layer_offset(model, ctx)  # global layer numbers seed the init: the same at any PP/VPP
    adapters = {}
    for i, layer in enumerate(model.decoder.layers):
        for parent, attr in ((layer.self_attention, "linear_qkv"), (layer.self_attention, "linear_proj"),
                             (layer.mlp, "linear_fc1"), (layer.mlp, "linear_fc2")):
            if attr not in targets:
                continue
            base = getattr(parent, attr)
            rows = None
            if attr == "linear_qkv" and set(config.qkv_parts) != {"q", "k", "v"}:
                rows = qkv_part_rows(model.config, tuple(config.qkv_parts), ctx.tp_size)
            lora = LoRALinear(base, config.rank, config.alpha, config.dropout, config.mixer, rows, ctx.tp_size)
            name = f"decoder.layers.{i + offset}.{'self_attention' if 'linear_q' in attr or 'proj' in attr else 'mlp'}.{attr}"
            with torch.no_grad():  # TP-invariant init: every rank slices the same full A (and M)
                full_in = lora.lora_A.shape[1] * (ctx.tp_size if lora.row_parallel else 1)
                full_a = _full_init(name + ".lora_A", (config.rank, full_in), config.seed)
                lora.lora_A.copy_(sharding.shard(name + ".lora_A", full_a, ctx.tp_rank, ctx.tp_size))
                if lora.lora_M is not None:
                    lora.lora_M.copy_(_full_init(name + ".lora_M", (config.rank, config.rank), config.seed))
            setattr(parent, attr, lora)
            adapters[name] = lora
    return adapters


def adapters_of(model: torch.nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_report(model) -> dict:
    """Trainable and total parameters per module type (this rank's shard: a model or its chunks)."""
    report = defaultdict(lambda: {"trainable": 0, "total": 0})
    for name, p in (named for chunk in chunks.as_chunks(model) for named in chunk.named_parameters()):
        parts = [x for x in name.split(".") if not x.isdigit() and x not in ("decoder", "layers", "base", "weight", "bias")]
        kind = ".".join(parts[-2:]) if any(x.startswith("lora_") for x in parts) else (parts[-1] if parts else name)
        report[kind]["total"] += p.numel()
        if p.requires_grad:
            report[kind]["trainable"] += p.numel()
    total = sum(v["total"] for v in report.values())
    trainable = sum(v["trainable"] for v in report.values())
    return {"modules": dict(report), "trainable": trainable, "total": total,
            "trainable_percent": 100.0 * trainable / max(total, 1)}


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight and unwrap it. Returns the number merged."""
    count = 0
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attr, child.merged_base())
                count += 1
    return count


def adapter_state(model: torch.nn.Module, arch, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) adapter tensors of this stage with global names (collective over TP)."""

    out = {}
    for chunk in chunks.as_chunks(model):  # a model or this rank's chunks (interleaved pipeline)
        local = {n: p for n, p in chunk.named_parameters() if ".lora_" in n}
        out.update(gather_stage_tensors(local, arch, ctx, getattr(chunk, "vp_stage", None)))
    return out


def save_adapters(path, model, arch, ctx: ParallelContext, config: LoRAConfig) -> None:
    """Adapters alone (small) in one safetensors file + their config; collective, rank 0 writes."""
    import json
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file

    merged = merge_stage_dicts(adapter_state(model, arch, ctx), ctx)
    if ctx.is_main:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {k: v.contiguous() for k, v in merged.items()}
        meta = {"lora_config": json.dumps(config.__dict__), "hidden_size": str(arch.hidden_size),
                "num_layers": str(arch.num_layers)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(merged, str(tmp), metadata=meta)
        os.replace(tmp, path)
    dist.barrier()


def load_adapters(path, model, ctx: ParallelContext) -> None:
    """Load adapters saved by `save_adapters` into a LoRA-wrapped model at any TP/PP."""
    from safetensors import safe_open

    offset = chunks.layer_offset(model, ctx)
    with safe_open(str(path), framework="pt") as f:
        saved = set(f.keys())
        for name, p in model.named_parameters():
            if ".lora_" not in name:
                continue
            key = sharding.to_global(sharding.canonical_name(name), offset)
            if key not in saved:
                raise LoRAConfigError(f"{path} has no adapter {key}: it was saved for other target modules")
            full = f.get_tensor(key)
            piece = sharding.shard(key, full, ctx.tp_rank, ctx.tp_size)
            if piece.shape != p.shape:
                raise LoRAConfigError(
                    f"adapter {key} has shape {tuple(full.shape)} (this rank's slice {tuple(piece.shape)}) but the model "
                    f"expects {tuple(p.shape)}: the adapters were trained on a model of another shape or rank"
                )
            with torch.no_grad():
                p.copy_(piece)
