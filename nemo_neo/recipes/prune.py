"""Prune a checkpoint end to end (single process): calibrate, choose units / layers, write."""

from __future__ import annotations

import time
from pathlib import Path

from nemo_neo.checkpoint.hf_io import CheckpointError, copy_tokenizer_files, has_tokenizer
from nemo_neo.checkpoint.load import load_model
from nemo_neo.checkpoint.native import load_full_state, save_full_state
from nemo_neo.data.from_text import indexed_from_text
from nemo_neo.parallel import initialize
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.prune.depth import drop_layers
from nemo_neo.prune.importance import ImportanceConfig, compute_importance, load_scores, save_scores
from nemo_neo.prune.width import prune_width, pruned_arch
from nemo_neo.recipes.default_teacher import cache_root
from nemo_neo.recipes.depth_search import loss_metric, search_depth, task_metric, write_report

WIDTH_KEYS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def text_samples(ckpt, text_files, seq_length: int, train_samples: int):
    """(training samples, held-out rows) of text files (default: CPython's docs), tokenized by the
    checkpoint's tokenizer: calibration, and the architecture search's short distillations."""
    from transformers import AutoTokenizer

    if not has_tokenizer(ckpt):
        raise CheckpointError(f"{ckpt} has no tokenizer files, so calibration text cannot be tokenized; convert the "
                              "model with its tokenizer, or pass importance scores with --scores")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    return indexed_from_text(text_files or [], tokenizer, seq_length, train_samples=train_samples,
                             valid_fraction=0.1, cache_dir=cache_root() / "indexed")


def _calibration_rows(ckpt, calib_data, seq_length: int, num_samples: int):
    train, valid = text_samples(ckpt, calib_data, seq_length, num_samples)
    return train.rows(num_samples), valid


def prune_checkpoint(ckpt, out, target: dict, drop: list[int] | None = None, calib_data=None, num_samples: int = 1024,
                     seq_length: int = 256, scores_path=None, save_scores_path=None, tp: int = 1, pp: int = 1,
                     overwrite: bool = False, importance: ImportanceConfig | None = None, depth_metric: str = "loss",
                     task_limit: int | None = None, data_dir=None, ctx: ParallelContext | None = None, calib_rows=None, valid_rows=None) -> dict:
    """depth_metric: "loss" (LM validation loss on held-out calibration text) or "task:<lm-eval task>"
    (accuracy, e.g. task:neo_winogrande with data_dir=../shared/data).
    ctx: run inside an already initialized (torchrun) job: every rank calibrates its model shard
    (TP/PP), the main rank writes, all return together. calib_rows / valid_rows: token rows to
    calibrate on / rank layers by instead of reading `calib_data`."""

    start = time.perf_counter()

    needs_text = (any(k in WIDTH_KEYS for k in target) and not scores_path) or ("num_layers" in target and not drop)
    if needs_text and calib_rows is None and not has_tokenizer(ckpt):  # before any heavy work
        raise CheckpointError(f"{ckpt} has no tokenizer files, so calibration text cannot be tokenized; convert the "
                              "model with its tokenizer, or pass importance scores with --scores")
    arch, state, _ = load_full_state(ckpt)
    pruned_arch(arch, target, tp, pp)  # validate the whole target before any work
    width = {k: v for k, v in target.items() if k in WIDTH_KEYS}
    report: dict = {"source": str(ckpt), "target": target}
    needs_model = bool(width) or ("num_layers" in target and not drop)
    if needs_model:
        ctx = ctx or initialize()
        if calib_rows is not None:
            train, valid = calib_rows, valid_rows
        else:
            train, valid = _calibration_rows(ckpt, calib_data, seq_length, num_samples)
    if width:
        if scores_path:
            scores = load_scores(scores_path)
        else:
            # no sequence parallelism: the importance hooks aggregate over every token of a sequence
            model, _, _ = load_model(ckpt, ctx, sequence_parallel=False)
            config = importance or ImportanceConfig(num_samples=num_samples)
            scores = compute_importance(model, arch, ctx, train, config)
            del model
        if save_scores_path:
            save_scores(scores, save_scores_path)
        arch, state = prune_width(arch, state, scores, width, tp, pp)
        report["importance"] = {"num_samples": scores["num_samples"], **scores["config"]}
    depth_result = None
    if "num_layers" in target and target["num_layers"] < arch.num_layers and not drop:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # search on the (possibly width-pruned) model
            save_full_state(Path(tmp) / "m", arch, state)
            model, _, _ = load_model(Path(tmp) / "m", ctx, sequence_parallel=False)
            if depth_metric.startswith("task:"):
                metric, higher = task_metric(ctx, ckpt, depth_metric[5:], task_limit, data_dir), True
            elif depth_metric == "loss":
                metric, higher = loss_metric(ctx, valid), False
            else:
                raise ValueError(f"depth_metric={depth_metric!r}: use 'loss' or 'task:<lm-eval task name>'")
            depth_result = search_depth(model, ctx, arch.num_layers - target["num_layers"], metric, higher_is_better=higher)
        drop = depth_result["drop_layers"]
    if drop:
        arch, state = drop_layers(arch, state, drop)
        report["dropped_layers"] = sorted(set(drop))
    main = ctx is None or ctx.is_main
    if main:
        out = save_full_state(out, arch, state, lambda dst: copy_tokenizer_files(Path(ckpt), dst),
                              metadata={"pruning": report}, overwrite=overwrite)
        if depth_result is not None:
            write_report(depth_result, Path(out) / "pruning")
    if ctx is not None and ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # the others continue once the pruned checkpoint exists
    report.update(out=str(out), parameters=arch.num_parameters(), seconds=round(time.perf_counter() - start, 2))
    return report
