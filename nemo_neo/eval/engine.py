"""Scoring and greedy decoding with a (TP/PP/DP-sharded) megatron-core model, for lm-eval.

Every rank of a model-parallel group must run the same forward passes (tensor-parallel
collectives, pipeline send/recv), so all ranks receive the same rows. Logits exist only on the
last pipeline stage and only as a vocabulary shard per TP rank: the rows' selected positions are
gathered over TP there, reduced to small results (log-probs, argmax tokens), and broadcast from
the last stage to the other stages. With data parallelism, each DP replica takes a strided share
of the batches and the results are all-gathered, so every rank returns the full, ordered list.

Padding is on the right and no attention mask is passed: with causal attention a position never
sees the padding after it, so each row's logits are those of the row alone (HF's `hf` model in
lm-eval scores right-padded batches the same way).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_neo.parallel.state import ParallelContext
from nemo_neo.train.schedule import run_microbatches


def _tp_gather(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return x
    return gather_from_tensor_model_parallel_region(x)


class ModelRunner:
    """Runs batches of token rows through this rank's stage and shares small results."""

    def __init__(self, model: torch.nn.Module, ctx: ParallelContext, pad_id: int = 0):
        self.model = model.eval()
        self.ctx = ctx
        self.pad_id = pad_id

    # ------------------------------------------------------------------ distributed helpers
    @property
    def _multi(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1

    def _from_last_stage(self, obj):
        """Every stage gets the last stage's `obj` (a picklable result)."""
        if not self._multi or self.ctx.pp_size == 1:
            return obj
        from megatron.core import parallel_state

        box = [obj if self.ctx.is_last_stage else None]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=self.ctx.pp_group)
        return box[0]

    def map_batches(self, batches: Sequence, fn: Callable) -> list:
        """[fn(b) for b in batches], computed by DP replica i for batches i, i + dp, ... and
        shared so every rank returns the whole list in order."""
        dp, rank = self.ctx.dp_size, self.ctx.dp_rank
        mine = {i: self._from_last_stage(fn(batches[i])) for i in range(rank, len(batches), dp)}
        if dp == 1 or not self._multi:
            return [mine[i] for i in range(len(batches))]
        gathered = [None] * dp
        dist.all_gather_object(gathered, mine, group=self.ctx.dp_group)
        merged = {k: v for part in gathered for k, v in part.items()}
        return [merged[i] for i in range(len(batches))]

    # ------------------------------------------------------------------ forward
    def _pad(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        return out.to(self.ctx.device)

    @torch.no_grad()
    def _forward_selected(self, rows, select_rows: torch.Tensor, select_pos: torch.Tensor, reduce: Callable):
        """Forward the padded rows; on the last stage gather full-vocab fp32 logits at
        (select_rows[k], select_pos[k]) -> [K, V] and return reduce(logits). None elsewhere."""
        tokens = self._pad(rows)
        out = {}

        def loss_fn(logits, batch):
            picked = logits[select_rows.to(logits.device), select_pos.to(logits.device)]  # [K, V/TP]
            out["value"] = reduce(_tp_gather(picked.contiguous()).float())
            return torch.zeros((), device=logits.device), {}

        run_microbatches(self.model, [{"input_ids": tokens}], loss_fn, forward_only=True)
        return out.get("value")

    def score(self, rows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]):
        """For each row (input tokens) and its target tokens (the last len(target) positions'
        next tokens): (sum of target log-probs, whether greedy decoding yields every target)."""
        sel_r, sel_p, tgt = [], [], []
        for i, (row, target) in enumerate(zip(rows, targets)):
            start = len(row) - len(target)
            sel_r += [i] * len(target)
            sel_p += range(start, len(row))
            tgt += list(target)
        target_ids = torch.tensor(tgt, dtype=torch.long)
        lengths = [len(t) for t in targets]

        def reduce(logits):
            logprobs = F.log_softmax(logits, dim=-1)
            ids = target_ids.to(logits.device)
            picked = logprobs.gather(1, ids[:, None])[:, 0].double().cpu()
            greedy = (logprobs.argmax(-1) == ids).cpu()
            return [(float(s.sum()), bool(g.all())) for s, g in zip(picked.split(lengths), greedy.split(lengths))]

        return self._forward_selected(rows, torch.tensor(sel_r), torch.tensor(sel_p), reduce)

    def next_tokens(self, rows: Sequence[Sequence[int]]) -> list[int] | None:
        """Greedy next token of every row (last stage; None elsewhere)."""
        sel_r = torch.arange(len(rows))
        sel_p = torch.tensor([len(r) - 1 for r in rows])
        return self._forward_selected(rows, sel_r, sel_p, lambda logits: logits.argmax(-1).cpu().tolist())

    def greedy_generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, should_stop: Callable | None = None,
                        eos_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy continuation of each prompt (a batch; all ranks of a model-parallel group call
        this together). A row stops at an EOS id, when should_stop(row_index, new_tokens) says so,
        or after max_new_tokens. Without a KV cache each step re-runs the whole (short) rows."""
        rows = [list(p) for p in prompts]
        new = [[] for _ in prompts]
        live = list(range(len(prompts)))
        eos = set(eos_ids)
        for _ in range(max_new_tokens):
            if not live:
                break
            nxt = self._from_last_stage(self.next_tokens([rows[i] for i in live]))
            still = []
            for i, tok in zip(live, nxt):
                rows[i].append(tok)
                new[i].append(tok)
                if tok in eos or (should_stop is not None and should_stop(i, new[i])):
                    continue
                still.append(i)
            live = still
        return new
