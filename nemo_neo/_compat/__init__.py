"""Compatibility patches, quarantined: nothing in this package runs unless an entry point asks.

nemo_neo's library code is written for megatron-core as it is documented. Three environments need
patches around it, and they all live here, each switched on explicitly:

* `enable()` — what every nemo_neo entry point calls first (the recipe, the CLIs, benchmarks, the
  test suite and its torchrun workers). On a CPU-only torch it redirects megatron-core's CUDA
  assumptions to the CPU (`cpu`, module-local ``torch`` proxies, no process-wide swaps); with CUDA
  it changes nothing. It also silences megatron-core's import-time notices about optional GPU
  accelerators (apex, Transformer Engine), which are optional here, and fixes what megatron-core
  gets wrong on any device without Transformer Engine (`mcore`).
* `enable_nemo()` — `enable()` plus what NeMo 2.7.3 needs on megatron-core 0.16 (`nemo_mcore`) and
  on a CPU-only torch (`nemo_cpu`), and lets NeMo's pipeline schedule carry nemo_neo's distillation
  pair (`nemo_pipeline`). It must run before NeMo's first import; `nemo_neo.nemo` refuses
  to import without it.

A library user calls ``nemo_neo.enable_compat()`` (or ``nemo_neo._compat.enable()``) once before
`nemo_neo.parallel.initialize`; `initialize` refuses, with that fix named, on a CPU without it.
"""

from __future__ import annotations

import warnings

from nemo_neo._compat import cpu, mcore, nemo_cpu, nemo_mcore, nemo_pipeline

_state = {"base": False, "nemo": False}


def _quiet_optional_accelerator_notices() -> None:
    # megatron-core announces every missing optional GPU accelerator at import; they are optional here.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|is not installed).*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")


def enable() -> bool:
    """Apply the patches nemo_neo needs in this process. Idempotent; True when the CPU layer is active."""

    if not _state["base"]:
        _quiet_optional_accelerator_notices()
        mcore.fix_checkpoint_without_output()
        _state["base"] = True
    return cpu.activate_if_needed()


def enable_nemo() -> bool:
    """`enable()` plus the NeMo 2.7.3 bridges; call before NeMo is first imported. Idempotent."""

    on_cpu = enable()
    if not _state["nemo"]:
        nemo_mcore.install_tensorstore_stub()  # before NeMo's first import (see nemo_mcore)
        nemo_mcore.patch_optimizer_factory()
        nemo_cpu.activate_if_needed()
        nemo_pipeline.route_pair_tensor_shapes()  # PP distillation with nemo_neo's pair
        _state["nemo"] = True
    return on_cpu


def is_enabled() -> bool:
    return _state["base"]


def is_nemo_enabled() -> bool:
    return _state["nemo"]
