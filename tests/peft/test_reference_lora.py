"""LoRA and MoSLoRA pinned to independent references on the same weights, forward and backward.

* LoRA vs peft: the transformers model the checkpoint was converted from, with peft adapters on
  the per-projection modules that our fused adapters cover. A fused adapter (one A for q/k/v or for
  gate/up) is the same function as per-projection adapters with A copied and B split by rows, so
  logits must agree, the gradient of our shared A must be the sum of peft's per-projection A
  gradients, and our B gradient must be peft's B gradients in our row order.
* MoSLoRA vs W + (alpha / r) B M A built by hand on the transformers model (torch.func).
* Export: adapters written by `save_adapters` -> peft format -> `PeftModel.from_pretrained` on the
  HF export of the base checkpoint gives the same logits.
The row bookkeeping here is derived independently of the library: the fused-qkv row of each q/k/v
row comes from `split_qkv` applied to row numbers.
"""

import pytest
import torch

from nemo_neo.checkpoint.convert import convert_hf_to_neo, convert_neo_to_hf
from nemo_neo.checkpoint.hf_mapping import split_qkv
from nemo_neo.checkpoint.load import load_model
from nemo_neo.export.peft_adapters import PeftExportError, export_peft_adapters
from nemo_neo.peft import LoRAConfig, apply_lora, save_adapters

RANK, ALPHA = 4, 12.0
ALL = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
HF_OF = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "linear_proj": ("self_attn", ("o_proj",)),
         "linear_fc1": ("mlp", ("gate_proj", "up_proj")), "linear_fc2": ("mlp", ("down_proj",))}


@pytest.fixture(scope="module")
def base(hf_model_factory, module_tmp):
    """GQA (8 heads, 2 groups), head_dim 10, untied head: q/k/v rows interleave by group."""
    hf_dir = hf_model_factory("llama3_gqa_untied")
    ckpt = module_tmp("ref_lora") / "neo"
    convert_hf_to_neo(hf_dir, ckpt)
    return hf_dir, ckpt


def _adapted_neo(ckpt, ctx, cfg: LoRAConfig, seed=0):
    model, arch, _ = load_model(ckpt, ctx)
    adapters = apply_lora(model, cfg, ctx)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would make every comparison trivial
        for lora in adapters.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.2)
    return model, arch, adapters


def _projection_rows(arch, parts) -> dict[str, torch.Tensor]:
    """{HF projection: positions of its rows inside our (subset) qkv B}, derived from split_qkv."""
    n = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    fused = dict(zip("qkv", split_qkv(torch.arange(n), arch)))  # fused row of every q/k/v row
    covered = torch.cat([fused[p] for p in parts]).sort().values  # B's rows: fused order, covered parts
    where = {int(r): i for i, r in enumerate(covered)}
    return {f"{p}_proj": torch.tensor([where[int(r)] for r in fused[p]]) for p in parts}


def _b_parts(name: str, b: torch.Tensor, arch, parts) -> dict[str, torch.Tensor]:
    """Our B of module `name` -> {HF projection: its B} (differentiable indexing)."""
    if name == "linear_qkv":
        return {proj: b[rows] for proj, rows in _projection_rows(arch, parts).items()}
    if name == "linear_fc1":
        f = b.shape[0] // 2
        return {"gate_proj": b[:f], "up_proj": b[f:]}
    return {HF_OF[name][1][0]: b}


def _lm_weights(shape, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _neo_forward_backward(model, adapters, ids, weights):
    logits = model(ids, position_ids=None, attention_mask=None)
    (logits * weights).sum().backward()
    grads = {n: {k: getattr(lora, f"lora_{k}").grad.clone() for k in ("A", "B", "M") if getattr(lora, f"lora_{k}") is not None}
             for n, lora in adapters.items()}
    return logits.detach(), grads


def _split_name(name: str):
    parts = name.split(".")  # decoder.layers.<i>.<parent>.<module>
    return int(parts[2]), parts[-1]


@pytest.mark.parametrize("targets,parts", [(ALL, "qkv"), (ALL, "qv"), (("linear_fc1",), "qkv")],
                         ids=["all", "q_v_on_fused_qkv", "swiglu_only"])
def test_lora_matches_peft_forward_and_backward(base, parallel_ctx, targets, parts):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = base
    cfg = LoRAConfig(rank=RANK, alpha=ALPHA, targets=list(targets), qkv_parts=list(parts))
    model, arch, adapters = _adapted_neo(ckpt, parallel_ctx, cfg)
    hf_targets = sorted({p for t in targets for p in HF_OF[t][1] if t != "linear_qkv" or p[0] in parts})
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=hf_targets))
    layers = peft_model.base_model.model.model.layers
    with torch.no_grad():  # our adapters -> peft's: A copied to every projection, B split by rows
        for name, lora in adapters.items():
            i, module = _split_name(name)
            parent, _ = HF_OF[module]
            for proj, b in _b_parts(module, lora.lora_B, arch, parts).items():
                layer = getattr(getattr(layers[i], parent), proj)
                layer.lora_A["default"].weight.copy_(lora.lora_A)
                layer.lora_B["default"].weight.copy_(b)
    ids = torch.randint(0, arch.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    weights = _lm_weights((2, 9, arch.vocab_size))
    logits, grads = _neo_forward_backward(model, adapters, ids, weights)
    ref = peft_model(ids).logits
    (ref * weights).sum().backward()
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(ids).logits
    assert (ref - plain).abs().max() > 0.05  # the adapters matter, so a wrong scale shows
    assert (logits - ref.detach()).abs().max().item() <= 1e-5 * ref.abs().max().item()
    for name, lora in adapters.items():
        i, module = _split_name(name)
        parent, _ = HF_OF[module]
        projs = {p: getattr(getattr(layers[i], parent), p) for p in _b_parts(module, lora.lora_B, arch, parts)}
        want_a = sum(m.lora_A["default"].weight.grad for m in projs.values())  # shared A: gradients add
        got_b = _b_parts(module, grads[name]["B"], arch, parts)
        for t, (got, want) in {"A": (grads[name]["A"], want_a),
                               **{f"B.{p}": (got_b[p], m.lora_B["default"].weight.grad) for p, m in projs.items()}}.items():
            assert want.abs().max() > 0, (name, t)
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), (name, t)


def test_moslora_matches_hand_built_delta(base, parallel_ctx):
    """MoSLoRA: every target weight becomes W + (alpha / r) B M A, A and M shared by fused parts."""
    from torch.func import functional_call
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt = base
    parts = "qv"
    cfg = LoRAConfig(rank=RANK, alpha=ALPHA, mixer=True, qkv_parts=list(parts))
    model, arch, adapters = _adapted_neo(ckpt, parallel_ctx, cfg)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    leaves = {n: {k: getattr(lora, f"lora_{k}").detach().clone().requires_grad_() for k in "ABM"} for n, lora in adapters.items()}
    params = dict(hf.named_parameters())
    for name, t in leaves.items():
        i, module = _split_name(name)
        parent, _ = HF_OF[module]
        for proj, b in _b_parts(module, t["B"], arch, parts).items():
            key = f"model.layers.{i}.{parent}.{proj}.weight"
            params[key] = params[key].detach() + (ALPHA / RANK) * b @ t["M"] @ t["A"]
    ids = torch.randint(0, arch.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    weights = _lm_weights((2, 9, arch.vocab_size), seed=6)
    logits, grads = _neo_forward_backward(model, adapters, ids, weights)
    ref = functional_call(hf, params, (ids,)).logits
    (ref * weights).sum().backward()
    assert (logits - ref.detach()).abs().max().item() <= 1e-5 * ref.abs().max().item()
    for name, t in leaves.items():
        for k in "ABM":
            want = t[k].grad
            assert want.abs().max() > 0, (name, k)
            assert (grads[name][k] - want).abs().max().item() <= 1e-4 * want.abs().max().item(), (name, k)


@pytest.mark.parametrize("mixer,parts", [(False, "qv"), (True, "qkv")], ids=["lora_q_v", "moslora_all"])
def test_exported_adapters_load_in_peft_with_same_logits(base, parallel_ctx, tmp_path, mixer, parts):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, ckpt = base
    cfg = LoRAConfig(rank=RANK, alpha=ALPHA, mixer=mixer, qkv_parts=list(parts))
    model, arch, adapters = _adapted_neo(ckpt, parallel_ctx, cfg, seed=3)
    save_adapters(tmp_path / "adapters.safetensors", model, arch, parallel_ctx, cfg)
    convert_neo_to_hf(ckpt, tmp_path / "hf")  # the HF export of the base model
    report = export_peft_adapters(tmp_path / "adapters.safetensors", ckpt, tmp_path / "peft")
    assert {p.name for p in (tmp_path / "peft").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    assert ("k_proj" in report["target_modules"]) == ("k" in parts) and report["mixer_folded"] == mixer
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, arch.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = hf(ids).logits
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft")
        ref = peft_model(ids).logits
        ours = model(ids, position_ids=None, attention_mask=None)
    assert (ref - plain).abs().max() > 0.05  # peft really applied the adapters
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_export_errors_name_the_problem(base, tmp_path):
    _, ckpt = base
    with pytest.raises(PeftExportError, match="does not exist"):
        export_peft_adapters(tmp_path / "missing.safetensors", ckpt, tmp_path / "out")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PeftExportError, match="not written by nemo_neo"):
        export_peft_adapters(tmp_path / "other.safetensors", ckpt, tmp_path / "out")
