"""NeMo 2.7.3's pipeline schedule widens its p2p tensors for ModelOpt's distillation model only.

Under pipeline parallelism a distillation model sends the student's and the teacher's hidden states
between stages in one tensor, so the schedule's send/receive shapes must be widened.
``MegatronStep.adjust_tensor_shapes_fn`` (``nemo/lightning/megatron_parallel.py``) asks
``nemo.collections.llm.modelopt.distill.utils.get_tensor_shapes_adjust_fn_for_distillation``, which
answers only for ``modelopt.torch.distill.DistillationModel`` and returns None for anything else; NeMo
offers no other hook. This bridge makes it also answer for a module that says how to widen them
itself (nemo_neo's `DistillationPair.pair_tensor_shapes`), found the way NeMo's own function unwraps
(``.module`` down the DDP / Lightning chain). Every other model gets NeMo's answer unchanged.
"""

from __future__ import annotations

import functools
import importlib

_NEMO_UTILS = "nemo.collections.llm.modelopt.distill.utils"
_FN = "get_tensor_shapes_adjust_fn_for_distillation"


def _innermost(model):
    if isinstance(model, list):
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


def _with_pair_shapes(nemo_fn):
    @functools.wraps(nemo_fn)
    def wrapper(model, *args, **kwargs):
        from megatron.core import parallel_state

        inner = _innermost(model)
        if hasattr(inner, "pair_tensor_shapes"):
            # Also when forward_only (validation): the pair sends both hidden states in eval too.
            return inner.pair_tensor_shapes if parallel_state.get_pipeline_model_parallel_world_size() > 1 else None
        return nemo_fn(model, *args, **kwargs)

    wrapper._nemo_neo_compat = True
    return wrapper


def route_pair_tensor_shapes() -> None:
    """Let NeMo's schedule widen the p2p shapes for nemo_neo's DistillationPair. Idempotent."""
    utils = importlib.import_module(_NEMO_UTILS)
    if not getattr(getattr(utils, _FN), "_nemo_neo_compat", False):
        # megatron_parallel imports the function from this module at each step, so this one name suffices.
        setattr(utils, _FN, _with_pair_shapes(getattr(utils, _FN)))
