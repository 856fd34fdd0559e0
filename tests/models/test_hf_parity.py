"""The native megatron-core model's fp32 logits match transformers' on the same tokens."""

import pytest
import torch
from conftest import ARCH_CONFIGS, RANDOM_CONFIGS, SHARED_DATA

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.load import load_model

TOL = 1e-4


def native_logits(ckpt, ctx, ids):
    model, _, _ = load_model(ckpt, ctx)
    model.eval()
    with torch.no_grad():
        return model(ids, position_ids=None, attention_mask=None)


def test_smollm2_real_weights_match_transformers(smollm2_ckpt, parallel_ctx, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_neo.checkpoint.convert import convert_neo_to_hf

    hf_dir = tmp_path / "hf"
    convert_neo_to_hf(smollm2_ckpt, hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = (SHARED_DATA / "wikitext2_valid.txt").read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :192]
    ids = torch.cat([ids, ids.flip(1)])  # batch of 2 distinct rows
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = native_logits(smollm2_ckpt, parallel_ctx, ids)
    assert ours.shape == ref.shape == (2, 192, 49152)
    assert (ours - ref).abs().max().item() <= TOL
    # and the model is the real one: it predicts real text far better than chance
    loss = torch.nn.functional.cross_entropy(ours[0, :-1], ids[0, 1:])
    assert loss.item() < 4.0 < torch.log(torch.tensor(49152.0)).item()


@pytest.mark.parametrize("name", ARCH_CONFIGS)
def test_random_configs_match_transformers(name, hf_model_factory, parallel_ctx, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = hf_model_factory(name)
    ckpt = tmp_path / "neo"
    convert_hf_to_neo(hf_dir, ckpt)
    vocab = RANDOM_CONFIGS[name]["vocab_size"]
    ids = torch.randint(0, vocab, (3, 70), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = native_logits(ckpt, parallel_ctx, ids)
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.1  # not a degenerate all-zero comparison
    assert (ours - ref).abs().max().item() <= TOL
