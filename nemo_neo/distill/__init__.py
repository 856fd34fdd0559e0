"""Logit distillation losses (forward/reverse KL, JSD, CE+KL, top-k), chunked and vocab-parallel."""

from nemo_neo.distill.fused import HeadInputs, fused_distillation_loss
from nemo_neo.distill.losses import (
    LOSS_KINDS,
    KDLossConfig,
    KDLossOutput,
    distillation_loss,
    global_token_mean,
)

__all__ = ["LOSS_KINDS", "HeadInputs", "KDLossConfig", "KDLossOutput", "distillation_loss",
           "fused_distillation_loss", "global_token_mean"]
