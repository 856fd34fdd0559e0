"""NeMo 2 <-> nemo_neo checkpoint conversion: bit-exact round trips, identical logits, clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

import nemo_neo.nemo as nn_nemo
from nemo_neo.checkpoint.hf_io import CheckpointError
from nemo_neo.checkpoint.native import load_full_state

TEACHER, STUDENT = "llama3_gqa_untied", "student_of_llama3"  # the models of conftest.neo_ckpts


def _dcp_tensors(nemo_ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of a NeMo checkpoint's weights/, read by torch's own DCP reader (independent of ours)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(nemo_ckpt / "weights"))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.mark.parametrize("name", [TEACHER, STUDENT])
def test_neo_nemo_neo_round_trip_is_bit_exact(name, neo_ckpts, nemo_ckpts, tmp_path):
    back = tmp_path / "back"
    nn_nemo.nemo_to_neo(nemo_ckpts[name], back)
    arch0, state0, _ = load_full_state(neo_ckpts[name])
    arch1, state1, index = load_full_state(back)
    assert (arch1.num_layers, arch1.num_query_groups, arch1.tie_embeddings, arch1.rope) == \
           (arch0.num_layers, arch0.num_query_groups, arch0.tie_embeddings, arch0.rope)
    assert sorted(state0) == sorted(state1)
    for key in state0:
        assert state0[key].dtype == state1[key].dtype and torch.equal(state0[key], state1[key]), key
    assert index["metadata"]["format"] == "nemo2"


def test_nemo_weights_hold_the_neo_tensors(neo_ckpts, nemo_ckpts):
    """Read with torch's DCP reader: NeMo's stacked layout, TE norm names, [gate; up] fc1 -- same values."""
    _, neo, _ = load_full_state(neo_ckpts[TEACHER])
    dcp = _dcp_tensors(nemo_ckpts[TEACHER])
    assert torch.equal(dcp["module.embedding.word_embeddings.weight"], neo["embedding.word_embeddings.weight"])
    assert torch.equal(dcp["module.output_layer.weight"], neo["output_layer.weight"])
    for i in range(4):
        assert torch.equal(dcp["module.decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i],
                           neo[f"decoder.layers.{i}.input_layernorm.weight"])
        assert torch.equal(dcp["module.decoder.layers.mlp.linear_fc1.weight"][i], neo[f"decoder.layers.{i}.mlp.linear_fc1.weight"])


def test_nemo_neo_nemo_round_trip_is_bit_exact(nemo_ckpts, tmp_path):
    neo = nn_nemo.nemo_to_neo(nemo_ckpts[STUDENT], tmp_path / "neo")["out"]
    again = nn_nemo.neo_to_nemo(neo, tmp_path / "nemo")
    first, second = _dcp_tensors(nemo_ckpts[STUDENT]), _dcp_tensors(again)
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # NeMo's own context loader reads the config back with the same shape.
    cfg = nn_nemo.convert.load_nemo_model_context(again).config
    assert (cfg.hidden_size, cfg.num_query_groups, cfg.share_embeddings_and_output_weights) == (40, 2, True)


@pytest.mark.parametrize("spec", ["nemo_default", "neo_layer_spec"])
def test_logits_match_nemo_neo(spec, neo_ckpts, nemo_ckpts, parallel_ctx):
    """NeMo's model (built by NeMo's config from the checkpoint) vs nemo_neo's model of the converted checkpoint."""
    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.nemo.models import neo_layer_spec

    nemo_module = nn_nemo.convert.load_nemo_module(nemo_ckpts[TEACHER], neo_layer_spec if spec == "neo_layer_spec" else None)
    neo_model, _, _ = load_model(neo_ckpts[TEACHER], parallel_ctx)
    neo_model.eval()
    tokens = torch.randint(0, 130, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = neo_model(tokens, position_ids=None, attention_mask=None)
        got = nemo_module(tokens, position_ids=None, attention_mask=None)
    assert got.shape == expected.shape == (2, 24, 130)
    if spec == "neo_layer_spec":  # same kernels: identical logits
        assert torch.equal(got, expected)
    else:  # NeMo's local spec uses megatron's unfused attention instead of torch SDPA
        assert (got - expected).abs().max() <= 1e-5


def test_unsupported_nemo_model_is_one_clear_error(nemo_ckpts, tmp_path):
    from nemo.collections import llm

    cfg = nn_nemo.convert.load_nemo_model_context(nemo_ckpts[STUDENT]).config
    cfg.normalization = "LayerNorm"
    with pytest.raises(nn_nemo.UnsupportedNemoModelError, match="normalization='LayerNorm'"):
        nn_nemo.arch_from_nemo_config(cfg, 130)
    gemma = llm.Gemma2Config(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4)
    with pytest.raises(nn_nemo.UnsupportedNemoModelError, match="Gemma2Config"):
        nn_nemo.arch_from_nemo_config(gemma, 128)


def test_not_a_nemo_checkpoint(neo_ckpts, nemo_ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="is a nemo_neo checkpoint"):
        nn_nemo.nemo_to_neo(neo_ckpts[STUDENT], tmp_path / "x")
    broken = tmp_path / "broken"
    shutil.copytree(nemo_ckpts[STUDENT] / "context", broken / "context")
    with pytest.raises(CheckpointError, match="no weights/ directory"):
        nn_nemo.nemo_to_neo(broken, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bf16_qwen2_round_trip_keeps_values_and_dtypes(hf_model_factory, tmp_path):
    """q/k/v biases, linear RoPE scaling, bf16 (megatron's local norms are fp32 in a bf16 model)."""
    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    convert_hf_to_neo(hf_model_factory("qwen2_bias_linear_rope", torch.bfloat16), tmp_path / "neo")
    nn_nemo.neo_to_nemo(tmp_path / "neo", tmp_path / "nemo")
    assert nn_nemo.convert.load_nemo_model_context(tmp_path / "nemo").config.add_qkv_bias
    nn_nemo.nemo_to_neo(tmp_path / "nemo", tmp_path / "back")
    arch0, state0, _ = load_full_state(tmp_path / "neo")
    arch1, state1, _ = load_full_state(tmp_path / "back")
    assert (arch1.model_type, arch1.qkv_bias, arch1.rope) == (arch0.model_type, True, arch0.rope)
    assert sorted(state0) == sorted(state1)
    for key in state0:
        assert state1[key].dtype == torch.bfloat16 and torch.equal(state0[key], state1[key]), key
