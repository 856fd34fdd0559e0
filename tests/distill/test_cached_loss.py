"""The sparse (top-K + tail) loss that distillation from a teacher cache uses, against independent
full-vocab torch formulas: at K = V it is the full forward KL, at K < V the KL of the (K + 1)-outcome
distributions computed from live teacher logits -- in one process and on TP=2 vocab shards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import torchrun
from test_distill_losses import VOCAB, make_inputs, reference_results, rel_err

from nemo_neo.distill import KDLossConfig
from nemo_neo.distill.cached import cached_distillation_loss
from nemo_neo.distill.sparse_kl import TopKTargets, teacher_topk_targets

CASES = {  # name: (K, loss kwargs)
    "full_vocab_forward_kl": (VOCAB, dict(kind="forward_kl", temperature=1.5)),
    "full_vocab_ce_kl": (VOCAB, dict(kind="ce_kl", alpha=0.3, temperature=2.0, t2_scaling=True)),
    "top5_forward_kl": (5, dict(kind="forward_kl", temperature=1.5)),
    "top25_ce_kl": (25, dict(kind="ce_kl", alpha=0.6, temperature=2.0, t2_scaling=True)),  # K > a TP=2 shard
}


def cached_targets(teacher: torch.Tensor, k: int, temperature: float) -> TopKTargets:
    """What a cache holds for these teacher logits (full precision here: the formula is under test)."""
    flat = teacher.reshape(-1, teacher.shape[-1]).clone()
    t = teacher_topk_targets(flat, k, temperature, None)
    return TopKTargets(t.ids.view(*teacher.shape[:-1], k), t.log_probs.view(*teacher.shape[:-1], k),
                       t.log_tail.view(teacher.shape[:-1]))


def reference(inputs, k, kwargs):
    """Full forward KL (K = V) or the top-k + tail KL from full-vocab distributions (test_distill_losses)."""
    config = KDLossConfig(**kwargs, top_k=None if k == VOCAB else k)
    return reference_results(inputs, config)


def test_targets_are_the_teachers_full_vocab_log_probs_and_tail():
    teacher = make_inputs()["teacher"]
    t = cached_targets(teacher, 5, 1.5)
    log_p = F.log_softmax(teacher / 1.5, dim=-1)
    assert torch.equal(t.ids, teacher.topk(5, dim=-1).indices)
    assert torch.allclose(t.log_probs, log_p.gather(-1, t.ids), atol=1e-12)
    tail = log_p.exp().sum(-1) - log_p.exp().gather(-1, t.ids).sum(-1)
    assert torch.allclose(t.log_tail.exp(), tail, rtol=1e-9)
    assert torch.isneginf(cached_targets(teacher, VOCAB, 1.5).log_tail).all()  # K = V: no tail


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("case", list(CASES))
def test_cached_loss_matches_the_full_vocab_formula(case, chunk):
    k, kwargs = CASES[case]
    inputs = make_inputs()
    ref_sum, ref_count, ref_grad = reference(inputs, k, kwargs)
    student = inputs["student"].clone().requires_grad_(True)
    out = cached_distillation_loss(student, cached_targets(inputs["teacher"], k, kwargs["temperature"]),
                                   KDLossConfig(**kwargs, chunk_tokens=chunk), labels=inputs["labels"],
                                   loss_mask=inputs["loss_mask"])
    (out.loss_sum / out.num_tokens).backward()
    assert out.num_tokens.item() == ref_count.item()
    assert rel_err(out.loss_sum, ref_sum) <= 1e-6
    assert rel_err(student.grad, ref_grad) <= 1e-6


def test_fewer_than_the_cached_k_folds_the_rest_into_the_tail():
    inputs = make_inputs()
    targets = cached_targets(inputs["teacher"], 12, 1.5)
    ref_sum, _, ref_grad = reference(inputs, 5, dict(kind="forward_kl", temperature=1.5))
    student = inputs["student"].clone().requires_grad_(True)
    out = cached_distillation_loss(student, targets, KDLossConfig(temperature=1.5, top_k=5), loss_mask=inputs["loss_mask"])
    (out.loss_sum / out.num_tokens).backward()
    assert rel_err(out.loss_sum, ref_sum) <= 1e-6 and rel_err(student.grad, ref_grad) <= 1e-6


def test_tp2_cached_loss_matches_the_single_process_formula(tmp_path):
    inputs = make_inputs()
    names = ("full_vocab_ce_kl", "top25_ce_kl")
    cases = {n: {"kwargs": CASES[n][1], "targets": tuple(cached_targets(inputs["teacher"], CASES[n][0],
                                                                        CASES[n][1]["temperature"]))} for n in names}
    torch.save({"student": inputs["student"], "labels": inputs["labels"], "loss_mask": inputs["loss_mask"],
                "cases": {}, "chunks": [], "cached_cases": cases}, tmp_path / "in.pt")
    torchrun("tests/workers/loss_worker.py", 2, "--inputs", tmp_path / "in.pt", "--out", tmp_path / "out.pt")
    results = torch.load(tmp_path / "out.pt")
    for name in names:
        ref_sum, _, ref_grad = reference(inputs, *CASES[name])
        assert rel_err(results[name]["loss_sum"], ref_sum) <= 1e-6, name
        assert rel_err(results[name]["grad"], ref_grad) <= 1e-6, name
