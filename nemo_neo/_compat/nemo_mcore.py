"""NeMo 2.7.3 on megatron-core 0.16.1: the two API changes NeMo trips over, bridged here.

nemo_neo is built on megatron-core 0.16.1; NeMo 2.7.3 (the last release with ``nemo.collections.llm``)
was written against the releases before it. Two 0.16 changes break it, on GPU and CPU alike:

1. ``megatron.core.dist_checkpointing.strategies.tensorstore`` (the zarr backend) was removed. NeMo's
   ``nemo/utils/callbacks/dist_ckpt_io.py`` imports it in the same ``try`` block as everything else
   it needs from megatron-core, so the failed import marks megatron-core as missing and every
   checkpoint save fails with "megatron-core was not found". NeMo uses the module only to read legacy
   zarr checkpoints, which megatron-core 0.16 cannot read either: a stub whose strategy raises a clear
   error restores the rest.
2. ``get_megatron_optimizer`` lost its ``no_weight_decay_cond`` / ``scale_lr_cond`` / ``lr_mult``
   arguments (replaced by ``config_overrides``); NeMo's ``setup_megatron_optimizer``
   (``nemo/lightning/_strategy_lib.py``) still passes them, so building any optimizer fails with a
   TypeError. With NeMo's defaults (None, None, 1.0) they mean megatron-core's default behaviour and
   are dropped; other values raise, since translating them is not needed by nemo_neo.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types

_TENSORSTORE = "megatron.core.dist_checkpointing.strategies.tensorstore"
_LEGACY_OPTIMIZER_ARGS = {"no_weight_decay_cond": None, "scale_lr_cond": None, "lr_mult": 1.0}


class _ZarrUnsupported:
    def __init__(self, *_args, **_kwargs):
        raise NotImplementedError(
            "this checkpoint uses the legacy zarr format, which megatron-core 0.16 cannot read; "
            "re-save it in torch_dist format with an older NeMo/megatron-core first."
        )


def install_tensorstore_stub() -> None:
    """Must run before NeMo's first import. If NeMo's dist_ckpt_io was imported earlier it recorded
    megatron-core as missing; reloading it re-runs its imports into the same module namespace."""
    if _TENSORSTORE in sys.modules:
        return
    stub = types.ModuleType(_TENSORSTORE)
    stub.TensorStoreLoadShardedStrategy = _ZarrUnsupported
    sys.modules[_TENSORSTORE] = stub
    importlib.import_module("megatron.core.dist_checkpointing.strategies").tensorstore = stub
    dist_ckpt_io = sys.modules.get("nemo.utils.callbacks.dist_ckpt_io")
    if dist_ckpt_io is not None and not getattr(dist_ckpt_io, "HAVE_MEGATRON_CORE", True):
        importlib.reload(dist_ckpt_io)


def _without_legacy_optimizer_args(get_megatron_optimizer):
    @functools.wraps(get_megatron_optimizer)
    def wrapper(*args, **kwargs):
        for name, default in _LEGACY_OPTIMIZER_ARGS.items():
            value = kwargs.pop(name, default)
            if value != default:
                raise NotImplementedError(
                    f"{name}={value!r}: megatron-core 0.16 takes per-parameter optimizer settings as "
                    "config_overrides, and nemo_neo does not translate NeMo's {name}; leave it at its default."
                )
        return get_megatron_optimizer(*args, **kwargs)

    return wrapper


def patch_optimizer_factory() -> None:
    """Point NeMo's optimizer setup at a megatron-core 0.16-compatible get_megatron_optimizer."""
    import megatron.core.optimizer as mcore_optimizer

    if "no_weight_decay_cond" in inspect.signature(mcore_optimizer.get_megatron_optimizer).parameters:
        return  # an older megatron-core: NeMo's call already fits
    if getattr(mcore_optimizer.get_megatron_optimizer, "_nemo_neo_compat", False):
        return
    wrapped = _without_legacy_optimizer_args(mcore_optimizer.get_megatron_optimizer)
    wrapped._nemo_neo_compat = True
    # NeMo imports it inside setup_megatron_optimizer (`from megatron.core.optimizer import ...`).
    mcore_optimizer.get_megatron_optimizer = wrapped
