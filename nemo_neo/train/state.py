"""Training checkpoints: the model (native format) plus each rank's optimizer / schedule / data / RNG
state, published atomically, and a `latest` pointer that is only moved once a checkpoint is whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nemo_neo.checkpoint.hf_io import CheckpointError
from nemo_neo.checkpoint.native import load_into_model, rank_state_file, save_distributed
from nemo_neo.errors import disk_write_error
from nemo_neo.parallel.state import ParallelContext

LATEST = "latest.json"


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed_shards(optimizer) -> list:
    """megatron's DistributedOptimizers inside `optimizer` (chained or not), None for the others."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o if isinstance(o, DistributedOptimizer) else None for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def optimizer_state(optimizer, state: dict | None = None) -> dict:
    """Save (`state` None: returns this rank's optimizer entries of the training state) or restore them
    (`state`: the training state) at this layout; the one place that knows how (a later cross-layout resume changes only this).

    A plain megatron optimizer's `state_dict()` is all of it. A DistributedOptimizer's `state_dict()`
    keeps only what every DP rank shares (param groups, step, grad scaler): each rank's shard of the
    parameter state (fp32 main params, Adam moments) is added per rank, as it lies in the gradient
    buckets, with no gather (megatron's `get_parameter_state_dp_reshardable`, restored by
    `load_parameter_state_from_dp_reshardable`); so it reloads at the same TP/PP/DP only, which
    `load_training_checkpoint` checks first."""
    distributed = _distributed_shards(optimizer)
    if state is None:
        shards = [_own_shard(o) if o is not None else None for o in distributed]
        return {"optimizer": optimizer.state_dict(), "optimizer_shards": shards if any(distributed) else None}
    optimizer.load_state_dict(state["optimizer"])  # a DistributedOptimizer allocates its shard here
    for o, shard in zip(distributed, state.get("optimizer_shards") or [None] * len(distributed)):
        if (o is None) != (shard is None):
            raise CheckpointError("the checkpoint's optimizer state was saved with use_distributed_optimizer="
                                  f"{shard is not None} but this run has {o is not None}; resume with the same setting")
        if o is not None:
            with torch.no_grad():  # copies into shards of the parameters (megatron's callers do the same)
                o.load_parameter_state_from_dp_reshardable(shard)
    return state


def _own_shard(optimizer) -> dict:
    state = optimizer.get_parameter_state_dp_reshardable()
    for gbuf_idx in range(len(optimizer.gbuf_ranges)):
        for buckets in state[gbuf_idx].values():
            for bucket in buckets:
                for i, tensors in enumerate(bucket):
                    # clones: an fp32 main param is a view of the whole parameter buffer, which torch.save
                    # would write out entire; "padding" is what the loader filters on
                    bucket[i] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in tensors.items()}
                    bucket[i]["padding"] = False
    return state


def layout(ctx: ParallelContext) -> dict:
    # vpp only when interleaved, so that checkpoints saved before it existed still match
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size, **({"vpp": ctx.vpp_size} if ctx.vpp_size > 1 else {})}


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / json.loads(pointer.read_text())["name"]
    return path if path.is_dir() else None


def save_training_checkpoint(ckpt_root: Path, step: int, arch, model, ctx: ParallelContext, optimizer, scheduler, sampler,
                             tokenizer_src=None, metrics: dict | None = None) -> Path:
    ckpt_root = Path(ckpt_root)
    name = f"step_{step:07d}"
    state = {
        "step": step,
        "layout": layout(ctx),
        **optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_state(),
    }
    out = save_distributed(ckpt_root / name, arch, model, ctx, tokenizer_src=tokenizer_src,
                           metadata={"step": step, "metrics": metrics or {}}, overwrite=True, rank_state=state)
    if ctx.is_main:  # move the pointer only now that the checkpoint is complete
        tmp = ckpt_root / f".{LATEST}.tmp"
        try:
            tmp.write_text(json.dumps({"name": name, "step": step}) + "\n")
            os.replace(tmp, ckpt_root / LATEST)
        except OSError as e:  # the old pointer (to the last complete checkpoint) stays valid
            tmp.unlink(missing_ok=True)
            raise disk_write_error(e, ckpt_root / LATEST) from e
    torch.distributed.barrier()
    return out


def load_training_checkpoint(path: Path, arch, model, ctx: ParallelContext, optimizer, scheduler, sampler) -> int:
    """Restore everything saved by `save_training_checkpoint`; returns the step to continue from."""
    load_into_model(path, model, arch, ctx)
    state_file = rank_state_file(path, ctx.rank)
    if not state_file.is_file():
        raise CheckpointError(f"{path} has no training state for rank {ctx.rank}; it was saved with another world size.")
    state = torch.load(state_file, weights_only=False)
    if state["layout"] != layout(ctx):
        raise CheckpointError(
            f"{path} was saved at layout {state['layout']} but this run is {layout(ctx)}: optimizer state is "
            "sharded by layout; resume with the same TP/PP/DP, or start a new run from its weights."
        )
    optimizer_state(optimizer, state)
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state["step"]
