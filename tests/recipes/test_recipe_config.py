"""The recipe's config is typed once and every loss option reaches the loss that trains.

Regression for a defect a new user hit: `distill.loss.top_k` / `jsd_beta` / `chunk_tokens` passed
validation and were then silently dropped (the method config copied four fields of the loss), and
on the command line `distill.loss.top_k=4` was refused by Hydra (the key was not in conf/)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from nemo_neo.checkpoint.load import load_model
from nemo_neo.data import collate, indexed_from_text
from nemo_neo.distill.losses import KDLossConfig, distillation_loss
from nemo_neo.errors import ConfigError
from nemo_neo.recipes import config as rc
from nemo_neo.recipes.methods import MethodConfig, train_student
from nemo_neo.train.loop import TrainConfig
from nemo_neo.train.optim import OptimConfig


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose("prune_distill", overrides=list(overrides))


def test_every_loss_option_is_in_conf_with_its_default():
    """conf/ lists every KDLossConfig field with the library's default, so `key=value` works."""
    from dataclasses import fields

    loss = compose().distill.loss
    assert set(loss) == {f.name for f in fields(KDLossConfig)}
    assert rc.build(compose()).distill.loss == KDLossConfig()


@pytest.mark.parametrize("override,field,value", [
    ("distill.loss.top_k=4", "top_k", 4),
    ("distill.loss.jsd_beta=0.25", "jsd_beta", 0.25),
    ("distill.loss.chunk_tokens=7", "chunk_tokens", 7),
    ("distill.loss.ignore_index=-1", "ignore_index", -1),
])
def test_a_loss_option_on_the_command_line_reaches_the_training_loss(override, field, value):
    method = rc.build(compose(override)).distill.method
    assert getattr(method.training_loss(), field) == value


def test_llm_neo_takes_any_divergence_and_its_options_beside_ce():
    method = rc.build(compose("distill.method=llm_neo", "distill.loss.kind=reverse_kl", "distill.loss.alpha=0.3")).distill.method
    loss = method.training_loss()
    assert (loss.kind, loss.divergence, loss.alpha) == ("ce_kl", "reverse_kl", 0.3)
    topk = MethodConfig(method="llm_neo", loss=KDLossConfig(top_k=8)).training_loss()
    assert (topk.kind, topk.divergence, topk.top_k) == ("ce_kl", "forward_kl", 8)
    with pytest.raises(ConfigError, match="top_k is only defined for the forward KL"):
        KDLossConfig(kind="ce_kl", divergence="jsd", top_k=8)


def test_a_typo_in_a_loss_key_is_refused_by_name():
    with pytest.raises(rc.RecipeConfigError, match=r"distill.loss: unknown key\(s\) \['topk'\]"):
        rc.build(compose("+distill.loss.topk=4"))
    with pytest.raises(rc.RecipeConfigError, match="distill.loss: .*top_k must be >= 1"):
        rc.build(compose("distill.loss.top_k=0"))


def test_activation_recompute_is_read_from_the_parallel_section_and_checked():
    assert rc.build(compose()).parallel.recompute_options == {"recompute": "none", "recompute_modules": ("core_attn",)}
    cfg = rc.build(compose("parallel.recompute=selective", "parallel.recompute_modules=[core_attn,mlp]"))
    assert cfg.parallel.recompute_options == {"recompute": "selective", "recompute_modules": ("core_attn", "mlp")}
    with pytest.raises(rc.RecipeConfigError, match=r"^parallel.recompute='layers': use one of none, selective, full$"):
        rc.build(compose("parallel.recompute=layers"))
    with pytest.raises(rc.RecipeConfigError, match=r"parallel.recompute_modules=\['moe'\]: .*core_attn, mlp, layernorm"):
        rc.build(compose("parallel.recompute=selective", "parallel.recompute_modules=[moe]"))


def test_virtual_pipeline_is_read_and_its_requirements_name_the_fix(monkeypatch):
    assert rc.build(compose()).parallel.vpp == 1  # conf/: null
    monkeypatch.setenv("WORLD_SIZE", "2")
    vpp = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2", "stages=[distill]"]
    cfg = rc.build(compose(*vpp, "distill.train.global_batch_size=8", "distill.train.micro_batch_size=2"))
    assert (cfg.parallel.pipeline_parallel, cfg.parallel.vpp) == (2, 2)
    with pytest.raises(rc.RecipeConfigError, match=r"needs pipeline_parallel >= 2 \(got 1\); raise pipeline_parallel or set "
                                                   r"parallel.virtual_pipeline=null"):
        rc.build(compose("parallel.virtual_pipeline=2", "stages=[distill]"))
    with pytest.raises(rc.RecipeConfigError, match=r"1 micro-batch\(es\) per step .* needs at least pipeline_parallel=2; "
                                                   r"raise global_batch_size"):
        rc.build(compose(*vpp, "distill.train.global_batch_size=4", "distill.train.micro_batch_size=4"))
    with pytest.raises(rc.RecipeConfigError, match="kd or llm_neo with the teacher online"):
        rc.build(compose(*vpp, "distill.method=sft"))
    with pytest.raises(rc.RecipeConfigError, match="kd or llm_neo with the teacher online"):
        rc.build(compose(*vpp, "distill.teacher_cache=/some/cache"))


def test_virtual_pipeline_layer_split_is_checked_for_teacher_and_student(tiny_pair):
    from nemo_neo.recipes import plan_check

    # the tiny teacher has 2 layers: PP=2 x VPP=2 is 4 chunks
    cfg = rc.build(compose("parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2", "stages=[distill]",
                           f"distill.student={tiny_pair / 'student'}"))
    with pytest.raises(rc.RecipeConfigError, match=r"into 4 chunks of layers, but the teacher has 2 layers and the "
                                                   r"student has 2 layers; choose a virtual_pipeline"):
        plan_check.check_virtual_pipeline(cfg, tiny_pair / "teacher")
    plan_check.check_virtual_pipeline(rc.build(compose("stages=[distill]")), tiny_pair / "teacher")  # no VPP: nothing


def test_top_k_from_the_recipe_trains_with_the_top_k_loss(tiny_pair, parallel_ctx, tmp_path):
    """One KD step from the recipe's config with distill.loss.top_k=4: the loss the trainer logs is the
    top-k forward KL computed directly on the same rows (and differs from the full-vocabulary KL)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pair / "teacher"))
    train = indexed_from_text([tiny_pair / "corpus.txt"], tokenizer, 16, train_samples=4, cache_dir=tmp_path / "data",
                              progress=False)[0].rows(4)
    method = rc.build(compose("distill.loss.top_k=4")).distill.method
    # one global batch = every row, so the logged loss does not depend on the sampler's order
    cfg = TrainConfig(steps=1, global_batch_size=4, micro_batch_size=2, save_every=1, eval_every=1,
                      optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0))
    result = train_student(parallel_ctx, method, tiny_pair / "student", tiny_pair / "teacher", train, train[:0], cfg,
                           tmp_path / "run")
    logged = result["history"][0]["loss"]

    def direct(config: KDLossConfig) -> float:
        student, _, _ = load_model(tiny_pair / "student", parallel_ctx, torch.float32)
        teacher, _, _ = load_model(tiny_pair / "teacher", parallel_ctx, torch.float32)
        batch = collate(train)
        with torch.no_grad():
            s = _logits(student, batch)
            t = _logits(teacher, batch)
            out = distillation_loss(s, t, config, labels=batch["labels"], loss_mask=batch["loss_mask"])
        return (out.loss_sum / out.num_tokens).item()

    top_k, full = direct(KDLossConfig(top_k=4)), direct(KDLossConfig())
    assert logged == pytest.approx(top_k, rel=1e-5)
    assert abs(top_k - full) > 1e-3 * abs(full)  # the option changes the loss: the test can tell them apart


def _logits(model, batch) -> torch.Tensor:
    """[b, s, V] logits of a megatron GPT stage (what the trainer's loss sees)."""
    model.eval()
    return model(batch["input_ids"], position_ids=None, attention_mask=None)
