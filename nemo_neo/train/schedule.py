"""Run micro-batches through a (possibly pipelined) model with megatron-core's schedules.

`run_microbatches` hides the one awkward part of megatron-core's pipeline API: the forward-step
callback. Each micro-batch is a dict of tensors (input_ids [b, s], optional labels / loss_mask).
On the last pipeline stage `loss_fn(output, batch)` turns the model output (vocab-parallel logits,
or per-token CE when `labels` are passed to the model) into `(loss, report_dict)`; the reports of
every micro-batch come back as a list (empty on other stages). Gradients accumulate in the
model's grads (`main_grad` under megatron DDP) and are finalized (DP all-reduce, tied-embedding
all-reduce across the first and last stages) when the model is DDP-wrapped.
"""

from __future__ import annotations

from typing import Callable

import torch


def wrap_ddp(model: torch.nn.Module, grad_reduce_in_fp32: bool = True, use_distributed_optimizer: bool = False):
    """Wrap with megatron-core's DistributedDataParallel (contiguous grad buffers, DP reduction)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


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
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    from megatron.core.distributed import finalize_model_grads

    # Only a DDP-wrapped model has the buffers finalize_model_grads reduces.
    config.finalize_model_grads_func = finalize_model_grads if hasattr(model, "ddp_config") else None
    batch_size, seq_len = microbatches[0]["input_ids"].shape

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        labels = batch.get("labels") if pass_labels else None
        extra = {k: batch[k] for k in forward_keys}
        output = stage_model(batch["input_ids"], position_ids=None, attention_mask=None, labels=labels, **extra)
        return output, lambda out: loss_fn(out, batch)

    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=batch_size,
        forward_only=forward_only,
        **({"adjust_tensor_shapes_fn": adjust_tensor_shapes_fn} if adjust_tensor_shapes_fn and config.pipeline_model_parallel_size > 1 else {}),
    )

