"""The nemo_neo checkpoint: full (unsharded) tensors with global layer numbers, in safetensors.

Layout of a checkpoint directory:
    config.json                 the architecture, as a Hugging Face config
    nemo_neo.json               format version, TP/PP it was saved with, tensor -> file/shape/dtype,
                                and free-form metadata (training step, stage, ...)
    weights-ppNNN.safetensors   one file per pipeline stage it was saved from
    tokenizer files             copied through so exports to HF are complete

Because tensors are stored whole, loading at any TP/PP is a matter of each rank reading its own
slice (safetensors reads slices without loading the full tensor). Saving gathers TP shards to the
stage's first rank, which writes that stage's file; global rank 0 writes the index. All writes go
to a temporary directory that replaces the target only when complete (see `atomic`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nemo_neo.checkpoint import atomic, sharding
from nemo_neo.checkpoint.hf_io import CheckpointError, copy_tokenizer_files
from nemo_neo.checkpoint.hf_mapping import expected_neo_shapes
from nemo_neo.models.arch import GPTArch, arch_from_hf_config
from nemo_neo.parallel import chunks
from nemo_neo.parallel.reduce import merge_stage_dicts
from nemo_neo.parallel.state import ParallelContext

FORMAT = "nemo_neo-checkpoint"
VERSION = 1
INDEX = "nemo_neo.json"


def _stage_file(pp_rank: int) -> str:
    return f"weights-pp{pp_rank:03d}.safetensors"


def _write_index(tmp: Path, arch: GPTArch, tensors: dict, tp: int, pp: int, metadata: dict | None) -> None:
    (tmp / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2, sort_keys=True) + "\n")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "saved_with": {"tensor_parallel": tp, "pipeline_parallel": pp},
        "metadata": metadata or {},
        "tensors": dict(sorted(tensors.items())),
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")


def _describe(state: dict[str, torch.Tensor], fname: str) -> dict:
    return {k: {"file": fname, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()}


def save_full_state(out, arch: GPTArch, state: dict[str, torch.Tensor], save_tokenizer=None,
                    metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Single-process save of a complete neo state dict (used by the converter and pruning)."""
    _check_complete(arch, {k: {"shape": list(v.shape)} for k, v in state.items()}, "state")
    with atomic.atomic_directory(out, overwrite) as tmp:
        fname = _stage_file(0)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / fname), metadata={"format": "pt"})
        _write_index(tmp, arch, _describe(state, fname), 1, 1, metadata)
        if save_tokenizer is not None:
            save_tokenizer(tmp)
    return Path(out)


def local_tensors(model: torch.nn.Module, arch: GPTArch) -> dict[str, torch.Tensor]:
    """This rank's tensors that belong in a checkpoint (no TE extra state, no tied head copy)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("_extra_state") or tensor is None:
            continue
        name = sharding.canonical_name(name)
        if arch.tie_embeddings and name == "output_layer.weight":
            continue
        out[name] = tensor
    return out


def gather_stage_tensors(local: dict[str, torch.Tensor], arch: GPTArch, ctx: ParallelContext,
                         vp_stage: int | None = None) -> dict[str, torch.Tensor]:
    """Collective over the TP group: this stage's (or model chunk's) local tensors -> full tensors,
    global names, CPU."""
    offset = chunks.chunk_layer_offset(arch.num_layers, ctx, vp_stage)
    full = {}
    for name, tensor in local.items():
        if ctx.tp_size > 1 and sharding.tp_split(name) is not None:
            parts = [torch.empty_like(tensor) for _ in range(ctx.tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=ctx.tp_group)
            tensor = sharding.unshard(name, parts)
        # A copy: on CPU .cpu() would alias grad buffers or live parameters.
        full[sharding.to_global(name, offset)] = tensor.detach().to("cpu", copy=True)
    return full


RANK_STATE_DIR = "train_state"


def rank_state_file(ckpt, rank: int) -> Path:
    return Path(ckpt) / RANK_STATE_DIR / f"rank{rank:05d}.pt"


def save_distributed(out, arch: GPTArch, model: torch.nn.Module, ctx: ParallelContext, tokenizer_src=None,
                     metadata: dict | None = None, overwrite: bool = False, rank_state: dict | None = None) -> Path:
    """Collective save from every rank of a (possibly TP/PP-sharded) model, or of this rank's model
    chunks (a list, interleaved pipeline): each chunk's layers under their global numbers.

    `rank_state` (optimizer, scheduler, data position, RNG) is this rank's training state; each rank
    writes its own file into the same checkpoint, which only appears once every rank has written."""
    out = Path(out)
    tmp = atomic.tmp_path_for(out)
    if ctx.is_main:
        atomic.check_output_dir(out, overwrite)
        with atomic.cleaned_up_on_error(tmp, out):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
    dist.barrier()
    full = {}
    for chunk in chunks.as_chunks(model):
        full.update(gather_stage_tensors(local_tensors(chunk, arch), arch, ctx, getattr(chunk, "vp_stage", None)))
    writer = ctx.tp_rank == 0 and ctx.dp_rank == 0
    described = {}
    # A rank whose write fails raises here; the others then wait at the next collective until
    # torchrun ends the job (a dead rank ends the job). `out` keeps what it held.
    with atomic.cleaned_up_on_error(tmp, out):
        if writer:
            fname = _stage_file(ctx.pp_rank)
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / fname), metadata={"format": "pt"})
            described = _describe(full, fname)
        if rank_state is not None:
            rank_state_file(tmp, ctx.rank).parent.mkdir(exist_ok=True)
            torch.save(rank_state, rank_state_file(tmp, ctx.rank))
    tensors = merge_stage_dicts(described, ctx)
    if ctx.is_main:
        with atomic.cleaned_up_on_error(tmp, out):
            _check_complete(arch, tensors, "distributed save")
            _write_index(tmp, arch, tensors, ctx.tp_size, ctx.pp_size, metadata)
            if tokenizer_src is not None:
                copy_tokenizer_files(Path(tokenizer_src), tmp)
            atomic.publish(tmp, out)
    dist.barrier()
    return out


def link_model_files(ckpt, out, overwrite: bool = False) -> Path:
    """`out`: the model of checkpoint `ckpt` (weights, index, tokenizer) without its training state,
    as hard links where the filesystem allows (no second copy on disk; the files stay when `ckpt` is
    later removed), written atomically. For a stage's result that must outlive its resume state."""
    ckpt = Path(ckpt)
    read_index(ckpt)  # a clear error when it is not a checkpoint
    with atomic.atomic_directory(out, overwrite=overwrite) as tmp:
        for src in ckpt.iterdir():
            if src.is_file():
                try:
                    os.link(src, tmp / src.name)
                except OSError:  # another filesystem, or links not allowed: copy
                    shutil.copy2(src, tmp / src.name)
    return Path(out)


def is_neo_checkpoint(path) -> bool:
    """A directory written by nemo_neo (it holds the index file)."""
    return (Path(path) / INDEX).is_file()


def read_index(ckpt) -> tuple[GPTArch, dict]:
    ckpt = Path(ckpt)
    index_file = ckpt / INDEX
    if not index_file.is_file():
        hint = " It looks like a Hugging Face directory: convert it with `tools/convert_checkpoint.py hf-to-neo`." if (ckpt / "config.json").is_file() else ""
        raise CheckpointError(f"{ckpt} is not a nemo_neo checkpoint (no {INDEX}).{hint}")
    index = json.loads(index_file.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CheckpointError(f"{index_file}: unknown format {index.get('format')} v{index.get('version')}.")
    arch = arch_from_hf_config(json.loads((ckpt / "config.json").read_text()))
    _check_complete(arch, index["tensors"], str(ckpt))
    return arch, index


def _check_complete(arch: GPTArch, tensors: dict, where: str) -> None:
    expected = expected_neo_shapes(arch)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(n for n in set(tensors) - set(expected) if not sharding.is_adapter(n))
    wrong = [f"{k}: {tuple(tensors[k]['shape'])} != {v}" for k, v in expected.items() if k in tensors and tuple(tensors[k]["shape"]) != v]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if extra:
            parts.append(f"unexpected tensors (e.g. {extra[:3]})")
        if wrong:
            parts.append(f"shapes do not match config.json ({wrong[:3]})")
        raise CheckpointError(f"{where}: " + "; ".join(parts) + ". The checkpoint does not match its config.")


class _Reader:
    """Opens each safetensors file once and turns read errors into CheckpointError."""

    def __init__(self, ckpt: Path):
        self.ckpt, self.handles = ckpt, {}

    def slice(self, fname: str, name: str, ranges):
        try:
            if fname not in self.handles:
                self.handles[fname] = safe_open(str(self.ckpt / fname), framework="pt")
            sl = self.handles[fname].get_slice(name)
            pieces = []
            for dim, start, stop in ranges:
                index = [slice(None)] * len(sl.get_shape())
                index[dim] = slice(start, stop)
                pieces.append(sl[tuple(index)])
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {self.ckpt / fname}: missing, truncated or corrupt ({e}).") from None
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def load_full_state(ckpt) -> tuple[GPTArch, dict[str, torch.Tensor], dict]:
    """Every tensor of a checkpoint, unsharded. Returns (arch, state, index)."""
    ckpt = Path(ckpt)
    arch, index = read_index(ckpt)
    reader = _Reader(ckpt)
    state = {name: reader.slice(info["file"], name, [(0, 0, info["shape"][0])]) for name, info in index["tensors"].items()}
    return arch, state, index


def load_into_model(ckpt, model, arch: GPTArch, ctx: ParallelContext) -> dict:
    """Fill this rank's (TP/PP-sharded) model, or its list of model chunks (interleaved pipeline),
    from a checkpoint saved at any TP/PP/VPP. Returns metadata."""
    ckpt = Path(ckpt)
    saved_arch, index = read_index(ckpt)
    if expected_neo_shapes(saved_arch) != expected_neo_shapes(arch):
        raise CheckpointError(f"{ckpt} holds a different architecture than the model being loaded.")
    reader = _Reader(ckpt)
    for chunk in chunks.as_chunks(model):
        _load_chunk(reader, index, chunk, arch, ctx)
    return index["metadata"]


def _load_chunk(reader: _Reader, index: dict, model: torch.nn.Module, arch: GPTArch, ctx: ParallelContext) -> None:
    offset = chunks.layer_offset(model, ctx, arch.num_layers)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state") or tensor is None:
                continue
            source = sharding.to_global(sharding.canonical_name(name), offset)
            if sharding.is_adapter(source) and source not in index["tensors"]:
                continue  # an adapter-free checkpoint loaded into a LoRA-wrapped model: adapters keep their init
            if arch.tie_embeddings and name == "output_layer.weight":
                source = "embedding.word_embeddings.weight"  # last stage's copy of the tied weights
            info = index["tensors"][source]
            ranges = sharding.slice_ranges(source, tuple(info["shape"]), ctx.tp_rank, ctx.tp_size)
            value = reader.slice(info["file"], source, ranges)
            if value.shape != tensor.shape:
                raise CheckpointError(f"{source}: slice {tuple(value.shape)} does not fit parameter {tuple(tensor.shape)}.")
            tensor.copy_(value.to(tensor.dtype))
