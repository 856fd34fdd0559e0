"""What NeMo 2.7.3 needs, beyond nemo_neo's own CPU layer, to run on a CPU-only torch.

megatron-core's distributed-checkpointing code (which NeMo uses for every checkpoint) calls
``torch.cuda.synchronize`` and allocates small flag tensors on ``torch.cuda.current_device()``
(``filesystem_async.py``, ``state_dict_saver.py``, ...), and NeMo's own training plumbing
(``nemo/lightning/megatron_parallel.py``) builds the model in a ``torch.cuda.Stream`` and allocates on
the current CUDA device. These modules get the same module-local ``torch`` redirection as the
megatron-core modules listed in :mod:`nemo_neo._compat.cpu` (which is activated first), plus
a no-op ``torch.cuda.Stream``; the tensors NeMo creates there and moves with an unconditional
``.to("cuda")`` stay on the CPU (`_CudaMeansCpu`). Nothing process-wide is swapped, and nothing
happens when CUDA is available.
(Version differences between NeMo 2.7.3 and megatron-core 0.16, which matter on GPU too, are bridged
in :mod:`nemo_neo._compat.nemo_mcore`.)
"""

from __future__ import annotations

import importlib

import torch

from nemo_neo._compat import cpu

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


class _CudaMeansCpu(torch.Tensor):
    """A tensor whose ``.cuda()`` / ``.to("cuda")`` stay on the CPU (returning a plain tensor).

    NeMo moves a few tensors it creates itself with unconditional CUDA calls: its logging counters
    (``torch.tensor(x, pin_memory=True).to("cuda")`` in ``MegatronStrategy``) and the batch in
    ``gpt_data_step`` (``val.cuda(non_blocking=True)``). On a CPU-only torch those calls can only raise.
    Only the tensors NeMo makes through the redirected ``torch`` of the modules below, and the batches
    handed to `cpu_gpt_data_step`, are of this type; nothing process-wide changes."""

    def cuda(self, *_args, **_kwargs):
        return self.as_subclass(torch.Tensor)

    def to(self, *args, **kwargs):
        args = tuple(cpu._to_cpu_device(a) if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = cpu._to_cpu_device(kwargs["device"])
        return super().to(*args, **kwargs).as_subclass(torch.Tensor)


def _is_cuda(x) -> bool:
    return isinstance(x, (str, torch.device)) and str(x).startswith("cuda")


def _nemo_cpu_torch():
    """nemo_neo's CPU ``torch`` proxy, plus the few ``torch.cuda`` calls NeMo adds: CUDA streams
    (NeMo builds megatron's model in a side stream) become no-ops, the CPU counts as one device, and
    ``torch.tensor`` makes tensors that stay on the CPU when NeMo moves them to "cuda"."""

    class _NemoCudaOnCpu(cpu._CudaOnCpu):
        @staticmethod
        def Stream(*_args, **_kwargs):  # noqa: N802 (mirrors torch.cuda.Stream)
            return None

        @staticmethod
        def device_count():  # the CPU is the one device (megatron_init then seeds the RNG tracker)
            return 1

    proxy = cpu._TorchOnCpu()
    proxy.cuda = _NemoCudaOnCpu()
    make = proxy.tensor
    proxy.tensor = lambda *a, **k: make(*a, **k).as_subclass(_CudaMeansCpu)
    return proxy


_active = False


def activate_if_needed() -> bool:
    """Apply the CPU redirections when CUDA is absent (after `cpu.activate_if_needed`). Idempotent."""
    global _active
    if not cpu.activate_if_needed():
        return False
    if not _active:
        proxy = _nemo_cpu_torch()
        for name in _CPU_MODULES:
            importlib.import_module(name).torch = proxy
        # NeMo's checkpoint loader (resume) asserts CUDA is initialized, then moves CUDA tensors that
        # sit on another GPU to the current one; on a CPU there are none, so nothing is to be moved.
        importlib.import_module("nemo.lightning.io.pl")._fix_tensors_device = _no_cuda_tensors_to_move
        _active = True
    return True


def _no_cuda_tensors_to_move(checkpoint):
    return checkpoint


class _CpuBatches:
    """An iterator of batches whose tensors are `_CudaMeansCpu` (see `cpu_gpt_data_step`)."""

    def __init__(self, batches):
        self._batches = batches

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        return _as_cpu_tensors(batch)


def _as_cpu_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(_CudaMeansCpu)
    if isinstance(obj, dict):
        return {k: _as_cpu_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_as_cpu_tensors(v) for v in obj)
    return obj


def cpu_gpt_data_step(dataloader_iter):
    """NeMo's own ``gpt_data_step`` over batches whose ``.cuda()`` is the identity on the CPU."""
    from nemo.collections.llm.gpt.model.base import gpt_data_step

    return _as_plain(gpt_data_step(_CpuBatches(dataloader_iter)))


def _as_plain(obj):
    if isinstance(obj, torch.Tensor):
        return obj.as_subclass(torch.Tensor)
    if isinstance(obj, dict):
        return {k: _as_plain(v) for k, v in obj.items()}
    return obj
