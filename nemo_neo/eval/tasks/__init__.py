"""The nemo_neo task pack: lm-eval task YAMLs that read public benchmark files from a local
directory (offline evaluation). See README.md here for the tasks and the expected files."""

from __future__ import annotations

from pathlib import Path

from nemo_neo.optional import require

TASK_DIR = Path(__file__).resolve().parent
DATA_ENV = "NEMO_NEO_EVAL_DATA"
PACK_TAG = "nemo_neo_pack"
PACK_TASKS = ("neo_winogrande", "neo_arc_easy", "neo_arc_challenge", "neo_piqa", "neo_hellaswag", "neo_wikitext2")


def task_manager(data_dir=None, include_path=None, **kwargs):
    """An lm-eval TaskManager that knows lm-eval's own tasks plus this pack (and `include_path`).
    `data_dir` is handed to the pack's loaders as task metadata (else NEMO_NEO_EVAL_DATA is read)."""

    tasks_mod = require("lm_eval.tasks", "evaluation with lm-eval")
    paths = [str(TASK_DIR)] + ([str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else [str(include_path)] if include_path else [])
    metadata = dict(kwargs.pop("metadata", None) or {})
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    return tasks_mod.TaskManager(include_path=paths, metadata=metadata or None, **kwargs)
