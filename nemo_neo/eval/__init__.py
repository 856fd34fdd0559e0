"""Evaluation: LM validation loss / perplexity (lm-eval integration builds on this)."""

from nemo_neo.eval.lm_loss import validation_loss

__all__ = ["validation_loss"]
