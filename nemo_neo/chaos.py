"""A test hook: SIGKILL the whole job at a named point, to prove that a rerun recovers from it.

Inert unless the environment variable NEMO_NEO_CHAOS_KILL is set; then it holds
``<stage>:<event>:<n>`` and the n-th time (counted from 1, in this process) that `point(event)` is
reached while the recipe runs `<stage>`, the process SIGKILLs the torchrun agent, every process
below it and itself: the job dies as under an OOM killer or a lost node, with no cleanup.
``<stage>:<event>:<n>:rank<r>`` kills only the worker of global rank r (itself, nothing else): one
rank lost as to a segfault or a per-process OOM kill, while the others run on into their next
collective; the job must then end (torchrun's agent stops the others) rather than hang.
Events (where library code calls `point`):

    publish          inside an atomic directory write, before the finished temp dir is published
                     (every checkpoint, the pruned student, the exported HF directory)
    checkpoint_saved after a training checkpoint is complete and its `latest` pointer moved
    retention        after an old checkpoint is renamed out of sight, before it is deleted
    trained          after a Trainer's last step, before the stage writes its final checkpoint
    before_metrics   after a stage returned, before the driver writes its metrics.json
    cache_chunk      a teacher-cache chunk is written to its temporary file, not yet renamed into place
    candidate_finished  an architecture-search candidate's short distillation is recorded (kd.json),
                     before its training state is released and before the next candidate

The recipe's driver names the running stage with `set_stage`. tests/recipes/test_chaos.py and
scripts/chaos.py use it; nothing else should.
"""

from __future__ import annotations

import os
import signal

ENV = "NEMO_NEO_CHAOS_KILL"
_stage = ""
_counts: dict[tuple[str, str], int] = {}


def set_stage(stage: str) -> None:
    global _stage
    _stage = stage


def point(event: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    stage, want, n, *only = spec.split(":")
    if (stage, want) != (_stage, event):
        return
    if only and only[0] != f"rank{os.environ.get('RANK', '0')}":
        return
    key = (stage, event)
    _counts[key] = _counts.get(key, 0) + 1
    if _counts[key] == int(n):
        if only:
            os.kill(os.getpid(), signal.SIGKILL)
        kill_job()


def _children_of() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def children(pid: int) -> list[int]:
    """The direct children of `pid` (a torchrun agent's: its workers)."""
    return _children_of().get(pid, [])


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc; torchrun starts its workers in process groups of their own)."""
    tree = _children_of()
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_job() -> None:
    """SIGKILL the torchrun agent (this worker's parent, when torchrun started it) and everything
    below it, this process last."""
    me = os.getpid()
    root = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else me
    for pid in ([root] if root != me else []) + descendants(root):
        if pid != me:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.kill(me, signal.SIGKILL)
