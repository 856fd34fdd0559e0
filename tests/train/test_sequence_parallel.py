"""Sequence parallelism (megatron's SP with TP): the same logits, gradients and losses as without it, for KD
(student and teacher under SP, the loss on the last pipeline stage) and for LLM-Neo (MoSLoRA
adapters on every linear under SP), at TP=2 x PP=2 over gloo."""

from __future__ import annotations

import json

import pytest
from conftest import torchrun

from nemo_neo.checkpoint.convert import convert_hf_to_neo

WORKER = "tests/workers/sp_worker.py"


@pytest.fixture(scope="module")
def sp_run(hf_model_factory, module_tmp):
    tmp = module_tmp("sp")
    # untied teacher (4 layers, GQA 4:1), tied student (2 layers): both split over TP=2 and PP=2
    teacher, student = tmp / "teacher", tmp / "student"
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), teacher)
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), student)
    torchrun(WORKER, 4, "--student", student, "--teacher", teacher, "--out", tmp / "out", "--tp", 2, "--pp", 2,
             timeout=600)
    return json.loads((tmp / "out" / "result.json").read_text())


@pytest.mark.parametrize("method", ["kd", "llm_neo"])
def test_sequence_parallel_equals_plain_tensor_parallel(sp_run, method):
    r = sp_run[method]
    assert r["grads_nonzero"] and r["same_keys"]
    # student and teacher logits on the last stage's 2 TP ranks, 2 micro-batches each
    assert r["logits_compared"] == 4 and r["logits_rel"] <= 1e-6
    # every trainable parameter's DDP-finalized gradient (SP's partial norm / adapter grads all-reduced)
    assert r["grad_rel"] <= 1e-5, r["worst_grad"]
    assert max(abs(a - b) / abs(b) for a, b in zip(r["losses_sp"], r["losses_plain"])) <= 1e-5
    assert len(r["losses_sp"]) == 3
    # after 3 Adam steps: Adam's first updates are ~lr * sign(grad), so the 1e-7 gradient differences
    # of near-zero components show up amplified; a missing SP all-reduce would be O(1) here
    assert r["weights_rel"] <= 1e-3
    marked = r["sp_marked"]  # the parameters that see 1/TP of the tokens under SP
    assert "decoder.final_layernorm.weight" in marked and any("input_layernorm" in m for m in marked)
    if method == "llm_neo":
        assert any(m.endswith("linear_qkv.lora_A") for m in marked)  # column-parallel: A, M
        assert any(m.endswith("linear_fc2.lora_B") for m in marked)  # row-parallel: B, M
        assert not any(m.endswith("linear_fc2.lora_A") for m in marked)  # split by input: complete already
