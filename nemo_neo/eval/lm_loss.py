"""Mean next-token loss of a (TP/PP-sharded) model over packed sequences."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from nemo_neo.parallel.reduce import sum_from_last_stage
from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train.schedule import run_microbatches


@torch.no_grad()
def validation_loss(model, ctx: ParallelContext, sequences: torch.Tensor, micro_batch_size: int = 4, desc: str = "validation") -> dict:
    """`sequences` is [n, seq_len + 1]. Every rank passes the same rows; data-parallel ranks take a
    strided share. Returns {"loss", "perplexity", "tokens"} on every rank."""
    model.eval()
    rows = sequences[ctx.dp_rank :: ctx.dp_size]
    batches = [
        {"input_ids": rows[i : i + micro_batch_size, :-1].to(ctx.device), "labels": rows[i : i + micro_batch_size, 1:].to(ctx.device)}
        for i in range(0, len(rows), micro_batch_size)
    ]

    def sum_loss(per_token_loss, batch):
        total = per_token_loss.double().sum()
        return total, {"sum": total.detach().clone(), "count": torch.tensor(float(per_token_loss.numel()), dtype=torch.float64)}

    total = torch.zeros(2, dtype=torch.float64)
    show = ctx.is_main
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not show, dynamic_ncols=True):
        for report in run_microbatches(model, [batch], sum_loss, forward_only=True, pass_labels=True):
            total += torch.stack([report["sum"].cpu(), report["count"]])
    total = sum_from_last_stage(total, ctx)
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(total[1].item())}
