"""Write a teacher cache: run the frozen teacher over the training samples once, at any TP / PP / DP.

    write_teacher_cache(ctx, teacher_ckpt, train_samples, "cache/", top_k=32, temperature=1.0,
                        valid_samples=valid_rows)

The samples' chunks (`teacher_cache`) are dealt round-robin to the data-parallel ranks; within a DP
rank's model-parallel group the teacher runs pipelined (megatron-core's forward-only schedule) and
tensor-parallel (the global top-K and the tail mass are reduced over the vocab shards, so every TP
rank holds the same targets); the last stage's first TP rank writes each chunk, atomically. The
chunks already on disk are skipped: rerunning after a kill resumes with the missing ones. A cache
made by another teacher / tokenizer / dataset / sequence length / K / temperature is refused.
With `valid_samples` the held-out rows are cached too, as the validation split (the distillation's
validation KL reads it); resuming a cache written without that split adds it.
"""

from __future__ import annotations

import json
import os
import time
from itertools import groupby
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from nemo_neo.checkpoint.load import load_model
from nemo_neo.data.dataset import collate
from nemo_neo.distill import teacher_cache as tc
from nemo_neo.distill.losses import _chunk_size
from nemo_neo.distill.sparse_kl import TopKTargets, teacher_topk_targets
from nemo_neo.models.dtype import default_dtype
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train.schedule import run_microbatches


def _broadcast(value, ctx: ParallelContext):
    if ctx.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _resume_problems(have: dict, want: dict) -> list[str]:
    wrong = tc.mismatches(have, want)
    if have.get("valid") and want.get("valid") and have["valid"]["dataset"] != want["valid"]["dataset"]:
        wrong.append(f"validation set (dataset: cache {have['valid']['dataset']!r}, this run {want['valid']['dataset']!r})")
    return wrong


def _open_cache(root: Path, want: dict, ctx: ParallelContext) -> tuple[dict, list[tuple[str, int]]]:
    """Create or resume the cache (main rank); every rank gets its manifest and the (split, chunk)
    pairs of this run's splits still to write. A cache without the validation split that this run
    has gains it."""
    pending, error, manifest = None, None, want
    if ctx.is_main:
        path = root / tc.MANIFEST
        if path.is_file():
            have = json.loads(path.read_text())
            wrong = _resume_problems(have, want)
            if wrong:
                error = (f"{root} holds a teacher cache for another {'; another '.join(wrong)}: choose another "
                         "directory or delete it.")
            elif "valid" in want and "valid" not in have:
                have["valid"] = want["valid"]
            manifest = have
        elif root.exists() and any(root.iterdir()):
            error = f"{root} is not empty and holds no teacher cache ({tc.MANIFEST}): choose another directory."
        if error is None:
            root.mkdir(parents=True, exist_ok=True)
            tc.remove_partial_chunks(root)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, path)
            pending = [(split, chunk) for split in tc.SPLITS if tc.split_of(want, split)
                       for chunk in sorted(set(range(tc.split_of(manifest, split)["num_chunks"]))
                                           - tc.finished_chunks(root, split))]
    error, manifest, pending = _broadcast((error, manifest, pending), ctx)
    if error:
        raise tc.TeacherCacheError(error)
    return manifest, pending


def _targets_fn(top_k: int, temperature: float, tp_group):
    """forward-only loss_fn on the last stage: teacher logits [b, s, V/TP] -> their TopKTargets (in
    token chunks, so that only a ~1M-element fp32 slice of the logits is upcast at a time)."""

    def fn(logits, batch):
        vocab_local = logits.shape[-1]
        flat = logits.detach().reshape(-1, vocab_local)
        chunk = _chunk_size("auto", flat.shape[0], vocab_local, flat.device)
        parts = [teacher_topk_targets(flat[i : i + chunk].float(), top_k, temperature, tp_group)
                 for i in range(0, flat.shape[0], chunk)]
        b, s = logits.shape[:2]
        targets = TopKTargets(*(torch.cat(p).reshape(b, s, *p[0].shape[1:]).cpu() for p in zip(*parts)))
        return torch.zeros(()), {"targets": targets}

    return fn


@torch.no_grad()
def write_teacher_cache(ctx: ParallelContext, teacher_ckpt, samples, out_dir, top_k: int, temperature: float = 1.0,
                        chunk_samples: int = 64, micro_batch_size: int = 4, values_dtype: str = "float16",
                        dtype=None, progress: bool = True, valid_samples=None) -> dict:
    """Cache the teacher's top-K targets for every sample of `samples` (rows [n, seq + 1], e.g. the
    training TokenSamples) and of `valid_samples` (the held-out rows, optional) in `out_dir`.
    Collective. Returns the manifest plus this run's counts."""
    root = Path(out_dir)
    manifest = tc.make_manifest(teacher_ckpt, samples, top_k, temperature, values_dtype, chunk_samples, valid_samples)
    manifest, pending = _open_cache(root, manifest, ctx)
    split_samples = {"train": samples, "valid": valid_samples}
    mine = pending[ctx.dp_rank :: ctx.dp_size]
    written = {"chunks": 0, "bytes": 0, "tokens": 0}
    start = time.perf_counter()
    if pending:
        teacher, _, _ = load_model(teacher_ckpt, ctx, dtype or default_dtype())
        teacher.eval()
        writes = ctx.is_last_stage and ctx.tp_rank == 0
        fn = _targets_fn(top_k, temperature, ctx.tp_group if ctx.tp_size > 1 else None)
        seq = manifest["seq_length"]
        per_token = tc.bytes_per_token(top_k, manifest["vocab_size"], values_dtype)
        with tqdm(total=len(mine) * chunk_samples * seq, desc="cache_teacher", unit="tok", unit_scale=True,
                  disable=not (progress and ctx.is_main), dynamic_ncols=True) as bar:
            for split, chunk in mine:
                source = split_samples[split]
                indices = torch.arange(chunk * chunk_samples, min((chunk + 1) * chunk_samples, len(source)))
                rows = source[indices]
                batches = [{k: v.to(ctx.device) for k, v in collate(rows[i : i + micro_batch_size]).items()}
                           for i in range(0, len(rows), micro_batch_size)]
                # one schedule per run of equal-shaped micro-batches: a pipeline sizes its stage-to-stage
                # buffers from one micro-batch shape, and a chunk's last micro-batch may be shorter
                reports = [r for _, group in groupby(batches, key=lambda b: b["input_ids"].shape)
                           for r in run_microbatches(teacher, list(group), fn, forward_only=True)]
                if writes:
                    targets = TopKTargets(*(torch.cat(p) for p in zip(*(r["targets"] for r in reports))))
                    written["bytes"] += tc.write_chunk(root, chunk, targets, rows, manifest, split)
                written["chunks"] += 1
                written["tokens"] += len(rows) * seq
                bar.update(len(rows) * seq)
                # this DP rank's share times the DP ranks (every rank knows it, not only the writers)
                bar.set_postfix(GB_written=f"{written['tokens'] * per_token * ctx.dp_size / 1e9:.3f}")
        del teacher
    if ctx.world_size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    return {**manifest, "cache": str(root), "chunks_written": written["chunks"] * ctx.dp_size,
            "chunks_skipped": sum(tc.split_of(manifest, s)["num_chunks"] for s in tc.SPLITS
                                  if split_samples[s] is not None and len(split_samples[s])) - len(pending),
            "seconds": round(seconds, 2),
            "bytes_per_token": tc.bytes_per_token(top_k, manifest["vocab_size"], values_dtype),
            "tokens_per_s": written["tokens"] * ctx.dp_size / max(seconds, 1e-9)}
