"""The recipe's presets compose, validate, and describe the papers' models (arithmetic on the real
configs of the teachers: no weights needed)."""

from __future__ import annotations

import pytest
from conftest import REPO

from nemo_neo.models.arch import arch_from_hf_config
from nemo_neo.prune.width import pruned_arch
from nemo_neo.recipes import config as rc

PRESETS = sorted(p.stem for p in (REPO / "conf" / "preset").glob("*.yaml"))

# Public config.json values of the teachers the presets name.
LLAMA31_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                  hidden_act="silu", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
MISTRAL_NEMO_12B = dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=131072, hidden_size=5120,
                        intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, max_position_embeddings=1024000, rms_norm_eps=1e-5, rope_theta=1000000.0,
                        tie_word_embeddings=False, hidden_act="silu", sliding_window=None)


def compose(preset: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose("prune_distill", overrides=[f"preset={preset}", *overrides])


def test_every_preset_is_listed():
    assert {"smollm2_cpu", "minitron_llama31_8b_width", "minitron_llama31_8b_depth", "minitron_mistral_nemo_12b_8b",
            "llm_neo_llama31_8b_to_llama32_1b", "llm_neo_llama2_7b_to_tinyllama_1b", "llm_neo_smollm2_cpu",
            "kd_lora"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_validates_once_its_paths_are_given(preset, tmp_path):
    cfg = compose(preset)
    missing = {k for k in ("teacher.checkpoint", "data.text_files", "distill.student", "prune.data_dir")
               if OmegaConfMissing.is_missing(cfg, k)}
    if missing:  # the cluster presets name what the user must supply, in one error
        with pytest.raises(rc.RecipeConfigError, match="needs a value for") as err:
            rc.build(cfg)
        assert all(k in str(err.value) for k in missing)
        overrides = [f"{k}={tmp_path}" if k != "data.text_files" else f"{k}=[{tmp_path}/a.txt]" for k in missing]
        cfg = compose(preset, *overrides)
    rc.build(cfg)  # every section maps onto the library's configs


class OmegaConfMissing:
    @staticmethod
    def is_missing(cfg, key: str) -> bool:
        from omegaconf import OmegaConf

        node, _, leaf = key.rpartition(".")
        return OmegaConf.is_missing(OmegaConf.select(cfg, node), leaf)


@pytest.mark.parametrize("preset,teacher,expected_billions", [
    ("minitron_llama31_8b_width", LLAMA31_8B, 4.51),        # Llama-3.1-Minitron-4B-Width: 4.5B
    ("minitron_llama31_8b_depth", LLAMA31_8B, 4.54),        # Llama-3.1-Minitron-4B-Depth: 4.5B
    ("minitron_mistral_nemo_12b_8b", MISTRAL_NEMO_12B, 8.41),  # MN-Minitron-8B: 8.4B
])
def test_minitron_presets_give_the_papers_model_sizes(preset, teacher, expected_billions):
    cfg = compose(preset)
    arch = arch_from_hf_config(teacher)
    student = pruned_arch(arch, dict(cfg.prune.target), tp=cfg.parallel.tensor_parallel)
    assert student.num_parameters() / 1e9 == pytest.approx(expected_billions, abs=0.02)


def test_cpu_preset_is_the_default_and_prunes_the_embedded_teacher():
    cfg = compose("smollm2_cpu")
    assert dict(cfg.prune.target) == {"ffn_hidden_size": 768, "hidden_size": 432}
    assert list(cfg.stages) == [s for s in rc.STAGES if s not in rc.OPTIONAL_STAGES]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        default = hydra_compose("prune_distill")
    assert default == cfg
    neo = compose("llm_neo_smollm2_cpu")  # a depth-only student: no width target inherited
    assert dict(neo.prune.target) == {} and len(neo.prune.drop_layers) == 15 and "correct" not in neo.stages


def test_hyperparameter_tables_match_the_values(tmp_path):
    """The table in each preset's header is what the preset sets (spot checks of the papers' numbers)."""
    w = compose("minitron_llama31_8b_width", f"teacher.checkpoint={tmp_path}", f"data.text_files=[{tmp_path}]")
    t = rc.train_config(w.distill.train, "distill.train")
    assert (t.optim.lr, t.optim.min_lr, t.optim.warmup_steps, t.global_batch_size, w.data.seq_length) == (1e-4, 1e-5, 40, 1152, 8192)
    assert t.steps * t.global_batch_size * w.data.seq_length == pytest.approx(94e9, rel=0.01)
    m = compose("minitron_mistral_nemo_12b_8b")
    t = rc.train_config(m.distill.train, "distill.train")
    assert t.steps * t.global_batch_size * m.data.seq_length == pytest.approx(380e9, rel=0.01)
    neo = compose("llm_neo_llama31_8b_to_llama32_1b")
    lora = rc.method_config(neo.distill.method, neo.distill.loss, neo.distill.lora, "distill").lora
    t = rc.train_config(neo.distill.train, "distill.train")
    assert (neo.distill.method, lora.rank, t.optim.lr, t.optim.min_lr) == ("llm_neo", 128, 2e-4, 1e-5)
    kd = compose("kd_lora")
    lora = rc.method_config(kd.distill.method, kd.distill.loss, kd.distill.lora, "distill").lora
    assert (lora.rank, list(lora.targets), list(lora.qkv_parts), kd.distill.loss.temperature) == (8, ["linear_qkv"], ["q", "v"], 2.0)
    loss = rc.method_config(kd.distill.method, kd.distill.loss, kd.distill.lora, "distill").training_loss()  # what the distill stage trains with
    assert (loss.kind, loss.alpha, loss.temperature, loss.t2_scaling) == ("ce_kl", 0.5, 2.0, True)
    neo_loss = rc.method_config(neo.distill.method, neo.distill.loss, neo.distill.lora, "distill").training_loss()
    assert (neo_loss.kind, neo_loss.t2_scaling) == ("ce_kl", False)
