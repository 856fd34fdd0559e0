"""KD under an interleaved (virtual) pipeline: PP=2 x VPP=2 (each rank holds two chunks of the student
and two of the teacher, both hidden states carried through megatron's interleaved schedule) gives the
loss and gradients of a single process, for plain KD and LLM-Neo (LoRA in every chunk), with a
teacher deeper (8 layers: 2 per chunk) and wider (96) than the tied student (4 layers, 64). The
Trainer at that layout follows the single-process run; its checkpoints are the any-layout format
(a VPP run's checkpoint is the PP=1 run's, a PP=1 checkpoint loads into the chunks) and it resumes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import torchrun

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.native import load_full_state, read_index

WORKER = "tests/workers/vpp_worker.py"
STEP3 = "train/checkpoints/step_0000003"


@pytest.fixture(scope="module")
def runs(hf_model_factory, module_tmp):
    tmp = module_tmp("vpp")
    convert_hf_to_neo(hf_model_factory("vpp_teacher"), tmp / "teacher")
    convert_hf_to_neo(hf_model_factory("vpp_student"), tmp / "student")
    ref, vpp = tmp / "ref", tmp / "vpp"
    ref.mkdir()
    vpp.mkdir()
    common = ("--student", tmp / "student", "--teacher", tmp / "teacher")
    torchrun(WORKER, 1, *common, "--out", ref)
    torchrun(WORKER, 2, *common, "--out", vpp, "--pp", 2, "--vpp", 2, "--resume", "--reload", ref / STEP3, timeout=400)
    return ref, vpp


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["kd", "neo"])
def test_vpp_loss_and_grads_match_single_process(runs, method):
    ref, vpp = (torch.load(d / f"{method}.pt") for d in runs)
    assert (ref["chunks"], vpp["chunks"]) == (1, 2)
    assert abs(vpp["loss"] - ref["loss"]) / ref["loss"] <= 1e-5
    assert sorted(vpp["grads"]) == sorted(ref["grads"])
    if method == "neo":  # only the adapters train, in every layer (chunks of both ranks)
        assert all(".lora_" in k for k in ref["grads"])
        assert {int(k.split(".")[2]) for k in ref["grads"]} == {0, 1, 2, 3}
    else:
        assert "embedding.word_embeddings.weight" in ref["grads"]  # tied: first chunk of rank 0, last of rank 1
    for k, g in ref["grads"].items():
        assert g.abs().max() > 0, k
        assert rel(vpp["grads"][k], g) <= 1e-5, k


def test_vpp_trainer_follows_single_process(runs):
    ref, vpp = (json.loads((d / "history.json").read_text()) for d in runs)
    assert len(ref["losses"]) == 3
    for key in ("losses", "grad_norms"):  # the norm (clipped at 0.5) is over both chunks of both ranks
        assert max(abs(a - b) / b for a, b in zip(vpp[key], ref[key])) <= 1e-5, key
    _, ref_w, _ = load_full_state(runs[0] / STEP3)
    _, vpp_w, index = load_full_state(runs[1] / STEP3)
    assert index["saved_with"]["pipeline_parallel"] == 2
    assert sorted(vpp_w) == sorted(ref_w)
    # 3 Adam steps: tiny gradient differences of near-zero components are amplified (~lr * sign)
    assert max(rel(vpp_w[k], w) for k, w in ref_w.items()) <= 1e-4
    _, start, _ = load_full_state(runs[0].parent / "student")
    assert max(rel(ref_w[k], w) for k, w in start.items()) > 1e-3  # it trained


def test_vpp_checkpoints_cross_load(runs, parallel_ctx):
    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.checkpoint.native import local_tensors

    ref, vpp = runs
    # the PP=1 checkpoint, loaded into the PP=2 x VPP=2 chunks and saved from them: the same tensors
    _, want, _ = load_full_state(ref / STEP3)
    _, got, _ = load_full_state(vpp / "reloaded")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the VPP run's checkpoint into a single-process model: every tensor where the layer numbers say
    model, arch, _ = load_model(vpp / STEP3, parallel_ctx)
    _, saved, _ = load_full_state(vpp / STEP3)
    live = local_tensors(model, arch)
    assert sorted(live) == sorted(saved) and all(torch.equal(live[k], saved[k]) for k in saved)
    assert arch == read_index(ref / STEP3)[0]


def test_vpp_resume_continues_exactly(runs):
    history = json.loads((runs[1] / "history.json").read_text())
    assert history["resumed_from"] == 2
    assert history["resumed_losses"] == history["losses"]
    _, whole, _ = load_full_state(runs[1] / STEP3)
    _, resumed, _ = load_full_state(runs[1] / "resumed" / "checkpoints" / "step_0000003")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
