"""Depth pruning by search: which contiguous block of k layers (or which k single layers) can go.

For every candidate the model runs with those layers skipped and is scored by a metric: the LM
validation loss (lower is better) or a downstream task's accuracy (higher is better, e.g. an
lm-eval task such as WinoGrande through `nemo_neo.eval`). Layers are skipped by swapping the
decoder's layer list, so one model serves every candidate (single pipeline stage; TP allowed).
Writes the curve (score vs block start) as JSON and a PNG like Minitron's Figures 7-8.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from nemo_neo.eval.harness import accuracies, evaluate
from nemo_neo.eval.lm_loss import validation_loss
from nemo_neo.eval.tasks import task_manager
from nemo_neo.parallel.state import ParallelContext


@contextlib.contextmanager
def layers_skipped(model, drop: list[int]):
    """Run `model` (one pipeline stage holding every layer) without the layers in `drop`."""
    decoder = model.decoder
    original = decoder.layers
    decoder.layers = torch.nn.ModuleList([layer for i, layer in enumerate(original) if i not in set(drop)])
    try:
        yield model
    finally:
        decoder.layers = original


def search_depth(model, ctx: ParallelContext, num_drop: int, metric: Callable, higher_is_better: bool,
                 contiguous: bool = True) -> dict:
    """Score every candidate removal. `metric(model) -> float`.

    contiguous: candidates are the blocks [start, start + num_drop); the best block is chosen.
    not contiguous: every single layer is scored alone and the `num_drop` least important are
    chosen (Minitron's per-layer importance, for comparison).
    """
    if ctx.pp_size != 1:
        raise ValueError("depth search needs every layer on one pipeline stage: run it with pipeline_parallel=1")
    n = len(model.decoder.layers)
    if not 1 <= num_drop < n:
        raise ValueError(f"num_drop={num_drop} must be between 1 and {n - 1} (the model has {n} layers)")
    baseline = metric(model)
    starts = range(n - num_drop + 1) if contiguous else range(n)
    size = num_drop if contiguous else 1
    curve = []
    for start in tqdm(starts, desc="depth search", unit="candidate", disable=not ctx.is_main, dynamic_ncols=True):
        with layers_skipped(model, list(range(start, start + size))):
            curve.append({"start": start, "layers": list(range(start, start + size)), "score": metric(model)})
    pick = max if higher_is_better else min
    if contiguous:
        best = pick(curve, key=lambda c: c["score"])
        drop = best["layers"]
    else:
        ranked = sorted(curve, key=lambda c: c["score"], reverse=higher_is_better)  # least harmful removals first
        drop = sorted(c["start"] for c in ranked[:num_drop])
    return {"baseline": baseline, "num_drop": num_drop, "contiguous": contiguous,
            "higher_is_better": higher_is_better, "curve": curve, "drop_layers": drop}


def loss_metric(ctx: ParallelContext, rows: torch.Tensor, micro_batch_size: int = 4) -> Callable:
    return lambda model: validation_loss(model, ctx, rows, micro_batch_size, desc="candidate")["loss"]


def task_metric(ctx: ParallelContext, tokenizer_dir, task: str, limit: int | None = None, data_dir=None, batch_size: int = 8) -> Callable:
    """Accuracy of an lm-eval task (e.g. the pack's local-file `neo_winogrande`) for each candidate.
    The model is evaluated in memory through nemo_neo's lm-eval LM; every rank gets the result."""
    import torch.distributed as dist

    from nemo_neo.eval.lm_eval_model import NeoLM

    manager = task_manager(data_dir=data_dir, include_defaults=False)

    def metric(model) -> float:
        lm = NeoLM(model=model, ctx=ctx, tokenizer=str(tokenizer_dir), batch_size=batch_size)
        results = evaluate(tasks=[task], limit=limit, lm=lm, manager=manager)
        value = [accuracies(results)[task] if results is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(value, src=0)
        return float(value[0])

    return metric


def write_report(result: dict, out_dir, title: str = "Depth pruning") -> tuple[Path, Path]:
    """JSON of the curve and a PNG plot of score vs block start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "depth_search.json", out_dir / "depth_search.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [c["start"] for c in result["curve"]]
    ax.plot(xs, [c["score"] for c in result["curve"]], marker="o")
    ax.axhline(result["baseline"], color="gray", linestyle="--", label="no layers dropped")
    kind = f"block of {result['num_drop']}" if result["contiguous"] else "single layer"
    ax.set_xlabel(f"first layer of the dropped {kind}")
    ax.set_ylabel("score (" + ("higher" if result["higher_is_better"] else "lower") + " is better)")
    ax.set_title(f"{title}: drop {result['drop_layers']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path
