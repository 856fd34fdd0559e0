"""Activation importance pinned to the paper's formula, computed independently on transformers.

The reference records raw activations with forward hooks on transformers' LlamaForCausalLM (the
model the nemo_neo checkpoint was converted from), on the same token rows, and applies the formula
directly to whole tensors in float64 -- no streaming accumulator, no megatron code:
  heads    at o_proj's input          [b, s, H*d] -> per head ||.||_2 over head_dim
  neurons  at down_proj's input       [b, s, F]   -> |.|
  channels at both RMSNorm outputs    [b, s, h]   -> |.|, summed over every norm of every layer
then seq_agg over the sequence of each row and batch_agg over the rows (mean, l2 = sqrt of the sum
of squares, var = population variance). Every seq_agg x batch_agg pair the code supports is
checked, with a micro-batch size that leaves a partial last micro-batch.
"""

import itertools

import pytest
import torch

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.load import load_model
from nemo_neo.prune import ImportanceConfig, compute_importance
from nemo_neo.prune.importance import AGGREGATIONS

N_ROWS, SEQ = 7, 13  # 7 rows at micro-batch 3: micro-batches of 3, 3 and 1


def _agg(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim)
    if how == "l2":
        return x.pow(2).sum(dim).sqrt()
    assert how == "var"
    return x.var(dim, unbiased=False)


@pytest.fixture(scope="module")
def reference(hf_model_factory, module_tmp):
    """(checkpoint, rows, raw HF activations per hook point) for the GQA llama3 config (8 heads in
    2 groups, untied head, head_dim 10)."""
    from transformers import AutoModelForCausalLM

    hf_dir = hf_model_factory("llama3_gqa_untied")
    ckpt = module_tmp("ref_importance") / "neo"
    convert_hf_to_neo(hf_dir, ckpt)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    cfg = hf.config
    rows = torch.randint(0, cfg.vocab_size, (N_ROWS, SEQ + 1), generator=torch.Generator().manual_seed(11))
    raw = {"heads": [], "neurons": [], "channels": []}
    handles = []
    for layer in hf.model.layers:
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: raw["heads"].append(a[0].detach())))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: raw["neurons"].append(a[0].detach())))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(lambda m, a, out: raw["channels"].append(out.detach())))
    with torch.no_grad():
        hf(rows[:, :-1])  # compute_importance feeds rows[:, :-1] (the last token is only a label)
    for h in handles:
        h.remove()
    d = cfg.head_dim
    per_unit = {  # [L (or norms), b, s, units], non-negative, before any aggregation
        "heads": torch.stack([x.view(*x.shape[:2], -1, d).norm(dim=-1) for x in raw["heads"]]),
        "neurons": torch.stack(raw["neurons"]).abs(),
        "channels": torch.stack(raw["channels"]).abs(),
    }
    assert per_unit["heads"].shape == (cfg.num_hidden_layers, N_ROWS, SEQ, cfg.num_attention_heads)
    assert per_unit["channels"].shape[0] == 2 * cfg.num_hidden_layers
    return ckpt, rows, per_unit


def expected_scores(per_unit: dict, seq_agg: str, batch_agg: str) -> dict:
    scores = {k: _agg(_agg(v, seq_agg, dim=2), batch_agg, dim=1) for k, v in per_unit.items()}
    scores["channels"] = scores["channels"].sum(0)  # summed over every norm of every layer
    return scores


@pytest.mark.parametrize("seq_agg,batch_agg", list(itertools.product(AGGREGATIONS, AGGREGATIONS)))
def test_importance_matches_formula_on_transformers(reference, parallel_ctx, seq_agg, batch_agg):
    ckpt, rows, per_unit = reference
    model, arch, _ = load_model(ckpt, parallel_ctx)
    config = ImportanceConfig(seq_agg=seq_agg, batch_agg=batch_agg, num_samples=N_ROWS, micro_batch_size=3)
    got = compute_importance(model, arch, parallel_ctx, rows, config)
    want = expected_scores(per_unit, seq_agg, batch_agg)
    assert got["num_samples"] == N_ROWS
    for key in ("heads", "neurons", "channels"):
        assert got[key].shape == want[key].shape, key
        ref = want[key].to(got[key].dtype)
        # fp32 model vs the float64 reference; var over a few rows amplifies rounding least at 1e-4
        assert torch.allclose(got[key], ref, rtol=2e-4, atol=1e-6 * ref.abs().max().item()), (
            key, (got[key] - ref).abs().max().item(), ref.abs().max().item())
        assert ref.std() > 0, key  # the scores differ between units: the check is not vacuous


def test_aggregations_are_distinguishable(reference):
    """Each pair gives other scores than every other pair, so the test above tells them apart."""
    _, _, per_unit = reference
    results = {pair: expected_scores(per_unit, *pair) for pair in itertools.product(AGGREGATIONS, AGGREGATIONS)}
    for a, b in itertools.combinations(results, 2):
        assert any(not torch.allclose(results[a][k], results[b][k], rtol=1e-2) for k in results[a]), (a, b)
