"""One error hierarchy for everything a user can fix, and the one place that turns it into a line.

Every error that bad input, a bad config or the machine (a full disk, a missing file) can cause is
a `UserError`: its message names the problem and the fix. Each area has its subclass, and each also
derives from the builtin a caller would expect (`ValueError`, `FileNotFoundError`, `OSError`, ...),
so ``except ValueError`` keeps working. Entry points (the recipe, every CLI) wrap their work in
`exit_on_user_error()`: a `UserError` ends the process with exactly one ``error: ...`` line on
stderr (``[rank N] error: ...`` on the other ranks) and exit status 2; anything else is a bug and
keeps its traceback. This module imports nothing from nemo_neo (it is the bottom layer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path


class UserError(Exception):
    """Something the user can fix; the message says what and how."""

    #: True when every rank raises the same error from the same input (a config check): only rank 0
    #: prints it. Errors that one rank alone may see (its shard of a file, its disk) print everywhere.
    same_on_every_rank = False


class ConfigError(UserError, ValueError):
    """A setting that cannot work (recipe, method, loss, LoRA, pruning target, parallel layout)."""

    same_on_every_rank = True


class DataError(UserError, ValueError):
    """Training or evaluation data that cannot be read or is too small."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data source that does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model directory that is missing, incomplete or of the wrong shape."""


class UnsupportedModelError(UserError, ValueError):
    """A model whose architecture nemo_neo cannot express exactly."""


class OutputExistsError(UserError, FileExistsError):
    """An output path that already holds something nemo_neo would overwrite."""


class DiskWriteError(UserError, OSError):
    """A write that the filesystem refused (full disk, no permission, read-only)."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that this feature needs is not installed."""


class RunStateError(UserError, RuntimeError):
    """A run directory or training run that cannot continue as asked (another config, diverged loss)."""


class EvalError(UserError, ValueError):
    """An evaluation that cannot be set up (task, tokenizer, task data)."""


def free_space(path) -> str:
    """Free space on the filesystem holding `path` (or its nearest existing parent), for messages."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def disk_write_error(error: OSError, path) -> DiskWriteError:
    """The one-line `DiskWriteError` for an OSError raised while writing under `path`."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    return DiskWriteError(
        f"could not write {path}: {reason} ({free_space(path)} there); free some space or choose another "
        "output directory. The last complete output is left as it was."
    )


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a `UserError` into one ``error:`` line and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        message = " ".join(str(e).split()) or type(e).__name__
        if rank == "0":
            print(f"error: {message}", file=sys.stderr, flush=True)
        elif not e.same_on_every_rank:
            print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
