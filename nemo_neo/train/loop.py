"""The training loop every stage uses (distillation, teacher correction, fine-tuning).

One optimizer step = one global batch: each data-parallel rank runs its micro-batches through the
(pipelined) model with megatron-core's schedule, gradients are reduced (DP, tied embeddings) and
scaled to a mean over all counted tokens of the global batch, clipped by the global norm, and
AdamW steps under a cosine (or linear) schedule. Progress bar (loss, tokens/s, ETA), TensorBoard scalars,
periodic validation and checkpoints; a rerun resumes from the latest checkpoint with identical data
order and RNG; a non-finite loss stops the run before anything is saved over the last good
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from nemo_neo import chaos
from nemo_neo.checkpoint.native import load_into_model, read_index, save_distributed
from nemo_neo.data.dataset import DistributedBatchSampler, collate
from nemo_neo.errors import RunStateError
from nemo_neo.parallel.chunks import as_chunks
from nemo_neo.parallel.reduce import sum_from_last_stage
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train import retention
from nemo_neo.train import state as ckpt_state
from nemo_neo.train.optim import OptimConfig, build_optimizer, current_lr
from nemo_neo.train.schedule import run_microbatches, wrap_ddp


class NonFiniteLossError(RunStateError):
    pass


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    save_every: int = 50
    save_keep_last: int = 2  # step checkpoints kept (older ones removed once a newer one is whole); 0 = all
    save_best_metric: str | None = None  # e.g. "val_loss": also keep the checkpoint where it was lowest
    eval_every: int = 25
    seed: int = 1234
    optim: OptimConfig = field(default_factory=OptimConfig)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Trainer:
    """Train `model` (this rank's stage: a GPT stage, a DistillationPair, a classifier wrapper) on a
    training set: packed token rows `[n, s + 1]` by default, or any indexable set of examples.

    train_data: anything with `len(train_data)` and `train_data[index_tensor]` (the examples of one
    micro-batch); `collate_fn` turns that into the micro-batch dict (default `collate`, for packed
    token rows; None when `train_data[index_tensor]` is the micro-batch dict already). The micro-batch's "input_ids" go to the model, and so do the entries the model names
    in its `batch_inputs` attribute (as keyword arguments, e.g. a classifier's per-row token index).

    loss_fn(output, batch) -> (loss_sum, num_tokens:int tensor, report) on the last stage; the
    gradient is that of sum(loss_sum) / sum(num_tokens) over the global batch.
    evaluate(model) -> dict of validation metrics (every rank calls it).
    companion: (label, module, arch) of a second model that trains too and is saved beside each
    checkpoint as `<label>_step_N` (e.g. the teacher corrected while the student distills), so a
    resume restores both. lr_overrides: see `build_optimizer`.
    Under an interleaved pipeline `model` (and `checkpoint_module`) is this rank's list of model chunks
    (`nemo_neo.parallel.chunks`): one DDP per chunk, one optimizer over all of them.
    """

    def __init__(self, ctx: ParallelContext, model, arch, loss_fn: Callable, train_data, cfg: TrainConfig,
                 run_dir, name: str, evaluate: Callable | None = None, tokenizer_src=None,
                 checkpoint_module: torch.nn.Module | None = None, adjust_tensor_shapes_fn=None,
                 lr_overrides: dict | None = None, companion: tuple | None = None,
                 collate_fn: Callable | None = collate):

        self.ctx, self.arch, self.cfg, self.name = ctx, arch, cfg, name
        self.loss_fn, self.evaluate, self.tokenizer_src = loss_fn, evaluate, tokenizer_src
        self.adjust = adjust_tensor_shapes_fn
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.train_data, self.collate_fn = train_data, collate_fn
        self.batch_inputs = tuple(getattr(as_chunks(model)[0], "batch_inputs", ()))
        for chunk in as_chunks(model):
            chunk.config.calculate_per_token_loss = True  # mean over all tokens of the global batch
        self.model = model
        self.saved_module = checkpoint_module or model  # e.g. the student of a DistillationPair
        self.ddp = wrap_ddp(model, use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, cfg.optim, cfg.steps, lr_overrides)
        self.companion = companion
        # train_data: an int64 [n, seq + 1] tensor, or any indexable set (len, gather) such as
        # nemo_neo.data.indexed.TokenSamples, which says when it is already shuffled
        self.sampler = DistributedBatchSampler(len(train_data), cfg.global_batch_size, cfg.micro_batch_size,
                                               ctx.dp_rank, ctx.dp_size, cfg.seed,
                                               shuffle=not getattr(train_data, "pre_shuffled", False))
        self.retention = retention.RetentionPolicy(cfg.save_keep_last, cfg.save_best_metric)
        self.history: list[dict] = []
        self.writer = None  # TensorBoard, on the main rank: opened by fit(), which knows the step it resumes from

    @property
    def log_file(self) -> Path:
        return self.run_dir / f"{self.name}_log.jsonl"

    def _open_logs(self, start: int) -> None:
        """Resume the records at `start`: the log keeps exactly its records of steps 1..start (a killed
        run may have logged steps after its last checkpoint, or half a line), and the history is
        read back from it, so that a stage killed after its last checkpoint still reports its whole
        curve. TensorBoard purges the events of steps after `start` (purge_step)."""
        history: list[dict] = []
        if self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            if start > 0 and self.log_file.is_file():
                for line in self.log_file.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by the kill
                        continue
                    if record.get("step", 0) <= start:
                        history.append(record)
                history = list({r["step"]: r for r in history}.values())  # one per step, the last wins
            tmp = self.log_file.with_name(f".{self.log_file.name}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
            os.replace(tmp, self.log_file)
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start + 1)
        if self.ctx.world_size > 1:  # every rank returns the same history
            box = [history]
            torch.distributed.broadcast_object_list(box, src=0)
            history = box[0]
        self.history = history

    def _microbatches(self, indices_per_micro):
        collate_fn = self.collate_fn or (lambda batch: batch)
        return [{k: v.to(self.ctx.device) for k, v in collate_fn(self.train_data[idx]).items()}
                for idx in indices_per_micro]

    def _log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"{self.name}/{k}", v, step)
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    @property
    def checkpoint_log_file(self) -> Path:
        return self.run_dir / f"{self.name}_checkpoints.jsonl"

    def companion_checkpoint(self, step: int) -> Path:
        return self.ckpt_root / f"{self.companion[0]}_step_{step:07d}"

    def _save(self, step: int, metrics: dict) -> None:
        if self.writer is not None:  # the events up to this checkpoint survive a kill (a resume keeps them)
            self.writer.flush()
        t0 = time.perf_counter()
        if self.companion is not None:  # before the main checkpoint, whose pointer move commits both
            _, module, arch = self.companion
            save_distributed(self.companion_checkpoint(step), arch, module, self.ctx, tokenizer_src=self.tokenizer_src,
                             metadata={"step": step}, overwrite=True)
        path = ckpt_state.save_training_checkpoint(self.ckpt_root, step, self.arch, self.saved_module, self.ctx,
                                                   self.optimizer, self.scheduler, self.sampler,
                                                   tokenizer_src=self.tokenizer_src, metrics=metrics)
        seconds = time.perf_counter() - t0  # every rank has written its part (the save ends in a barrier)
        chaos.point("checkpoint_saved")
        if self.ctx.is_main:  # only now that latest.json points to the new one may older ones go
            removed = retention.apply_retention(self.ckpt_root, self.retention, latest_step=step,
                                                 final_step=self.cfg.steps)
            saved = [path] + ([self.companion_checkpoint(step)] if self.companion is not None else [])
            self._log_checkpoint({"step": step, "save_seconds": seconds,
                                  "saved_bytes": sum(retention.directory_bytes(p) for p in saved),
                                  "removed": [p.name for p in removed],
                                  **retention.disk_report(self.ckpt_root)})

    def _log_checkpoint(self, record: dict) -> None:
        """Save time and size, one jsonl line per checkpoint (and TensorBoard), beside the step log."""
        with open(self.checkpoint_log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.add_scalar(f"{self.name}/checkpoint_save_seconds", record["save_seconds"], record["step"])
            self.writer.add_scalar(f"{self.name}/checkpoint_gb", record["saved_bytes"] / 2**30, record["step"])

    def fit(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        start = 0
        latest = ckpt_state.latest_checkpoint(self.ckpt_root)
        if latest is not None:
            start = ckpt_state.load_training_checkpoint(latest, self.arch, self.saved_module, ctx,
                                                        self.optimizer, self.scheduler, self.sampler)
            if self.companion is not None:
                _, module, arch = self.companion
                load_into_model(self.companion_checkpoint(start), module, arch, ctx)
        self._open_logs(start)
        batches = iter(self.sampler)
        # closed on any exit, so that an error line starts on a line of its own
        with tqdm(total=cfg.steps, initial=start, desc=self.name, unit="step", disable=not ctx.is_main,
                  dynamic_ncols=True) as bar:
            # the metrics of the step resumed from (its checkpoint records them): those of the last
            # step when training had finished before a kill
            metrics: dict = dict(read_index(latest)[1].get("metadata", {}).get("metrics", {})) if start else {}
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                for chunk in as_chunks(self.ddp):
                    chunk.train()
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                microbatches = self._microbatches(next(batches))
                # input tokens of the global batch (this rank's micro-batches, times the DP ranks)
                tokens_per_step = ctx.dp_size * sum(b["input_ids"].numel() for b in microbatches)
                reports = run_microbatches(self.ddp, microbatches, self.loss_fn, adjust_tensor_shapes_fn=self.adjust,
                                           forward_keys=self.batch_inputs)
                # loss_sum / tokens is the loss; the "<name>_sum"s a loss_fn declares in `extra_sums` are logged
                # per token too (declared, not read from reports: stages without the loss must reduce as many)
                extra = list(getattr(self.loss_fn, "extra_sums", ()))
                sums = torch.zeros(2 + len(extra), dtype=torch.float64)
                for r in reports:
                    sums += torch.stack([r[k].double().cpu() for k in ("loss_sum", "tokens", *extra)])
                loss_sum, tokens, *extra_sums = sum_from_last_stage(sums, ctx).tolist()
                loss = loss_sum / max(tokens, 1.0)
                if not math.isfinite(loss):
                    kept = ckpt_state.latest_checkpoint(self.ckpt_root)
                    raise NonFiniteLossError(
                        f"{self.name}: loss is {loss} at step {step}; stopped before the optimizer step. "
                        f"Last good checkpoint kept: {kept or 'none saved yet'}. Lower the LR or check the data."
                    )
                _, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(1)
                elapsed = time.perf_counter() - t0
                metrics = {"loss": loss, "lr": current_lr(self.optimizer), "grad_norm": float(grad_norm or 0.0),
                           "tokens_per_s": tokens_per_step / elapsed, "peak_memory_gb": peak_memory_bytes() / 2**30,
                           **{k[: -len("_sum")]: v / max(tokens, 1.0) for k, v in zip(extra, extra_sums)}}
                if self.evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    metrics.update({f"val_{k}": v for k, v in self.evaluate(self.model).items()})
                self._log(step, metrics)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", lr=f"{metrics['lr']:.2e}")
                bar.update(1)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self._save(step, metrics)
        if self.writer is not None:
            self.writer.close()
        chaos.point("trained")
        return {"final": metrics, "history": self.history, "resumed_from": start,
                "checkpoints": retention.disk_report(self.ckpt_root)}
