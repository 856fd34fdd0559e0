"""Make megatron-core 0.16 run on a CPU-only torch.

megatron-core assumes CUDA in a handful of places (see ../shared/PLATFORM.md): it allocates with
``device=torch.cuda.current_device()`` or ``device="cuda"``, seeds and forks the model-parallel RNG
through ``torch.cuda`` RNG calls, and calls ``torch.cuda.synchronize()`` around p2p sends.

Rather than patch global ``torch`` (which would change behaviour for every library in the process),
each affected megatron module gets its own ``torch`` global replaced by :data:`CPU_TORCH`, a proxy
that forwards everything to the real torch except:

* ``torch.cuda`` -> :class:`_CudaOnCpu`: ``current_device()`` is the CPU device, ``synchronize`` is a
  no-op and the RNG functions act on the CPU generator (the model-parallel RNG tracker then forks
  CPU RNG states, which is what dropout on CPU draws from);
* tensor factories (``zeros``, ``empty``, ``tensor``, ...) map ``device="cuda"`` to the CPU.

This is the only place in nemo_neo that works around CUDA. It is applied by
:func:`activate_if_needed` (through `nemo_neo._compat.enable`, which entry points call), and does
nothing when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

# megatron-core modules whose module-level ``torch`` is redirected, and why.
_PATCHED_MODULES = (
    "megatron.core.utils",  # GlobalMemoryBuffer allocates on torch.cuda.current_device()
    "megatron.core.parallel_state",  # synchronize() around group creation
    "megatron.core.tensor_parallel.layers",  # weight/buffer allocation on the current CUDA device
    "megatron.core.tensor_parallel.mappings",  # gather buffers on the current CUDA device
    "megatron.core.tensor_parallel.random",  # CUDA RNG tracker and seeding
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq on CUDA
    "megatron.core.models.gpt.gpt_model",  # MTP / loss buffers on CUDA
    "megatron.core.pipeline_parallel.p2p_communication",  # shape buffers + synchronize()
    "megatron.core.pipeline_parallel.schedules",  # literal device="cuda" token counters
    "megatron.core.distributed.param_and_grad_buffer",  # grad buffers on the current CUDA device
    "megatron.core.distributed.distributed_data_parallel",  # synchronize / empty_cache
    "megatron.core.distributed.finalize_model_grads",  # reduction buffers
    "megatron.core.optimizer.clip_grads",  # norm accumulators on CUDA
    "megatron.core.optimizer.optimizer",  # found-inf / loss-scale buffers on CUDA
    "megatron.core.optimizer.distrib_optimizer",  # shard buffers on CUDA
)

_CPU = torch.device("cpu")


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return _CPU
    return device


class _CudaOnCpu(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside megatron-core modules when CUDA is absent."""

    def __getattr__(self, name):  # anything not overridden below behaves as real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(*_args, **_kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *_args, **_kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def current_stream(*_args, **_kwargs):
        return None

    @staticmethod
    def stream(_stream):
        return contextlib.nullcontext()


def _device_mapping_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _TorchOnCpu(types.ModuleType):
    """A ``torch`` look-alike: real torch, except ``cuda`` and device-mapping tensor factories."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like"):
            setattr(self, name, _device_mapping_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _TorchOnCpu()
_active = False


def _embedding_sync_on_cpu(setup):
    """LanguageModule.setup_embeddings_and_output_layer without its ``weight.data.cuda()``.

    Under pipeline parallelism with tied embeddings, megatron-core copies the first stage's embedding
    to the last stage's zeroed copy with ``weight.data = weight.data.cuda(); all_reduce(...)``. On a
    CPU-only torch ``.cuda()`` can only raise. For this one module instance, the embedding-group test
    is answered "no" while megatron's own code runs (so it skips that line), and the same all-reduce
    is then done on the CPU tensor. Nothing process-wide is swapped."""

    @functools.wraps(setup)
    def wrapper(self, *args, **kwargs):
        sync = (
            torch.distributed.is_initialized()
            and (self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0))
            and self.config.pipeline_model_parallel_size > 1
            and self._is_in_embd_group()
        )
        self._is_in_embd_group = lambda: False  # instance attribute: shadows the method for this call
        try:
            result = setup(self, *args, **kwargs)
        finally:
            del self._is_in_embd_group
        if sync:
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)
        return result

    return wrapper


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 minus its `grad.type() == 'torch.cuda.FloatTensor'`
    assertion: scale every grad by max_norm / total_norm when that is < 1 (same maths)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _cuda_type_names(tensor: torch.Tensor):
    """`tensor.type` as megatron's optimizers expect it on a GPU: with no argument, the CUDA name
    of the tensor's type ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'); a conversion as usual."""

    def type_(dtype=None, non_blocking=False, **kwargs):
        if dtype is not None:
            return torch.Tensor.type(tensor, dtype, non_blocking, **kwargs)
        name = torch.Tensor.type(tensor)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    return type_


def _with_cuda_type_names(init):
    """The constructors of megatron's mixed-precision optimizers (Float16OptimizerWithFloat16Params,
    DistributedOptimizer) sort the parameters by ``param.type()`` against the CUDA names
    ('torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor') and raise TypeError on a CPU parameter
    ('torch.FloatTensor'): while the constructor runs, each parameter of the torch optimizer it wraps
    answers with the CUDA name (an instance attribute shadowing Tensor.type, deleted afterwards, so
    no parameter keeps it and nothing process-wide changes). Everything else is megatron's code."""

    @functools.wraps(init)
    def wrapper(self, optimizer, *args, **kwargs):
        params = [p for g in getattr(optimizer, "param_groups", ()) for p in g["params"]]
        for p in params:
            p.type = _cuda_type_names(p)
        try:
            return init(self, optimizer, *args, **kwargs)
        finally:
            for p in params:
                p.__dict__.pop("type", None)

    return wrapper


def _own_step_counters(load_state_dict):
    """DistributedOptimizer.load_state_dict without apex / Transformer Engine (the CPU case) gives
    every parameter's torch-Adam state one shared ``step`` tensor; torch's Adam then adds 1 to it once
    per parameter per step, so the bias correction after a resume is wrong. Each state gets its own
    copy of the counter afterwards (the value megatron loaded)."""

    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict):
        result = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    return wrapper


def activate_if_needed() -> bool:
    """Redirect megatron-core's CUDA assumptions to the CPU when CUDA is absent. Idempotent.

    Returns True when the CPU layer is active.
    """
    global _active
    if torch.cuda.is_available():
        return False
    if _active:
        return True
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        module.torch = CPU_TORCH
    # The RNG tracker reads and writes generator state through these two helpers.
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *_a, **_k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    # bf16 parameters with fp32 main params, and the distributed optimizer: CUDA type names.
    from megatron.core.optimizer import distrib_optimizer

    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    distrib_optimizer.DistributedOptimizer.load_state_dict = _own_step_counters(
        distrib_optimizer.DistributedOptimizer.load_state_dict)
    # Tied embeddings under pipeline parallelism: the last stage's copy is moved with .cuda().
    from megatron.core.models.common.language_module import language_module

    cls = language_module.LanguageModule
    cls.setup_embeddings_and_output_layer = _embedding_sync_on_cpu(cls.setup_embeddings_and_output_layer)
    _active = True
    return True


def is_active() -> bool:
    return _active
