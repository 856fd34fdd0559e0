"""`lm_eval` command line with the `nemo_neo` model registered and the task pack included.

    python -m nemo_neo.eval.cli --model nemo_neo --model_args checkpoint=ckpt/ \
        --tasks neo_winogrande,neo_arc_easy --metadata '{"data_dir": "../shared/data"}' --limit 100
    torchrun --nproc_per_node 2 -m nemo_neo.eval.cli --model nemo_neo \
        --model_args checkpoint=ckpt/,tensor_parallel=2 --tasks neo_winogrande

Every argument is lm-eval's own (`lm_eval --help`): this wrapper only imports our model (lm-eval
0.4.x discovers models through its registry, with no plugin entry points, so a plain `lm_eval`
process never sees external models), adds the nemo_neo task pack to --include_path, and turns
the errors a user can fix (unknown task, missing tokenizer, missing data) into one line on
stderr with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import sys


def _friendly(e: BaseException) -> str | None:
    from nemo_neo.eval.optional import MissingDependencyError

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ValueError) and text.startswith("Tasks not found"):
        return (f"unknown task(s): {text.split(':', 1)[1].strip()}; list tasks with `python -m nemo_neo.eval.cli ls tasks` "
                "or add --include_path <dir with task YAMLs>.")
    names = {"EvalSetupError", "TaskDataError", "CheckpointError", "UnknownTaskError", "ParallelConfigError",
             "UnsupportedConfigError"}
    if isinstance(e, MissingDependencyError) or type(e).__name__ in names:
        return text
    return None


def main(argv: list[str] | None = None) -> None:
    from nemo_neo.eval.optional import MissingDependencyError, require

    try:
        require("lm_eval", "python -m nemo_neo.eval.cli")
        import nemo_neo.eval.lm_eval_model  # noqa: F401  registers --model nemo_neo
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except MissingDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from nemo_neo.eval.tasks import TASK_DIR

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if hasattr(args, "include_path"):
        extra = [p for p in (args.include_path or "").split(":") if p]
        args.include_path = [str(TASK_DIR), *extra]
    try:
        parser.execute(args)
    except Exception as e:  # noqa: BLE001 - only the fixable ones are shortened; the rest re-raise
        message = _friendly(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
