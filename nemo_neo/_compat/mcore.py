"""megatron-core 0.16 fixes that apply on any device (not CPU-specific, not NeMo's).

* `CheckpointWithoutOutput` (selective recompute of the layer norms, `recompute_modules: [layernorm]`)
  sets ``self.fp8 = fp8 is not None``, which is True for its default ``fp8=False``; its forward then
  asks Transformer Engine's FP8GlobalStateManager, a NameError where TE is not installed (CPU, or a
  GPU without TE). Without TE there is no FP8 to record, so the flag is cleared there; with TE
  installed nothing changes.
"""

from __future__ import annotations

import functools


def fix_checkpoint_without_output() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    cls = mcore_random.CheckpointWithoutOutput
    if hasattr(mcore_random, "FP8GlobalStateManager") or getattr(cls.__init__, "_neo_fixed", False):
        return  # TE present: megatron's flag is harmless (TE answers "fp8 off")

    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fp8 = False  # no Transformer Engine, no FP8 state to save for the recompute

    __init__._neo_fixed = True
    cls.__init__ = __init__
