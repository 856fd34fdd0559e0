"""The recipe's hydra config, turned into the library's typed configs, validated before any work.

The yaml (conf/prune_distill.yaml + conf/preset/*.yaml) reads like the papers' hyperparameter
tables; this module is the one place that maps its sections onto TrainConfig / OptimConfig /
LoRAConfig / KDLossConfig / ImportanceConfig, so a typo in a key fails here, by name.
"""

from __future__ import annotations

from dataclasses import fields

from omegaconf import DictConfig, OmegaConf

from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.errors import ConfigError
from nemo_neo.peft.apply import LoRAConfig
from nemo_neo.prune.importance import ImportanceConfig
from nemo_neo.recipes.methods import MethodConfig
from nemo_neo.train.loop import TrainConfig
from nemo_neo.train.optim import OptimConfig

STAGES = ("correct", "prune", "distill", "evaluate", "export")
CORRECTION_MODES = ("full", "lora")
DISTILL_METHODS = ("kd", "llm_neo", "lora", "sft")


class RecipeConfigError(ConfigError):
    """The recipe's configuration cannot be run as given (message names the key and the fix)."""


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _build(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def train_config(node, where: str) -> TrainConfig:
    """A `train:` section: loop keys (steps, batch sizes, eval/save cadence) and optimizer keys
    (lr, min_lr, warmup_steps, weight_decay, clip_grad, ...) side by side, as in the papers' tables."""
    values = _plain(node)
    loop_keys = {f.name for f in fields(TrainConfig)} - {"optim"}
    optim = _build(OptimConfig, {k: v for k, v in values.items() if k not in loop_keys}, f"{where} (optimizer)")
    return TrainConfig(**{k: v for k, v in values.items() if k in loop_keys}, optim=optim)


def lora_config(node, where: str) -> LoRAConfig:
    return _build(LoRAConfig, _plain(node), where)


def kd_loss_config(node, where: str) -> KDLossConfig:
    return _build(KDLossConfig, _plain(node), where)


def method_config(distill_node):
    """The distill section's training method (loss weights, temperature, T^2, adapters)."""

    loss = kd_loss_config(distill_node.loss, "distill.loss")
    return MethodConfig(method=distill_node.method, alpha=loss.alpha, temperature=loss.temperature, kd_loss=loss.kind,
                        lora=lora_config(distill_node.lora, "distill.lora"), t2_scaling=loss.t2_scaling)


def importance_config(node, where: str) -> ImportanceConfig:
    return _build(ImportanceConfig, _plain(node), where)


def check(cfg: DictConfig) -> None:
    """Everything that can be checked without touching a model: stage names, modes, methods."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RecipeConfigError(f"the config needs a value for {', '.join(missing)} (the preset marks them ???); set "
                                "them on the command line, e.g. teacher.checkpoint=/path/to/checkpoint")
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RecipeConfigError(f"unknown stage(s) {unknown} in stages={stages}; available, in order: {list(STAGES)}")
    if cfg.correct.mode not in CORRECTION_MODES:
        raise RecipeConfigError(f"correct.mode={cfg.correct.mode!r}: use one of {list(CORRECTION_MODES)}")
    if cfg.distill.method not in DISTILL_METHODS:
        raise RecipeConfigError(f"distill.method={cfg.distill.method!r}: use one of {list(DISTILL_METHODS)}")
    if cfg.correct.in_parallel and cfg.distill.method != "kd":
        raise RecipeConfigError("correct.in_parallel=true corrects the teacher while a full-parameter student "
                                f"distills from it; it needs distill.method=kd (got {cfg.distill.method!r})")
    if "prune" in stages and not cfg.prune.target and not cfg.prune.drop_layers:
        raise RecipeConfigError("the prune stage needs prune.target (e.g. {ffn_hidden_size: 768, hidden_size: 432} "
                                "or {num_layers: 16}) or prune.drop_layers")
    for section in ("correct", "distill"):
        train_config(cfg[section].train, f"{section}.train")
    lora_config(cfg.correct.lora, "correct.lora")
    lora_config(cfg.distill.lora, "distill.lora")
    kd_loss_config(cfg.distill.loss, "distill.loss")
    importance_config(cfg.prune.importance, "prune.importance")
