"""Distillation losses vs. direct full-vocab torch.nn.functional formulas, under chunking and TP=2.

Exactness tests use float64 logits (the loss computes in fp64 when given fp64), so "relative error
<= 1e-5" has ample margin and any real bug (a wrong sign, a missing temperature factor, a mask
leak, a wrong shard offset) shows up as O(1) error. A separate bf16 test checks the production
path (fp32 compute per chunk, bf16 gradient) with bf16-appropriate tolerances.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nemo_neo.distill import KDLossConfig, distillation_loss, global_token_mean

WORKER = REPO / "tests" / "workers" / "loss_worker.py"

BATCH, SEQ, VOCAB = 3, 10, 38  # 30 tokens; VOCAB even so that TP=2 shards are 19 wide
CHUNKS = [None, 7]  # None = one chunk; 7 < 30 tokens and does not divide 30
REL_TOL = 1e-5

CASES = {
    "forward_kl": dict(kind="forward_kl"),
    "forward_kl_T2_t2": dict(kind="forward_kl", temperature=2.0, t2_scaling=True),
    "reverse_kl": dict(kind="reverse_kl", temperature=1.5),
    "jsd": dict(kind="jsd", temperature=2.0, jsd_beta=0.3),
    "ce_kl": dict(kind="ce_kl", alpha=0.3, temperature=2.0),
    "ce_kl_t2": dict(kind="ce_kl", alpha=0.3, temperature=2.0, t2_scaling=True),
    "forward_kl_topk": dict(kind="forward_kl", top_k=5, temperature=1.5),
    # top_k larger than a TP=2 shard (19): the global top-k needs candidates from both ranks.
    "ce_kl_topk": dict(kind="ce_kl", alpha=0.6, temperature=2.0, t2_scaling=True, top_k=25),
    "forward_kl_topk_renormalised": dict(kind="forward_kl", top_k=5, temperature=1.5, top_k_tail=False),
    "ce_kl_topk_renormalised": dict(kind="ce_kl", alpha=0.6, temperature=2.0, top_k=25, top_k_tail=False),
}


def make_inputs(seed: int = 0, dtype=torch.float64, batch=BATCH, seq=SEQ, vocab=VOCAB) -> dict:
    """Correlated student/teacher logits, labels with some -100, and a mask with prompt/padding."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    student = 0.6 * teacher + 1.5 * torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 2] = labels[batch // 2, seq - 3] = labels[-1, 0] = -100
    loss_mask = torch.ones(batch, seq)
    loss_mask[0, :3] = 0.0  # a "prompt"
    loss_mask[-1, -4:] = 0.0  # "padding"
    loss_mask[batch // 2, seq // 2] = 0.0
    return {
        "student": student.to(dtype),
        "teacher": teacher.to(dtype),
        "labels": labels,
        "loss_mask": loss_mask,
    }


def topk_reference(log_q, teacher, config: KDLossConfig):
    """Top-k forward KL from full-vocab distributions: with the tail, the KL of the (k + 1)-outcome
    distributions (top-k ids, everything else); without it, the teacher renormalised over its top-k."""
    top_ids = teacher.topk(config.top_k, dim=-1).indices
    if not config.top_k_tail:
        log_p_top = F.log_softmax(teacher.gather(-1, top_ids) / config.temperature, dim=-1)
        return F.kl_div(log_q.gather(-1, top_ids), log_p_top, reduction="none", log_target=True).sum(-1)
    p = F.softmax(teacher / config.temperature, dim=-1)
    q = log_q.exp()
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(-1, top_ids, False)
    p_k = torch.cat([p.gather(-1, top_ids), (p * outside).sum(-1, keepdim=True)], dim=-1)
    q_k = torch.cat([q.gather(-1, top_ids), (q * outside).sum(-1, keepdim=True)], dim=-1)
    return (p_k * (p_k.log() - q_k.log())).sum(-1)


def reference_loss(student, teacher, labels, loss_mask, config: KDLossConfig):
    """(loss_sum, num_tokens) written directly with torch.nn.functional on full-vocab logits."""
    temperature = config.temperature
    log_q = F.log_softmax(student / temperature, dim=-1)
    if config.kind in ("forward_kl", "ce_kl"):
        if config.top_k is None:
            log_p = F.log_softmax(teacher / temperature, dim=-1)
            divergence = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
        else:
            divergence = topk_reference(log_q, teacher, config)
    elif config.kind == "reverse_kl":
        log_p = F.log_softmax(teacher / temperature, dim=-1)
        divergence = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        beta = config.jsd_beta
        log_p = F.log_softmax(teacher / temperature, dim=-1)
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        divergence = (
            beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
        )
    if config.t2_scaling:
        divergence = divergence * temperature**2
    weight = loss_mask.to(student.dtype)
    if config.kind == "ce_kl":
        ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        per_token = config.alpha * ce.view_as(divergence) + (1 - config.alpha) * divergence
        weight = weight * (labels != -100).to(student.dtype)
    else:
        per_token = divergence
    return (per_token * weight).sum(), weight.sum()


def reference_results(inputs, config):
    student = inputs["student"].clone().requires_grad_(True)
    loss_sum, num_tokens = reference_loss(student, inputs["teacher"], inputs["labels"], inputs["loss_mask"], config)
    (loss_sum / num_tokens).backward()
    return loss_sum.detach(), num_tokens, student.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", list(CASES))
def test_single_process_matches_functional_formula(case, chunk):
    inputs = make_inputs()
    config = KDLossConfig(**CASES[case], chunk_tokens=chunk)
    ref_sum, ref_count, ref_grad = reference_results(inputs, config)

    student = inputs["student"].clone().requires_grad_(True)
    out = distillation_loss(
        student, inputs["teacher"], config, labels=inputs["labels"], loss_mask=inputs["loss_mask"]
    )
    (out.loss_sum / out.num_tokens).backward()

    assert out.num_tokens.item() == ref_count.item()
    assert rel_err(out.loss_sum, ref_sum) <= REL_TOL
    assert rel_err(student.grad, ref_grad) <= REL_TOL
    # Masked tokens get exactly zero gradient.
    masked = inputs["loss_mask"] == 0
    assert student.grad[masked].abs().max().item() == 0.0


def test_bf16_inputs_use_fp32_compute_and_bf16_gradient():
    inputs = make_inputs(dtype=torch.bfloat16)
    config = KDLossConfig(kind="ce_kl", alpha=0.5, temperature=2.0, t2_scaling=True, chunk_tokens=7)
    upcast = {k: (v.double() if v.is_floating_point() and v.dim() == 3 else v) for k, v in inputs.items()}
    ref_sum, _, ref_grad = reference_results(upcast, config)
    student = inputs["student"].clone().requires_grad_(True)
    out = distillation_loss(student, inputs["teacher"], config, labels=inputs["labels"], loss_mask=inputs["loss_mask"])
    (out.loss_sum / out.num_tokens).backward()
    assert out.loss_sum.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert rel_err(out.loss_sum, ref_sum) <= REL_TOL  # fp32 math on exactly the bf16 values
    assert rel_err(student.grad, ref_grad) <= 1e-2  # the gradient is rounded to bf16


# ---------------------------------------------------------------------------------------------
# TP = 2 through torchrun
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp2_results(module_tmp):
    tmp = module_tmp("tp2_loss")
    inputs = make_inputs(seed=1)
    torch.save({**inputs, "cases": CASES, "chunks": CHUNKS}, tmp / "inputs.pt")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(WORKER), "--inputs", str(tmp / "inputs.pt"), "--out", str(tmp / "out.pt"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return inputs, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_full_vocab_formula(tp2_results, case, chunk):
    inputs, results = tp2_results
    got = results[f"{case}|{chunk}"]
    ref_sum, ref_count, ref_grad = reference_results(inputs, KDLossConfig(**CASES[case]))
    assert got["num_tokens"].item() == ref_count.item()
    assert rel_err(got["loss_sum"], ref_sum) <= REL_TOL
    # Every TP rank holds the same (replicated) loss value.
    for per_rank in got["loss_sum_per_rank"]:
        assert rel_err(per_rank, ref_sum) <= REL_TOL
    assert got["grad"].shape == ref_grad.shape
    assert rel_err(got["grad"], ref_grad) <= REL_TOL


def test_tp2_global_token_mean(tp2_results):
    """Rank r contributes sum 3 (r + 1) over r + 2 tokens; value = global mean, grad = W / count."""
    _, results = tp2_results
    got = results["global_token_mean"]
    world = got["mean"].numel()
    sums = [3.0 * (r + 1) for r in range(world)]
    counts = [float(r + 2) for r in range(world)]
    expected_mean = sum(sums) / sum(counts)
    assert torch.allclose(got["mean"], torch.full_like(got["mean"], expected_mean), rtol=1e-12)
    # d loss_sum / dx = 3 on every rank; averaging these grads over ranks gives d(global mean)/dx.
    expected_grad = world * 3.0 / sum(counts)
    assert torch.allclose(got["grad"], torch.full_like(got["grad"], expected_grad), rtol=1e-12)


def test_global_token_mean_single_process_and_micro_batches():
    """Summing (sum, count) over micro-batches and dividing once = mean over all valid tokens."""
    inputs = make_inputs()
    config = KDLossConfig(kind="forward_kl", chunk_tokens=4)
    whole = distillation_loss(inputs["student"], inputs["teacher"], config, loss_mask=inputs["loss_mask"])
    parts = [
        distillation_loss(inputs["student"][rows], inputs["teacher"][rows], config, loss_mask=inputs["loss_mask"][rows])
        for rows in (slice(0, 1), slice(1, 3))
    ]
    total_sum = sum(p.loss_sum for p in parts)
    total_count = sum(p.num_tokens for p in parts)
    mean = global_token_mean(total_sum, total_count)
    assert rel_err(mean, whole.loss_sum / whole.num_tokens) <= 1e-12
    zero = global_token_mean(torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    assert zero.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Memory: the largest fp32 temporary scales with chunk_tokens, not with the number of tokens
# ---------------------------------------------------------------------------------------------


class AllocationRecorder(TorchDispatchMode):
    """Records (dtype, elements) of every fresh storage an aten op produces (views excluded)."""

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors_in}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((t.dtype, t.untyped_storage().nbytes() // t.element_size()))
        return out

    def largest(self, dtype) -> int:
        return max((n for d, n in self.allocations if d == dtype), default=0)


def measure(config: KDLossConfig, seq: int, vocab: int = 96, batch: int = 2):
    """Run forward + backward on bf16 logits; return (largest fp32 allocation, saved tensors, grad)."""
    inputs = make_inputs(seed=2, dtype=torch.bfloat16, batch=batch, seq=seq, vocab=vocab)
    student = inputs["student"].clone().requires_grad_(True)
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    recorder = AllocationRecorder()
    with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = distillation_loss(
            student, inputs["teacher"], config, labels=inputs["labels"], loss_mask=inputs["loss_mask"]
        )
        (out.loss_sum / out.num_tokens).backward()
    return recorder.largest(torch.float32), saved, student


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="forward_kl"), dict(kind="reverse_kl"), dict(kind="jsd"),
     dict(kind="ce_kl", temperature=2.0), dict(kind="ce_kl", top_k=8)],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_chunked_memory_scales_with_chunk_not_sequence(kwargs):
    vocab, chunk, batch = 96, 8, 2
    bound = chunk * vocab  # one fp32 [chunk_tokens x vocab_shard] temporary
    for seq in (32, 128):
        tokens = batch * seq
        largest, saved, student = measure(KDLossConfig(**kwargs, chunk_tokens=chunk), seq, vocab, batch)
        assert student.grad is not None and torch.isfinite(student.grad.float()).all()
        assert 0 < largest <= bound, (seq, largest, bound)
        # The only big tensor kept for backward is the gradient buffer, in the student's dtype.
        big_saved = [(d, n) for d, n in saved if n > bound]
        assert big_saved == [(torch.bfloat16, tokens * vocab)], big_saved

        unchunked_largest, _, _ = measure(KDLossConfig(**kwargs, chunk_tokens=None), seq, vocab, batch)
        assert unchunked_largest >= tokens * vocab > bound


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_vocab_mismatch_names_both_sizes_and_the_fix():
    student = torch.randn(2, 4, 10)
    teacher = torch.randn(2, 4, 12)
    with pytest.raises(ValueError, match=r"student 10, teacher 12.*tokenizer"):
        distillation_loss(student, teacher, KDLossConfig())


def test_config_and_usage_errors():
    with pytest.raises(ValueError, match="unknown distillation loss kind"):
        KDLossConfig(kind="mse")
    with pytest.raises(ValueError, match="top_k is only defined"):
        KDLossConfig(kind="jsd", top_k=4)
    with pytest.raises(ValueError, match="needs labels"):
        distillation_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), KDLossConfig(kind="ce_kl"))
    with pytest.raises(ValueError, match="exceeds the vocab size"):
        distillation_loss(torch.randn(1, 3, 5), torch.randn(1, 3, 5), KDLossConfig(top_k=6))
    student = torch.randn(1, 3, 5, requires_grad=True)
    out = distillation_loss(student, torch.randn(1, 3, 5), KDLossConfig())
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss_sum.backward()
