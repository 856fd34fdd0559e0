"""HF -> nemo_neo -> HF reproduces every tensor bit for bit and the same config."""

import json

import pytest
import torch
from conftest import ARCH_CONFIGS
from safetensors.torch import load_file

from nemo_neo.checkpoint.convert import convert_hf_to_neo, convert_neo_to_hf
from nemo_neo.checkpoint.native import load_full_state


def hf_tensors(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("name,dtype", [(n, torch.float32) for n in ARCH_CONFIGS] + [("llama3_gqa_untied", torch.bfloat16)])
def test_round_trip_is_exact(name, dtype, hf_model_factory, tmp_path):
    src = hf_model_factory(name, dtype)
    convert_hf_to_neo(src, tmp_path / "neo", tp=2)
    convert_neo_to_hf(tmp_path / "neo", tmp_path / "back")
    before, after = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for k in before:
        assert before[k].dtype == after[k].dtype == dtype, k
        assert torch.equal(before[k], after[k]), k
    config_before = json.loads((src / "config.json").read_text())
    config_after = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config_before == config_after


def test_round_trip_loads_in_transformers(hf_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = hf_model_factory("qwen2_bias_linear_rope")
    convert_hf_to_neo(src, tmp_path / "neo")
    convert_neo_to_hf(tmp_path / "neo", tmp_path / "back")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_gguf_teacher_round_trip(smollm2_ckpt, tmp_path):
    """The real teacher: nemo_neo -> HF -> nemo_neo gives identical tensors and a loadable HF dir."""
    from transformers import AutoConfig, AutoTokenizer

    convert_neo_to_hf(smollm2_ckpt, tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("Paris").input_ids
    cfg = AutoConfig.from_pretrained(tmp_path / "hf")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    convert_hf_to_neo(tmp_path / "hf", tmp_path / "neo2")
    _, a, _ = load_full_state(smollm2_ckpt)
    _, b, _ = load_full_state(tmp_path / "neo2")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
