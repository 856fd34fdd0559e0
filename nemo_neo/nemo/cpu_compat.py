"""What NeMo 2.7.3 needs, beyond nemo_neo's own CPU layer, to run on a CPU-only torch.

megatron-core's distributed-checkpointing code (which NeMo uses for every checkpoint) calls
``torch.cuda.synchronize`` and allocates small flag tensors on ``torch.cuda.current_device()``
(``filesystem_async.py``, ``state_dict_saver.py``, ...), and NeMo's own training plumbing
(``nemo/lightning/megatron_parallel.py``) builds the model in a ``torch.cuda.Stream`` and allocates on
the current CUDA device. These modules get the same module-local ``torch`` redirection as the
megatron-core modules listed in :mod:`nemo_neo.parallel.cpu_compat` (which is activated first), plus
a no-op ``torch.cuda.Stream``. The one global change is scoped to NeMo's training/validation/optimizer steps,
whose logging moves counters with an unconditional ``.to("cuda")`` (see `_cuda_means_cpu`). Nothing
happens when CUDA is available.
(Version differences between NeMo 2.7.3 and megatron-core 0.16, which matter on GPU too, are bridged
in :mod:`nemo_neo.nemo.mcore_compat`.)
"""

from __future__ import annotations

import functools
import importlib

import torch

# Modules whose module-level ``torch`` is redirected to nemo_neo's CPU proxy, and why.
_CPU_MODULES = (
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # torch.cuda.synchronize() before writes
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # flag tensors on device="cuda"
    "megatron.core.dist_checkpointing.strategies.async_utils",  # liveness flags on the current CUDA device
    "megatron.core.dist_checkpointing.strategies.fully_parallel",  # torch.cuda.synchronize()
    "megatron.core.dist_checkpointing.exchange_utils",  # exchange buffers on "cuda"
    # NeMo's default local spec uses megatron's DotProductAttention (nemo_neo's uses torch SDPA), whose
    # causal mask is built with device="cuda":
    "megatron.core.transformer.utils",
    "nemo.lightning.megatron_parallel",  # model built in a torch.cuda.Stream; loss buffers on the CUDA device
    "nemo.lightning.megatron_init",  # seeds megatron's model-parallel RNG only if torch.cuda.device_count() > 0
    "nemo.lightning.pytorch.strategies.megatron_strategy",  # empty_cache(); pinned step counters for logging
    "nemo.lightning.pytorch.plugins.data_sampler",  # pinned batch-size counter for logging
)


def _nemo_cpu_torch():
    """nemo_neo's CPU ``torch`` proxy, plus the few ``torch.cuda`` calls NeMo adds: CUDA streams
    (NeMo builds megatron's model in a side stream) become no-ops, and the CPU counts as one device."""
    from nemo_neo.parallel import cpu_compat

    class _NemoCudaOnCpu(cpu_compat._CudaOnCpu):
        @staticmethod
        def Stream(*_args, **_kwargs):  # noqa: N802 (mirrors torch.cuda.Stream)
            return None

        @staticmethod
        def device_count():  # the CPU is the one device (megatron_init then seeds the RNG tracker)
            return 1

    proxy = cpu_compat._TorchOnCpu()
    proxy.cuda = _NemoCudaOnCpu()
    return proxy


def _cuda_means_cpu(fn):
    """Run ``fn`` with ``Tensor.to("cuda")`` moving to the CPU instead.

    NeMo's training, validation and optimizer steps move their logging counters with an unconditional
    ``tensor.to("cuda", non_blocking=True)`` (``MegatronStrategy.training_step``). On a torch without
    CUDA that call can only raise, so redirecting it for the duration of the step changes nothing else."""
    from nemo_neo.parallel.cpu_compat import _to_cpu_device

    def is_cuda(x):
        return isinstance(x, (str, torch.device)) and str(x).startswith("cuda")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.to

        def to(self, *to_args, **to_kwargs):
            to_args = tuple(_to_cpu_device(a) if is_cuda(a) else a for a in to_args)
            if is_cuda(to_kwargs.get("device")):
                to_kwargs["device"] = _to_cpu_device(to_kwargs["device"])
            return original(self, *to_args, **to_kwargs)

        torch.Tensor.to = to
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.to = original

    return wrapper


_active = False


def activate_if_needed() -> bool:
    """Apply the CPU redirections when CUDA is absent. Idempotent; True when active."""
    global _active
    from nemo_neo.parallel import cpu_compat

    if not cpu_compat.activate_if_needed():
        return False
    if not _active:
        proxy = _nemo_cpu_torch()
        for name in _CPU_MODULES:
            importlib.import_module(name).torch = proxy
        from nemo.lightning.pytorch.strategies.megatron_strategy import MegatronStrategy

        for step in ("training_step", "validation_step", "optimizer_step"):
            setattr(MegatronStrategy, step, _cuda_means_cpu(getattr(MegatronStrategy, step)))
        _active = True
    return True


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def cpu_gpt_data_step(dataloader_iter):
    """NeMo's ``gpt_data_step`` minus its ``tensor.cuda(non_blocking=True)`` calls (identity on CPU)."""
    from nemo.collections.llm.gpt.model.base import gpt_data_step

    from nemo_neo.parallel import cpu_compat

    return cpu_compat._tensor_cuda_is_identity(gpt_data_step)(dataloader_iter)
