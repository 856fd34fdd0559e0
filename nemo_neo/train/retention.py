"""Which training checkpoints stay on disk: the last `keep_last` steps, the final one (the run's last
step), the best by a validation metric (optional), and always the one `latest.json` points to.

At 8B a training checkpoint is ~100 GB (weights + fp32 Adam moments), so a run that keeps every
`save_every` fills any disk. Removal is ordered so that nothing is ever lost:
  1. the new checkpoint is complete (published atomically) and `latest.json` points to it;
  2. only then are older ones removed, each first renamed to a hidden `.<name>.deleting` directory
     and then deleted, so a kill half-way through a deletion never leaves a visible, partial
     `step_N` that a reader could take for a checkpoint (the next pass finishes the deletion).
A checkpoint's companion (`<label>_step_N`, e.g. a teacher corrected in parallel) goes with it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from nemo_neo import chaos
from nemo_neo.checkpoint.native import INDEX
from nemo_neo.errors import ConfigError

STEP_DIR = re.compile(r"^(?:(?P<label>.+)_)?step_(?P<step>\d{7})$")
DELETING = ".deleting"


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 2             # step checkpoints kept besides the best; 0 = keep every one
    best_metric: str | None = None  # e.g. "val_loss": also keep the checkpoint with the lowest value

    def __post_init__(self):
        if not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ConfigError(f"save_keep_last={self.keep_last!r}: use a whole number >= 1 (0 keeps every checkpoint)")


def step_checkpoints(ckpt_root: Path) -> dict[int, list[Path]]:
    """{step: [its directories: the checkpoint and its companions]} of the published checkpoints."""
    found: dict[int, list[Path]] = {}
    if not Path(ckpt_root).is_dir():
        return found
    for path in Path(ckpt_root).iterdir():
        m = STEP_DIR.match(path.name)
        if m and path.is_dir():
            found.setdefault(int(m["step"]), []).append(path)
    return found


def _metric(ckpt: Path, name: str) -> float | None:
    """The validation metric a checkpoint recorded in its index (None when that step did not validate)."""
    try:
        value = json.loads((ckpt / INDEX).read_text()).get("metadata", {}).get("metrics", {}).get(name)
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def best_step(ckpt_root: Path, metric: str, steps) -> int | None:
    scored = [(v, s) for s in steps if (v := _metric(Path(ckpt_root) / f"step_{s:07d}", metric)) is not None]
    return min(scored)[1] if scored else None


def steps_to_keep(ckpt_root: Path, policy: RetentionPolicy, latest_step: int | None,
                  final_step: int | None = None) -> set[int]:
    """latest_step: what `latest.json` points to; final_step: the run's last step, kept besides the
    `keep_last` before it."""
    steps = sorted(step_checkpoints(ckpt_root))
    if policy.keep_last == 0:
        return set(steps)
    keep = set([s for s in steps if s != final_step][-policy.keep_last:])
    keep.update(s for s in (latest_step, final_step) if s in steps)
    if policy.best_metric:
        best = best_step(ckpt_root, policy.best_metric, steps)
        if best is not None:
            keep.add(best)
    return keep


def remove_checkpoint_dir(path: Path) -> None:
    """Rename out of sight, then delete: a partial deletion is never a visible checkpoint."""
    hidden = path.with_name(f".{path.name}{DELETING}")
    if hidden.exists():
        shutil.rmtree(hidden)
    os.replace(path, hidden)
    chaos.point("retention")  # a test hook: a kill here must leave only valid checkpoints in sight
    shutil.rmtree(hidden)


def finish_interrupted_deletions(ckpt_root: Path) -> None:
    if Path(ckpt_root).is_dir():
        for path in Path(ckpt_root).glob(f".*{DELETING}"):
            shutil.rmtree(path, ignore_errors=True)


def apply_retention(ckpt_root: Path, policy: RetentionPolicy, latest_step: int | None,
                    final_step: int | None = None) -> list[Path]:
    """Remove the checkpoints the policy does not keep (call on one rank, after `latest.json` moved).
    Returns the removed directories."""
    finish_interrupted_deletions(ckpt_root)
    keep = steps_to_keep(ckpt_root, policy, latest_step, final_step)
    removed = []
    for step, paths in sorted(step_checkpoints(ckpt_root).items()):
        if step not in keep:
            for path in paths:
                remove_checkpoint_dir(path)
                removed.append(path)
    return removed


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def disk_report(ckpt_root: Path) -> dict:
    """What the checkpoints of a run hold now: which steps, and their bytes (companions included)."""
    found = step_checkpoints(ckpt_root)
    return {"checkpoints_kept": sorted(found),
            "checkpoints_bytes": sum(directory_bytes(p) for paths in found.values() for p in paths)}
