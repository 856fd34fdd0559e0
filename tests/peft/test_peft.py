"""LoRA / MoSLoRA adapters: TP=2 equals TP=1, merge is exact, only adapters learn in LLM-Neo, bad input."""

import json

import pytest
import torch
from conftest import SHARED_DATA, torchrun
from safetensors import safe_open

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.load import load_model
from nemo_neo.checkpoint.native import load_full_state, local_tensors, save_full_state
from nemo_neo.peft import (
    LoRAConfig,
    LoRAConfigError,
    adapters_of,
    apply_lora,
    load_adapters,
    merge_lora,
    save_adapters,
    trainable_report,
)

WORKER = "tests/workers/lora_worker.py"


@pytest.fixture(scope="module")
def gqa_ckpt(hf_model_factory, module_tmp):
    path = module_tmp("peft") / "neo"
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), path)
    return path


@pytest.mark.parametrize("mixer,parts", [(False, "q,k,v"), (True, "q,v")], ids=["lora_all", "moslora_qv"])
def test_lora_tp2_equals_tp1(gqa_ckpt, tmp_path, mixer, parts):
    outs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        out.mkdir()
        torchrun(WORKER, tp, "--ckpt", gqa_ckpt, "--out", out, "--tp", tp, "--parts", parts, *(["--mixer"] if mixer else []))
        outs[tp] = torch.load(out / "outputs.pt"), torch.load(out / "grads.pt")
    (o1, g1), (o2, g2) = outs[1], outs[2]
    assert (o1["logits"] - o2["logits"]).abs().max().item() <= 1e-5
    assert torch.allclose(o1["loss"], o2["loss"], rtol=1e-6)
    assert sorted(g1["grads"]) == sorted(g2["grads"]) and all(".lora_" in k for k in g1["grads"])
    assert any(k.endswith(".lora_M") for k in g1["grads"]) == mixer
    for k, ref in g1["grads"].items():
        assert ref.abs().max() > 0, k
        assert ((g2["grads"][k] - ref).abs().max() / ref.abs().max()).item() <= 1e-5, k
    assert all(torch.equal(g1["adapters"][k], g2["adapters"][k]) for k in g1["adapters"])  # TP-invariant init


def _nonzero_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in adapters_of(model).values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("mixer", [False, True])
def test_merge_equals_base_plus_adapter(gqa_ckpt, parallel_ctx, tmp_path, mixer):
    model, arch, _ = load_model(gqa_ckpt, parallel_ctx)
    apply_lora(model, LoRAConfig(rank=4, alpha=16, mixer=mixer, qkv_parts=["q", "v"]), parallel_ctx)
    _nonzero_adapters(model)
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = model(ids, position_ids=None, attention_mask=None)
        assert merge_lora(model) == 4 * arch.num_layers
        merged = model(ids, position_ids=None, attention_mask=None)
    assert (adapted - merged).abs().max().item() <= 1e-5
    # the merged model is a plain checkpoint again (no adapters, base names)
    state = local_tensors(model, arch)
    assert not any(".lora_" in k or ".base." in k for k in state)
    save_full_state(tmp_path / "merged", arch, state)
    reloaded, _, _ = load_model(tmp_path / "merged", parallel_ctx)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, position_ids=None, attention_mask=None), merged)


def test_adapters_save_alone_and_reload(gqa_ckpt, parallel_ctx, tmp_path):
    model, arch, _ = load_model(gqa_ckpt, parallel_ctx)
    cfg = LoRAConfig(rank=4, alpha=8, targets=["linear_qkv", "linear_fc2"])
    apply_lora(model, cfg, parallel_ctx)
    _nonzero_adapters(model)
    save_adapters(tmp_path / "a.safetensors", model, arch, parallel_ctx, cfg)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_" in k for k in keys)
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (tmp_path / "a.safetensors").stat().st_size < 4 * size + 10_000  # adapters only, not the model
    other, _, _ = load_model(gqa_ckpt, parallel_ctx)
    apply_lora(other, cfg, parallel_ctx)
    load_adapters(tmp_path / "a.safetensors", other, parallel_ctx)
    ids = torch.randint(0, arch.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids, position_ids=None, attention_mask=None), other(ids, position_ids=None, attention_mask=None))
    report = trainable_report(model)
    assert report["trainable"] == size and 0 < report["trainable_percent"] < 100
    assert report["modules"]["linear_qkv.lora_A"]["trainable"] > 0 and report["modules"]["word_embeddings"]["trainable"] == 0


def test_bad_input(gqa_ckpt, hf_model_factory, parallel_ctx, tmp_path):
    model, arch, _ = load_model(gqa_ckpt, parallel_ctx)
    with pytest.raises(LoRAConfigError, match="unknown LoRA target"):
        apply_lora(model, LoRAConfig(rank=4, targets=["q_proj"]), parallel_ctx)
    for rank in (0, 10_000):
        m, _, _ = load_model(gqa_ckpt, parallel_ctx)
        with pytest.raises(ValueError, match="rank"):
            apply_lora(m, LoRAConfig(rank=rank), parallel_ctx)
    cfg = LoRAConfig(rank=4, targets=["linear_fc2"])
    apply_lora(model, cfg, parallel_ctx)
    save_adapters(tmp_path / "a.safetensors", model, arch, parallel_ctx, cfg)
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), tmp_path / "small")
    small, _, _ = load_model(tmp_path / "small", parallel_ctx)
    apply_lora(small, cfg, parallel_ctx)
    with pytest.raises(LoRAConfigError, match="another shape"):
        load_adapters(tmp_path / "a.safetensors", small, parallel_ctx)


def test_llm_neo_trains_only_adapters_and_helps(smollm2_ckpt, tmp_path):
    """Real SmolLM2 teacher -> half-depth student with LoRA (rank 32): only adapters change (base
    tensors bit-identical), the optimizer holds adapter state only, val loss and KL go down."""
    from nemo_neo.prune import drop_layers_checkpoint

    student = drop_layers_checkpoint(smollm2_ckpt, tmp_path / "student", range(15, 30))
    run = tmp_path / "run"
    torchrun("tests/workers/train_worker.py", 1, "--student", student, "--teacher", smollm2_ckpt, "--run-dir", run,
             "--data", SHARED_DATA / "wikitext2_valid.txt", "--steps", 10, "--save-every", 10, "--seq", 64,
             "--gbs", 4, "--mbs", 2, "--lr", 1e-3, "--max-valid", 12, "--lora-rank", 32, "--alpha", 0.5, timeout=900)
    result = json.loads((run / "result.json").read_text())
    assert result["final"]["val_loss"] < result["before"]["loss"]
    assert result["final"]["val_kl"] < result["before"]["kl"]
    assert 0 < result["trainable"]["trainable_percent"] < 10
    _, base, _ = load_full_state(student)
    _, trained, index = load_full_state(run / "checkpoints" / "step_0000010")
    adapters = [k for k in trained if ".lora_" in k]
    assert adapters and all(torch.equal(base[k], trained[k]) for k in base)  # every base tensor unchanged, bit for bit
    state = torch.load(run / "checkpoints" / "step_0000010" / "train_state" / "rank00000.pt", weights_only=False)
    n_state = sum(p.numel() for s in state["optimizer"]["state"].values() for p in s.values() if torch.is_tensor(p) and p.dim() > 0)
    n_adapters = sum(trained[k].numel() for k in adapters)
    assert n_state == 2 * n_adapters  # Adam's two moments, for adapters only
    _, merged, _ = load_full_state(run / "merged")
    assert not any(".lora_" in k for k in merged) and any(not torch.equal(base[k], merged[k]) for k in base)
    assert (run / "adapters.safetensors").stat().st_size < 0.2 * sum(t.numel() * 4 for t in base.values())
