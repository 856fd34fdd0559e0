"""Process groups for nemo_neo: torchrun env -> torch.distributed -> megatron-core parallel state.

`initialize` is the one entry point. It reads RANK/WORLD_SIZE/LOCAL_RANK from torchrun (or runs as
a world of one without it), picks gloo on CPU and NCCL on GPU, validates TP x PP against the world
size, builds megatron-core's TP/PP/DP groups and seeds the model-parallel RNG. The returned
`ParallelContext` is passed explicitly to the code that needs ranks and groups.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_neo import _compat
from nemo_neo.errors import ConfigError


class ParallelConfigError(ConfigError):
    """TP/PP/world-size combination that cannot be laid out."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    seed: int = 1234
    # A rank that stops answering ends the job after this long instead of hanging it forever.
    timeout_minutes: float = 10.0
    # Megatron's sequence parallelism (with TP > 1): norms, dropout and residuals run on 1/TP of the
    # sequence; the TP all-reduces become all-gather + reduce-scatter (same bytes, 1/TP activations).
    sequence_parallel: bool = False
    # Activation recomputation of the models that train (student; a teacher under correction):
    # none | selective (megatron-core rebuilds `recompute_modules` in backward) | full (whole layers).
    recompute: str = "none"
    recompute_modules: tuple[str, ...] = ("core_attn",)
    # Interleaved (virtual) pipeline: each PP rank holds this many model chunks (megatron's
    # virtual_pipeline_model_parallel_size); null or 1 = one chunk per rank. Needs PP > 1.
    virtual_pipeline: int | None = None

    @property
    def vpp(self) -> int:
        """Model chunks per pipeline rank (1 without an interleaved pipeline)."""
        return int(self.virtual_pipeline or 1)

    @property
    def recompute_options(self) -> dict:
        """The keyword arguments the training entries take for it (`recipes.distill.build_pair`)."""
        return {"recompute": self.recompute, "recompute_modules": tuple(self.recompute_modules)}

    @property
    def uses_sequence_parallel(self) -> bool:
        """Whether SP is in effect: asked for, and there is a TP group to split the sequence over."""
        return bool(self.sequence_parallel) and self.tensor_parallel > 1


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    tp_group: object
    pp_group: object
    dp_group: object
    sequence_parallel: bool = False  # only ever true with tp_size > 1
    vpp_size: int = 1  # model chunks per pipeline rank (interleaved schedule when > 1)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def validate_layout(world_size: int, tp: int, pp: int, vpp: int = 1) -> int:
    """Return the data-parallel size, or raise one clear error."""
    if tp < 1 or pp < 1:
        raise ParallelConfigError(f"tensor_parallel={tp} and pipeline_parallel={pp} must be >= 1.")
    if vpp < 1 or (vpp > 1 and pp < 2):
        raise ParallelConfigError(f"virtual_pipeline={vpp} needs pipeline_parallel >= 2 (it splits each pipeline "
                                  "rank's layers into chunks); set parallel.virtual_pipeline=null or raise pipeline_parallel.")
    if world_size % (tp * pp) != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = "
            f"{tp} x {pp} = {tp * pp}; launch a multiple of {tp * pp} processes or change the sizes."
        )
    return world_size // (tp * pp)


def initialize(config: ParallelConfig | None = None) -> ParallelContext:
    """Set up torch.distributed and megatron-core's model-parallel groups (idempotent per process)."""
    from megatron.core import parallel_state, tensor_parallel

    config = config or ParallelConfig()
    cuda = torch.cuda.is_available()
    if not cuda and not _compat.is_enabled():
        # megatron-core needs its CUDA assumptions redirected on a CPU-only torch; that is an
        # explicit switch of the entry point, never a side effect of a library call.
        raise RuntimeError(
            "megatron-core on a CPU-only torch needs nemo_neo's compatibility layer: call "
            "nemo_neo.enable_compat() once before nemo_neo.parallel.initialize() (nemo_neo's own entry points do)."
        )
    if not dist.is_initialized():
        single = "RANK" not in os.environ  # a plain `python` run: a world of one
        world_size = 1 if single else int(os.environ["WORLD_SIZE"])
        validate_layout(world_size, config.tensor_parallel, config.pipeline_parallel, config.vpp)
        extra = {}
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            # NCCL then knows this rank's GPU instead of guessing it from the global rank (which
            # warns, and can hang when ranks map to GPUs unevenly)
            extra["device_id"] = torch.device("cuda", local)
        if single:  # a file store needs no TCP port, so concurrent single-process runs cannot collide
            fd, store = tempfile.mkstemp(prefix="nemo_neo_pg_")
            os.close(fd)
            os.unlink(store)
            extra.update(init_method=f"file://{store}", rank=0, world_size=1)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
            **extra,
        )
    world_size = dist.get_world_size()
    dp = validate_layout(world_size, config.tensor_parallel, config.pipeline_parallel, config.vpp)
    vpp = config.vpp if config.vpp > 1 else None  # megatron: None selects the non-interleaved schedule
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != config.tensor_parallel
            or parallel_state.get_pipeline_model_parallel_world_size() != config.pipeline_parallel
            or parallel_state.get_virtual_pipeline_model_parallel_world_size() != vpp
        ):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=config.tensor_parallel,
            pipeline_model_parallel_size=config.pipeline_parallel,
            virtual_pipeline_model_parallel_size=vpp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(config.seed)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        tp_size=config.tensor_parallel,
        pp_size=config.pipeline_parallel,
        dp_size=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        sequence_parallel=config.uses_sequence_parallel,
        vpp_size=config.vpp,
    )


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
