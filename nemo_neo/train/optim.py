"""AdamW + a cosine (or linear) schedule with warm-up and min LR, from megatron-core.

megatron-core's optimizer wrapper computes the gradient norm over all TP/PP ranks (so clipping is
identical at any layout), keeps fp32 master weights for bf16 training, and is the distributed
optimizer (optimizer state sharded over data-parallel ranks) when asked. The LR schedule is its
OptimizerParamScheduler; both have state dicts for resume.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_neo.errors import ConfigError
from nemo_neo.parallel.chunks import as_chunks

LR_DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # Minitron distillation peak; LLM-Neo uses 2e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    lr_decay_style: str = "cosine"  # megatron's OptimizerParamScheduler: cosine | linear | constant

    def __post_init__(self):
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"lr_decay_style={self.lr_decay_style!r}: use one of {list(LR_DECAY_STYLES)}")


def build_optimizer(ddp_model, cfg: OptimConfig, total_steps: int, lr_overrides: dict | None = None):
    """One optimizer over `ddp_model`, a DDP-wrapped model or the list of this rank's DDP-wrapped model
    chunks (interleaved pipeline; megatron's optimizer takes the chunks as a list and its gradient norm
    and clipping cover all of them). lr_overrides: {parameter-name glob: (max_lr, min_lr)} for
    parameter groups that follow the same schedule shape at other rates (e.g. a teacher corrected
    while its student distills)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

    model_chunks = as_chunks(ddp_model)
    module_config = model_chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",  # megatron's "adam" is AdamW (decoupled weight decay)
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=module_config.bf16,
        fp16=module_config.fp16,
        params_dtype=module_config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    overrides = None
    if lr_overrides:
        overrides = {ParamKey(name=glob): ParamGroupOverride(max_lr=hi, min_lr=lo) for glob, (hi, lo) in lr_overrides.items()}
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=overrides)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr / (warmup + 1),  # megatron warms up from init_lr at step 0: no zero-LR first step
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def optimizer_state_report(optimizer) -> dict:
    """How many parameters carry optimizer state, and how many state tensors they hold (over the
    torch optimizers inside megatron's wrapper, chained or not)."""
    inner = [getattr(o, "optimizer", o) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    states = [s for o in inner for s in o.state.values()]
    return {"optimizer_params": len(states), "optimizer_state_tensors": sum(len(s) for s in states)}
