"""Measure the peak bytes of live tensors over a block of code, on any device (CPU included).

`torch.cuda.max_memory_allocated` has no CPU counterpart, and RSS counts the interpreter, the
libraries and freed-but-cached pages. `LiveTensorBytes` counts what a memory planner models:
the bytes of distinct tensor storages alive at each moment. On entry it walks every tensor the
garbage collector can see (parameters, grad buffers, optimizer state, ...); inside the block a
TorchDispatchMode sees every op's outputs (forward, backward, optimizer, collectives), adds each new
storage once and subtracts it when the storage is freed (a finalizer on the storage object, which
torch keeps alive as long as the storage itself). Views share their base's storage and count once.

Not counted: allocations that never surface as a tensor output of an op (kernel scratch space,
allocator rounding and caching, gloo's internal buffers).
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.at_entry = 0
        self.peak_op = None  # the op whose outputs set the peak: where in the step it fell
        self._op = None
        self._live: dict[int, int] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, self._op
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __enter__(self):
        gc.collect()
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    self._track(obj)
            except (RuntimeError, ReferenceError):  # tensors without storage (e.g. some wrappers)
                continue
        self.at_entry = self.current
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out
