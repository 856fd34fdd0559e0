"""Peak-memory probe shared by the benchmarks: CUDA allocator stats on a GPU, the process's resident
set on a CPU.

On a CPU the peak is VmHWM from /proc/self/status, reset to the current RSS by writing 5 to
/proc/self/clear_refs (Linux >= 4.0). Where that write is not allowed (some containers), the peak is
ru_maxrss, which cannot be reset: `resettable` says which one a figure came from.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in KiB
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryProbe:
    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.resettable = True
        self.base: int | None = None  # set by reset_peak()

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        if self.resettable:
            return _proc_status_bytes("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak(self) -> None:
        """Make peak() start from the current usage, and remember the usage growth() is measured from.
        Where the CPU peak cannot be reset, that is the lifetime peak so far (growth() is then a lower
        bound if the process peaked higher before)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            except OSError:
                self.resettable = False
        self.base = self.current() if self.resettable else self.peak()

    def growth(self) -> int:
        """Peak usage above the baseline taken by the last reset_peak()."""
        return self.peak() - self.base

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        return "VmHWM after clear_refs" if self.resettable else "ru_maxrss growth (a lower bound if setup peaked higher)"
