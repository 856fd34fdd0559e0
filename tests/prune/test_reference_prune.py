"""Width and depth pruning pinned to the same surgery done by hand on the Hugging Face tensors.

The reference selects units from the scores with plain sorting (heads ranked inside each query
group, groups by their summed head scores, the k best neurons / channels) and slices the HF
q/k/v/o, gate/up/down, norm and embedding tensors directly -- no megatron fused layouts. The pruned
nemo_neo checkpoint, converted to HF, must hold exactly those tensors; and dropping layers must
equal deleting them from transformers' model (same logits).
"""

import torch

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.hf_mapping import neo_to_hf
from nemo_neo.checkpoint.load import load_model
from nemo_neo.checkpoint.native import load_full_state, save_full_state
from nemo_neo.prune import drop_layers, prune_width


def _best(scores: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # ties cannot occur: random scores
    return sorted(order[:k])


def _rows(units, size):
    return [u * size + j for u in units for j in range(size)]


def test_width_pruning_equals_hand_surgery_on_hf_tensors(hf_model_factory, tmp_path):
    from safetensors.torch import load_file

    hf_dir = hf_model_factory("llama3_gqa_untied")  # 8 heads, 2 groups, head_dim 10, untied
    convert_hf_to_neo(hf_dir, tmp_path / "neo")
    arch, state, _ = load_full_state(tmp_path / "neo")
    hf = load_file(str(hf_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    scores = {"heads": torch.rand(arch.num_layers, arch.num_attention_heads, generator=g),
              "neurons": torch.rand(arch.num_layers, arch.ffn_hidden_size, generator=g),
              "channels": torch.rand(arch.hidden_size, generator=g)}
    target = {"hidden_size": 60, "ffn_hidden_size": 70, "num_attention_heads": 3, "num_query_groups": 1}
    new, pruned = prune_width(arch, state, scores, target)
    got = neo_to_hf(pruned, new)

    d, hpg, new_hpg = arch.head_dim, arch.heads_per_group, 3
    ch = _best(scores["channels"], 60)
    want = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"][:, ch],
            "lm_head.weight": hf["lm_head.weight"][:, ch], "model.norm.weight": hf["model.norm.weight"][ch]}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        per_group = scores["heads"][i].view(arch.num_query_groups, hpg)
        groups = _best(per_group.sum(1), 1)
        heads = [gr * hpg + h for gr in groups for h in _best(per_group[gr], new_hpg)]
        neurons = _best(scores["neurons"][i], 70)
        want[p + "self_attn.q_proj.weight"] = hf[p + "self_attn.q_proj.weight"][_rows(heads, d)][:, ch]
        for kv in ("k_proj", "v_proj"):
            want[p + f"self_attn.{kv}.weight"] = hf[p + f"self_attn.{kv}.weight"][_rows(groups, d)][:, ch]
        want[p + "self_attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"][ch][:, _rows(heads, d)]
        for half in ("gate_proj", "up_proj"):
            want[p + f"mlp.{half}.weight"] = hf[p + f"mlp.{half}.weight"][neurons][:, ch]
        want[p + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"][ch][:, neurons]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            want[p + f"{norm}.weight"] = hf[p + f"{norm}.weight"][ch]
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert (new.hidden_size, new.ffn_hidden_size, new.num_attention_heads, new.num_query_groups) == (60, 70, 3, 1)


def test_dropping_layers_equals_deleting_them_in_transformers(hf_model_factory, tmp_path, parallel_ctx):
    from transformers import AutoModelForCausalLM

    hf_dir = hf_model_factory("llama3_gqa_untied")  # 4 layers
    convert_hf_to_neo(hf_dir, tmp_path / "neo")
    arch, state, _ = load_full_state(tmp_path / "neo")
    new, dropped = drop_layers(arch, state, [2, 0])
    assert new.num_layers == 2 and sorted({k.split(".")[2] for k in dropped if k.startswith("decoder.layers.")}) == ["0", "1"]
    save_full_state(tmp_path / "dropped", new, dropped)
    model, _, _ = load_model(tmp_path / "dropped", parallel_ctx)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[i] for i in (1, 3)])
    for j, layer in enumerate(hf.model.layers):
        layer.self_attn.layer_idx = j
    hf.config.num_hidden_layers = 2
    ids = torch.randint(0, arch.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, position_ids=None, attention_mask=None)
        ref = hf(ids, use_cache=False).logits
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
