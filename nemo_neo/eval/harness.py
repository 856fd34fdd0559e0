"""Python entry point for lm-eval on nemo_neo checkpoints (what the recipe's evaluate stage calls).

    from nemo_neo.eval.harness import evaluate
    results = evaluate("ckpt/", ["neo_winogrande", "neo_arc_easy"], data_dir="../shared/data", limit=100)

Tasks are looked up in lm-eval's registry plus the nemo_neo task pack (local files, offline) and
any `include_path`; an unknown name fails before the model is loaded, with one line that says so.
"""

from __future__ import annotations

import difflib

from nemo_neo.errors import EvalError
from nemo_neo.eval.tasks import PACK_TASKS, task_manager
from nemo_neo.optional import require


class UnknownTaskError(EvalError):
    pass


def check_tasks(tasks, manager) -> list[str]:
    """Names that neither lm-eval nor the pack knows -> UnknownTaskError naming them and the fix."""
    tasks = [t for t in ([tasks] if isinstance(tasks, str) else tasks) for t in str(t).split(",") if t]
    if not tasks:
        raise UnknownTaskError("no task given; name at least one, e.g. neo_winogrande.")
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known and not t.endswith(".yaml") and not manager.match_tasks([t])]
    if missing:
        hints = {t: difflib.get_close_matches(t, known, n=2) for t in missing}
        near = "; ".join(f"{t} -> did you mean {', '.join(h)}?" for t, h in hints.items() if h)
        raise UnknownTaskError(
            f"unknown task(s) {', '.join(missing)}: not in lm-eval's registry or the nemo_neo pack ({', '.join(PACK_TASKS)})"
            + (f" ({near})" if near else "") + "; list tasks with `python -m nemo_neo.cli.eval ls tasks` or add --include_path <dir>."
        )
    return tasks


def evaluate(checkpoint=None, tasks=("neo_winogrande",), *, limit=None, data_dir=None, num_fewshot=None, batch_size=8,
             tensor_parallel=1, pipeline_parallel=1, dtype="auto", include_path=None, include_defaults=True,
             log_samples=False, lm=None, manager=None, **simple_evaluate_kwargs):
    """Run lm-eval tasks on a nemo_neo checkpoint (or an already built `lm`). Returns lm-eval's
    results dict on global rank 0 and None on the other ranks (run every rank under torchrun).
    `include_defaults=False` skips indexing lm-eval's ~10k built-in task files (~15 s) when only
    pack / include_path tasks are used."""
    lm_eval = require("lm_eval", "evaluation with lm-eval")
    manager = manager or task_manager(data_dir=data_dir, include_path=include_path, include_defaults=include_defaults)
    names = check_tasks(tasks, manager)
    if lm is None:
        from nemo_neo.eval.lm_eval_model import NeoLM

        lm = NeoLM(checkpoint=checkpoint, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                   dtype=dtype, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      log_samples=log_samples, **simple_evaluate_kwargs)
    return results if getattr(lm, "ctx", None) is None or lm.ctx.rank == 0 else None


def accuracies(results: dict) -> dict[str, float]:
    """{task: acc} (or the task's first metric) from lm-eval's results."""
    out = {}
    for task, metrics in results["results"].items():
        for key in ("acc,none", "word_perplexity,none"):
            if key in metrics:
                out[task] = metrics[key]
                break
    return out
