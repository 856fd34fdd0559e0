"""TP=2, PP=2 and TP=2 x PP=2 (torchrun, gloo, CPU) against a single-process run, and loading a
checkpoint saved at one layout at another."""

import pytest
import torch
from conftest import torchrun

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.native import load_full_state, read_index

WORKER = "tests/workers/parity_worker.py"
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def run(ckpt, out, tp, pp, save=None):
    out.mkdir(parents=True, exist_ok=True)
    args = ["--ckpt", ckpt, "--out", out, "--tp", tp, "--pp", pp] + (["--save", save] if save else [])
    torchrun(WORKER, tp * pp, *args)
    return torch.load(out / "outputs.pt"), torch.load(out / "grads.pt")


def compare(ref, got):
    (ref_out, ref_grads), (out, grads) = ref, got
    assert (out["logits"] - ref_out["logits"]).abs().max().item() <= 1e-5
    assert torch.allclose(out["loss"], ref_out["loss"], rtol=1e-6, atol=0)
    assert sorted(grads) == sorted(ref_grads)
    for k in ref_grads:
        scale = ref_grads[k].abs().max().item()
        assert scale > 0, f"{k}: zero reference gradient"
        assert (grads[k] - ref_grads[k]).abs().max().item() <= 1e-5 * max(1.0, scale), k


@pytest.fixture(scope="module", params=["llama3_gqa_untied", "mistral_explicit_head_dim"])
def model_case(request, hf_model_factory, module_tmp):
    """(checkpoint, reference outputs from one process) for a tied and an untied model."""
    tmp = module_tmp(request.param)
    ckpt = tmp / "neo"
    convert_hf_to_neo(hf_model_factory(request.param), ckpt)
    return ckpt, tmp, run(ckpt, tmp / "ref", 1, 1)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_layout_matches_single_process(model_case, tp, pp):
    ckpt, tmp, ref = model_case
    save = tmp / f"saved_tp{tp}pp{pp}"
    compare(ref, run(ckpt, tmp / f"tp{tp}pp{pp}", tp, pp, save=save))
    # the checkpoint written from this layout holds exactly the original tensors
    _, original, _ = load_full_state(ckpt)
    _, saved, _ = load_full_state(save)
    assert sorted(original) == sorted(saved) and all(torch.equal(original[k], saved[k]) for k in original)
    assert read_index(save)[1]["saved_with"] == {"tensor_parallel": tp, "pipeline_parallel": pp}


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(model_case):
    ckpt, tmp, ref = model_case
    saved = tmp / "saved_tp2pp1"
    if not saved.exists():
        run(ckpt, tmp / "tp2_for_save", 2, 1, save=saved)
    compare(ref, run(saved, tmp / "from_tp2_at_tp1", 1, 1))
    compare(ref, run(saved, tmp / "from_tp2_at_pp2", 1, 2))
