"""`lm_eval` command line with the `nemo_neo` model registered and the task pack included.

    nemo-neo-eval --model nemo_neo --model_args checkpoint=ckpt/ \
        --tasks neo_winogrande,neo_arc_easy --metadata '{"data_dir": "../shared/data"}' --limit 100
    torchrun --nproc_per_node 2 -m nemo_neo.cli.eval --model nemo_neo \
        --model_args checkpoint=ckpt/,tensor_parallel=2 --tasks neo_winogrande

Every argument is lm-eval's own (`lm_eval --help`): this wrapper only imports our model (lm-eval
0.4.x discovers models through its registry, with no plugin entry points, so a plain `lm_eval`
process never sees external models), adds the nemo_neo task pack to --include_path, and turns
the errors a user can fix (unknown task, missing tokenizer, missing data) into one line on
stderr with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import sys

from nemo_neo import enable_compat
from nemo_neo.errors import EvalError, UserError, exit_on_user_error
from nemo_neo.eval.tasks import TASK_DIR
from nemo_neo.optional import require


def _lm_eval_unknown_tasks(e: BaseException) -> EvalError | None:
    """lm-eval reports unknown tasks as a plain ValueError("Tasks not found: ..."): make it ours."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, ValueError) and not isinstance(e, UserError) and text.startswith("Tasks not found"):
        return EvalError(f"unknown task(s): {text.split(':', 1)[1].strip()}; list tasks with `nemo-neo-eval ls tasks` "
                         "or add --include_path <dir with task YAMLs>.")
    return None


def main(argv: list[str] | None = None) -> None:
    enable_compat()
    with exit_on_user_error():
        require("lm_eval", "nemo-neo-eval")
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        import nemo_neo.eval.lm_eval_model  # noqa: F401  registers --model nemo_neo

        sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        if hasattr(args, "include_path"):
            extra = [p for p in (args.include_path or "").split(":") if p]
            args.include_path = [str(TASK_DIR), *extra]
        try:
            parser.execute(args)
        except ValueError as e:
            ours = _lm_eval_unknown_tasks(e)
            if ours is None:
                raise
            raise ours from e


if __name__ == "__main__":
    main()
