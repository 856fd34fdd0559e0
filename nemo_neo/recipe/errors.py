"""Bad input ends the recipe with one line naming the problem and the fix, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys

from nemo_neo.checkpoint.atomic import OutputExistsError
from nemo_neo.checkpoint.hf_io import CheckpointError
from nemo_neo.distill.methods import MethodConfigError
from nemo_neo.distill.model import TeacherMismatchError
from nemo_neo.models.arch import UnsupportedConfigError
from nemo_neo.parallel.state import ParallelConfigError
from nemo_neo.peft.apply import LoRAConfigError
from nemo_neo.prune.width import PruneTargetError
from nemo_neo.recipe.config import RecipeConfigError
from nemo_neo.recipe.run_dir import RunDirectoryError

USER_ERRORS = (RecipeConfigError, RunDirectoryError, ParallelConfigError, CheckpointError, OutputExistsError,
               TeacherMismatchError, UnsupportedConfigError, PruneTargetError, LoRAConfigError, MethodConfigError,
               FileNotFoundError)


@contextlib.contextmanager
def exit_on_user_error():
    try:
        yield
    except USER_ERRORS as e:
        # Checks that every rank makes print once (rank 0); an error only some ranks see still shows.
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:
            from nemo_neo.recipe.config import RecipeConfigError as _same_everywhere

            if not isinstance(e, _same_everywhere):
                print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
