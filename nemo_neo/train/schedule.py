"""Run micro-batches through a (possibly pipelined) model with megatron-core's schedules.

`run_microbatches` hides the one awkward part of megatron-core's pipeline API: the forward-step
callback. Each micro-batch is a dict of tensors (input_ids [b, s], optional labels / loss_mask).
On the last pipeline stage `loss_fn(output, batch)` turns the model output (vocab-parallel logits,
or per-token CE when `labels` are passed to the model) into `(loss, report_dict)`; the reports of
every micro-batch come back as a list (empty on other stages). Gradients accumulate in the
model's grads (`main_grad` under megatron DDP) and are finalized (DP all-reduce, tied-embedding
all-reduce across the first and last stages) when the model is DDP-wrapped.

Under an interleaved pipeline (`ParallelConfig.virtual_pipeline`) the model is this rank's list of
chunks (`nemo_neo.parallel.chunks`): each chunk is wrapped by its own DDP, and megatron's interleaved
schedule runs every micro-batch through every chunk (one data iterator per chunk).
"""

from __future__ import annotations

from typing import Callable

import torch

from nemo_neo.errors import ConfigError
from nemo_neo.parallel.chunks import as_chunks


def wrap_ddp(model, grad_reduce_in_fp32: bool = True, use_distributed_optimizer: bool = False):
    """Wrap with megatron-core's DistributedDataParallel (contiguous grad buffers, DP reduction); a
    list of model chunks gives the list of their DDPs."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    # as Megatron-LM's get_model: only the first chunk's buffers are split into buckets
    wrapped = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(as_chunks(model))]
    return wrapped if isinstance(model, (list, tuple)) else wrapped[0]


def _interleaved_group_size(config, num_microbatches: int) -> int:
    """megatron's interleaved schedule runs micro-batches in groups (`microbatch_group_size_per_vp_stage`,
    PP by default) and refuses a count that is not a multiple of it; one group of all of them is
    always valid (less overlap, same result) once there are at least PP. Megatron's default otherwise."""
    pp = config.pipeline_model_parallel_size
    if num_microbatches < pp:
        raise ConfigError(f"{num_microbatches} micro-batch(es) per step with an interleaved pipeline (virtual_pipeline > 1) "
                          f"at PP={pp}: megatron's schedule needs at least PP; raise global_batch_size (or lower "
                          "micro_batch_size), or set parallel.virtual_pipeline=null")
    return pp if num_microbatches % pp == 0 else num_microbatches


def run_microbatches(
    model: torch.nn.Module,
    microbatches: list[dict],
    loss_fn: Callable,
    forward_only: bool = False,
    pass_labels: bool = False,
    adjust_tensor_shapes_fn: Callable | None = None,
    forward_keys: tuple = (),
) -> list[dict]:
    """Forward (and backward unless `forward_only`) every micro-batch through the pipeline.
    `forward_keys`: micro-batch entries passed to the model as keyword arguments besides input_ids."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    model = as_chunks(model)
    config = get_model_config(model[0])
    # Only a DDP-wrapped model has the buffers finalize_model_grads reduces.
    config.finalize_model_grads_func = finalize_model_grads if hasattr(model[0], "ddp_config") else None
    batch_size, seq_len = microbatches[0]["input_ids"].shape
    interleaved = parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        labels = batch.get("labels") if pass_labels else None
        extra = {k: batch[k] for k in forward_keys}
        output = stage_model(batch["input_ids"], position_ids=None, attention_mask=None, labels=labels, **extra)
        return output, lambda out: loss_fn(out, batch)

    forward_backward = get_forward_backward_func()
    options = {}
    if interleaved:  # p2p shapes come from the chunk's config (see distill.model); no adjust function
        config.microbatch_group_size_per_vp_stage = _interleaved_group_size(config, len(microbatches))
    elif adjust_tensor_shapes_fn and config.pipeline_model_parallel_size > 1:
        options["adjust_tensor_shapes_fn"] = adjust_tensor_shapes_fn
    return forward_backward(
        forward_step_func=forward_step,
        # each chunk takes every micro-batch, in order, from its own iterator
        data_iterator=[iter(microbatches) for _ in model] if interleaved else iter(microbatches),
        model=model,
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=batch_size,
        forward_only=forward_only,
        **options,
    )

