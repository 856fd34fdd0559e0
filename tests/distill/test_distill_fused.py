"""The fused LM-head KD loss equals the unfused loss on materialized logits: every loss kind, chunked,
single process and TP=2, tied and untied heads, fp32/fp64 and bf16; in a DistillationPair at PP=2
and TP=2 (megatron schedule + DDP), and over a whole Trainer step (updated weights).

The reference is always the existing unfused path: logits = hidden @ weight.T through autograd, then
`distillation_loss` (itself checked against torch.nn.functional formulas in test_distill_losses.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model, torchrun
from test_distill_losses import CASES, AllocationRecorder, rel_err

from nemo_neo.distill import KDLossConfig, distillation_loss
from nemo_neo.distill.fused import HeadInputs, fused_distillation_loss
from nemo_neo.distill.objective import kd_loss_fn

WORKER = "tests/workers/fused_worker.py"
BATCH, SEQ, VOCAB, H_STUDENT, H_TEACHER = 3, 10, 38, 12, 20  # VOCAB even: TP=2 shards of 19
CHUNKS = [None, 7]
REL_TOL = 1e-5


def make_head_inputs(seed=0, dtype=torch.float64, batch=BATCH, seq=SEQ, vocab=VOCAB) -> dict:
    """Hidden states and weights whose logits are correlated like a student's and its teacher's."""
    g = torch.Generator().manual_seed(seed)
    t_hidden = torch.randn(batch, seq, H_TEACHER, generator=g, dtype=torch.float64)
    t_weight = torch.randn(vocab, H_TEACHER, generator=g, dtype=torch.float64) * 0.6
    proj = torch.randn(H_TEACHER, H_STUDENT, generator=g, dtype=torch.float64) / H_TEACHER**0.5
    s_hidden = t_hidden @ proj + 0.5 * torch.randn(batch, seq, H_STUDENT, generator=g, dtype=torch.float64)
    s_weight = t_weight @ proj + 0.3 * torch.randn(vocab, H_STUDENT, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 2] = labels[-1, 0] = -100
    loss_mask = torch.ones(batch, seq)
    loss_mask[0, :3] = 0.0
    loss_mask[-1, -4:] = 0.0
    cast = lambda t: t.to(dtype)  # noqa: E731
    return {"student_hidden": cast(s_hidden), "student_weight": cast(s_weight), "teacher_hidden": cast(t_hidden),
            "teacher_weight": cast(t_weight), "labels": labels, "loss_mask": loss_mask}


def run_unfused(inputs, config, tied=False):
    """(loss_sum, d hidden, d weight) of hidden @ W.T -> distillation_loss; tied: W is also an embedding."""
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    weight = inputs["student_weight"].clone().requires_grad_(True)
    teacher = inputs["teacher_hidden"] @ inputs["teacher_weight"].t()
    out = distillation_loss(hidden @ weight.t(), teacher, config, labels=inputs["labels"], loss_mask=inputs["loss_mask"])
    loss = out.loss_sum / out.num_tokens + (_embedding_term(weight) if tied else 0.0)
    loss.backward()
    return out.loss_sum.detach(), hidden.grad, weight.grad


def run_fused(inputs, config, tied=False):
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    weight = inputs["student_weight"].clone().requires_grad_(True)
    t_hidden = inputs["teacher_hidden"].clone().requires_grad_(True)  # must stay untouched
    teacher = HeadInputs(t_hidden, inputs["teacher_weight"])
    out = fused_distillation_loss(HeadInputs(hidden, weight), teacher, config, labels=inputs["labels"],
                                  loss_mask=inputs["loss_mask"])
    loss = out.loss_sum / out.num_tokens + (_embedding_term(weight) if tied else 0.0)
    loss.backward()
    assert t_hidden.grad is None
    return out.loss_sum.detach(), hidden.grad, weight.grad


def _embedding_term(weight):
    """A tied weight is also the input embedding: its lookup adds to the same gradient."""
    return (weight[torch.tensor([1, 4, 4, 30])] ** 2).sum().to(torch.float64) * 1e-2


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_unfused(case, chunk, dtype, tied):
    inputs = make_head_inputs(dtype=dtype)
    config = KDLossConfig(**CASES[case], chunk_tokens=chunk)
    ref = run_unfused(inputs, config, tied)
    got = run_fused(inputs, KDLossConfig(**CASES[case], chunk_tokens=chunk, fused=True), tied)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, ref):
        assert a.dtype == b.dtype and rel_err(a, b) <= REL_TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("case", ["forward_kl", "ce_kl_t2", "jsd", "ce_kl_topk"])
def test_bf16_fused_is_as_accurate_as_unfused(case):
    """bf16 weights/hidden: both paths round the logits and d hidden's logit gradient to bf16, so
    they differ by bf16 rounding (~2^-8 relative) and neither is "the" answer. The claim tested:
    the fused result is within 2e-2 of the unfused one and no farther from the fp64 truth on the
    same bf16 values than the unfused one (+ a rounding allowance); d weight is closer (fp32 accumulation)."""
    inputs = make_head_inputs(dtype=torch.bfloat16)
    config = KDLossConfig(**CASES[case], chunk_tokens=7)
    truth = run_unfused({k: (v.double() if v.is_floating_point() and v.dim() > 1 else v) for k, v in inputs.items()}, config)
    ref = run_unfused(inputs, config)
    got = run_fused(inputs, config)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for name, a, b, t in zip(("loss", "d hidden", "d weight"), got, ref, truth):
        assert rel_err(a, b) <= 2e-2, (name, rel_err(a, b))
        assert rel_err(a, t) <= rel_err(b, t) * 1.25 + 2e-3, (name, rel_err(a, t), rel_err(b, t))


def megatron_weight(tensor, before):
    """A weight as megatron DDP hands it over: fp32 (fp64) `main_grad` holding `before`, and the flag."""
    weight = tensor.clone().requires_grad_(True)
    weight.main_grad = before.to(torch.promote_types(tensor.dtype, torch.float32)).clone()
    weight.grad_added_to_main_grad = False
    return weight


@pytest.mark.parametrize("scale", ["sum", "mean"], ids=["grad_output_1", "grad_output_1_over_n"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", ["forward_kl", "ce_kl_t2", "jsd"])
def test_weight_gradient_into_megatron_main_grad(case, tied, scale):
    """With megatron's main_grad, d W goes into it during forward (grad_output 1, the schedule's) and
    no weight-sized gradient is returned; any other grad_output is corrected exactly in backward.
    A tied weight's other use (the embedding) still arrives through .grad, for DDP's hook to add."""
    inputs = make_head_inputs(seed=2)
    config = KDLossConfig(**CASES[case], chunk_tokens=7)
    hidden_ref = inputs["student_hidden"].clone().requires_grad_(True)
    weight_ref = inputs["student_weight"].clone().requires_grad_(True)
    teacher = HeadInputs(inputs["teacher_hidden"], inputs["teacher_weight"])
    before = torch.randn(inputs["student_weight"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    weight = megatron_weight(inputs["student_weight"], before)
    losses = []
    for h, w in ((hidden_ref, weight_ref), (hidden, weight)):
        out = fused_distillation_loss(HeadInputs(h, w), teacher, config, labels=inputs["labels"], loss_mask=inputs["loss_mask"])
        loss = out.loss_sum if scale == "sum" else out.loss_sum / out.num_tokens
        losses.append(loss + (_embedding_term(w) if tied else 0.0))
    assert rel_err(weight.main_grad - before, torch.zeros_like(before)) > 0.1  # d W arrived in forward
    for loss in losses:
        loss.backward()
    assert (weight.grad is not None) == tied  # only the embedding term's gradient goes through .grad
    got = weight.main_grad - before + (weight.grad if tied else 0.0)
    assert rel_err(got, weight_ref.grad) <= REL_TOL, rel_err(got, weight_ref.grad)
    assert rel_err(hidden.grad, hidden_ref.grad) <= REL_TOL


def test_bf16_main_grad_is_the_fp32_accumulation():
    """bf16 weight, fp32 main_grad: main_grad gets the fp32 sum that the plain path rounds to bf16 once."""
    inputs = make_head_inputs(dtype=torch.bfloat16)
    config = KDLossConfig(**CASES["ce_kl_t2"], chunk_tokens=7)
    teacher = HeadInputs(inputs["teacher_hidden"], inputs["teacher_weight"])
    plain = inputs["student_weight"].clone().requires_grad_(True)
    weight = megatron_weight(inputs["student_weight"], torch.zeros(plain.shape))
    for w in (plain, weight):
        out = fused_distillation_loss(HeadInputs(inputs["student_hidden"], w), teacher, config, labels=inputs["labels"])
        out.loss_sum.backward()
    assert weight.grad is None and weight.main_grad.dtype == torch.float32
    assert torch.equal(weight.main_grad.bfloat16(), plain.grad)


def test_frozen_head_weight_gets_no_gradient():
    """LoRA students (LLM-Neo, KD-LoRA) freeze the output layer: only d hidden is computed, as unfused."""
    inputs = make_head_inputs(seed=4)
    config = KDLossConfig(**CASES["ce_kl_t2"], chunk_tokens=7)
    ref_hidden = run_unfused(inputs, config)[1]
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    weight = inputs["student_weight"].clone()
    out = fused_distillation_loss(HeadInputs(hidden, weight), HeadInputs(inputs["teacher_hidden"], inputs["teacher_weight"]),
                                  config, labels=inputs["labels"], loss_mask=inputs["loss_mask"])
    (out.loss_sum / out.num_tokens).backward()
    assert weight.grad is None and rel_err(hidden.grad, ref_hidden) <= REL_TOL


def test_an_output_layer_with_more_than_a_weight_is_refused():
    """LoRA cannot target the output layer (peft.apply.TARGETS); if one ever did, or the head had a
    bias, the fused path would drop that term: it refuses such a layer by name."""
    from nemo_neo.distill.fused import hidden_states_head
    from nemo_neo.errors import ConfigError
    from nemo_neo.peft.apply import TARGETS

    assert "output_layer" not in TARGETS
    model = torch.nn.Module()
    model.output_layer = torch.nn.Linear(4, 6, bias=False)
    model.output_layer.lora_A = torch.nn.Parameter(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match=r"also has \['lora_A'\].*fused=false"):
        with hidden_states_head(model):
            pass
    model.output_layer = torch.nn.Linear(4, 6, bias=True)
    with pytest.raises(ConfigError, match=r"also has \['bias'\]"):
        with hidden_states_head(model):
            pass


def test_no_logit_sized_tensor_exists():
    """bf16, 256 tokens x vocab 96: nothing of [tokens, vocab] size is ever allocated or saved."""
    tokens, vocab, chunk = 256, 96, 8
    inputs = make_head_inputs(seed=3, dtype=torch.bfloat16, batch=2, seq=tokens // 2, vocab=vocab)
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    weight = inputs["student_weight"].clone().requires_grad_(True)
    saved = []
    recorder = AllocationRecorder()
    config = KDLossConfig(kind="ce_kl", alpha=0.5, temperature=2.0, chunk_tokens=chunk)
    with recorder, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fused_distillation_loss(HeadInputs(hidden, weight), HeadInputs(inputs["teacher_hidden"], inputs["teacher_weight"]),
                                      config, labels=inputs["labels"], loss_mask=inputs["loss_mask"])
        (out.loss_sum / out.num_tokens).backward()
    bound = max(chunk * vocab, vocab * H_TEACHER, tokens * H_TEACHER)  # a chunk, a weight, a hidden state
    assert bound < tokens * vocab
    largest = max(n for _, n in recorder.allocations)
    assert 0 < largest <= bound, (largest, bound)
    assert max(saved) <= bound and torch.isfinite(hidden.grad.float()).all()


def test_errors_name_the_problem():
    inputs = make_head_inputs()
    student = HeadInputs(inputs["student_hidden"], inputs["student_weight"])
    with pytest.raises(ValueError, match="different vocab sizes: student 38, teacher 30"):
        fused_distillation_loss(student, HeadInputs(inputs["teacher_hidden"], inputs["teacher_weight"][:30]), KDLossConfig())
    with pytest.raises(ValueError, match="does not match its output weight"):
        fused_distillation_loss(HeadInputs(inputs["student_hidden"], inputs["teacher_weight"]), None, KDLossConfig())
    with pytest.raises(ValueError, match="teacher's hidden states and weight are needed"):
        fused_distillation_loss(student, None, KDLossConfig())
    logits = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="build the DistillationPair with fused=True"):
        kd_loss_fn(KDLossConfig(fused=True))((logits, logits), {"labels": None})
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    out = fused_distillation_loss(HeadInputs(hidden, inputs["student_weight"]), None, KDLossConfig(kind="ce_kl", alpha=1.0),
                                  labels=inputs["labels"])
    out.loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss_sum.backward()


# ---------------------------------------------------------------------------------------------
# TP = 2 (tensors) and DistillationPair at PP = 2 / TP = 2, through torchrun
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(hf_model_factory, module_tmp):
    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    tmp = module_tmp("fused")
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), tmp / "teacher")  # untied, 4 layers
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), tmp / "tied")  # tied, 2 layers
    # untied student: the teacher's architecture with other random weights
    convert_hf_to_neo(make_hf_model("llama3_gqa_untied", tmp / "hf_untied", seed=1), tmp / "untied")
    return tmp


@pytest.fixture(scope="module")
def tp2_run(ckpts):
    out = ckpts / "tp2"
    out.mkdir()
    inputs = make_head_inputs(seed=1)
    torch.save({**inputs, "cases": CASES, "chunks": CHUNKS}, out / "inputs.pt")
    torchrun(WORKER, 2, "--out", out, "--tp", 2, "--tensors", out / "inputs.pt", "--teacher", ckpts / "teacher",
             "--pair", f"tied={ckpts / 'tied'}", f"untied={ckpts / 'untied'}")
    return inputs, torch.load(out / "tensors.pt"), torch.load(out / "pair.pt")


@pytest.mark.parametrize("chunk", CHUNKS, ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_fused_equals_single_process_unfused(tp2_run, case, chunk):
    inputs, results, _ = tp2_run
    got = results[f"{case}|{chunk}"]
    ref_sum, ref_hidden, ref_weight = run_unfused(inputs, KDLossConfig(**CASES[case]))
    assert rel_err(got["loss_sum"], ref_sum) <= REL_TOL
    for per_rank in got["loss_sum_per_rank"]:
        assert rel_err(per_rank, ref_sum) <= REL_TOL
    assert rel_err(got["grad_hidden"], ref_hidden) <= REL_TOL  # the all-reduced full gradient
    assert rel_err(got["grad_weight"], ref_weight) <= REL_TOL


def assert_pair_fused_equals_unfused(results):
    assert results, "no pair results"
    for key in [k for k in results if k.endswith("|False")]:
        off, on = results[key], results[key.replace("|False", "|True")]
        assert off["teacher_grads"] is None and on["teacher_grads"] is None, key  # teacher untouched
        assert rel_err(on["loss"], off["loss"]) <= REL_TOL, key
        assert sorted(on["grads"]) == sorted(off["grads"]), key
        for name, ref in off["grads"].items():
            assert ref.abs().max() > 0, (key, name)
            assert rel_err(on["grads"][name], ref) <= REL_TOL, (key, name, rel_err(on["grads"][name], ref))


def test_tp2_pair_fused_equals_unfused(tp2_run):
    results = dict(tp2_run[2])
    assert not results.pop("sequence_parallel")
    assert_pair_fused_equals_unfused(results)


def test_tp2_sequence_parallel_fused_equals_unfused_and_tp1(ckpts):
    """TP=2 with sequence parallelism: the head's input is all-gathered from the sequence shards and
    its gradient split back; fused == unfused SP, and both == TP=1 (loss, every student gradient)."""
    runs = {}
    for name, nproc, flags in (("sp", 2, ["--tp", 2, "--sp"]), ("tp1", 1, ["--tp", 1])):
        out = ckpts / name
        out.mkdir()
        torchrun(WORKER, nproc, "--out", out, *flags, "--teacher", ckpts / "teacher",
                 "--pair", f"tied={ckpts / 'tied'}", f"untied={ckpts / 'untied'}")
        runs[name] = torch.load(out / "pair.pt")
    sp, tp1 = runs["sp"], runs["tp1"]
    assert sp.pop("sequence_parallel") and not tp1.pop("sequence_parallel")
    assert_pair_fused_equals_unfused(sp)
    for key, ref in tp1.items():  # "name|kind|fused": both SP runs against the TP=1 unfused run
        ref = tp1[key.replace("|True", "|False")]
        assert rel_err(sp[key]["loss"], ref["loss"]) <= REL_TOL, key
        assert sorted(sp[key]["grads"]) == sorted(ref["grads"]), key
        for name, grad in ref["grads"].items():
            assert rel_err(sp[key]["grads"][name], grad) <= REL_TOL, (key, name, rel_err(sp[key]["grads"][name], grad))


def test_pp2_last_stage_fused_equals_unfused(ckpts):
    """PP=2: the last stage's head; tied embeddings reach the first stage's embedding through
    megatron's embedding-gradient all-reduce."""
    out = ckpts / "pp2"
    out.mkdir()
    torchrun(WORKER, 2, "--out", out, "--pp", 2, "--teacher", ckpts / "teacher",
             "--pair", f"tied={ckpts / 'tied'}", f"untied={ckpts / 'untied'}")
    results = torch.load(out / "pair.pt")
    results.pop("sequence_parallel")
    assert "embedding.word_embeddings.weight" in results["tied|forward_kl|True"]["grads"]
    assert_pair_fused_equals_unfused(results)


# ---------------------------------------------------------------------------------------------
# A whole training step (megatron optimizer) with fused on == off
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("correction", [False, True], ids=["kd", "kd_with_teacher_correction"])
def test_training_steps_fused_equal_unfused(ckpts, parallel_ctx, tmp_path, correction, monkeypatch):
    """Two Trainer steps (AdamW, clipping) of KD with the tied student, ce_kl: same losses and the
    same updated weights; with teacher correction in parallel the teacher's updates agree too.
    Under the Trainer (megatron DDP), d W goes into main_grad in forward and is never recomputed."""
    from nemo_neo.distill import fused as fused_module
    from nemo_neo.distill.objective import kd_with_correction_loss_fn
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import TrainConfig, Trainer
    from nemo_neo.train.optim import OptimConfig

    rows = torch.randint(0, 130, (4, 13), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=2, global_batch_size=4, micro_batch_size=2, save_every=100, eval_every=100,
                      optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0))
    passes, head_pass = [], fused_module._head_pass
    monkeypatch.setattr(fused_module, "_head_pass", lambda *a, **kw: passes.append(kw) or head_pass(*a, **kw))
    runs = {}
    for fused in (False, True):
        pair, arch = build_pair(parallel_ctx, ckpts / "tied", ckpts / "teacher", train_teacher=correction)
        pair.fused = fused
        config = KDLossConfig(kind="ce_kl", alpha=0.3, temperature=2.0, chunk_tokens=7, fused=fused)
        before = {n: p.detach().clone() for n, p in pair.named_parameters()}
        loss_fn = kd_with_correction_loss_fn(config) if correction else kd_loss_fn(config)
        extra = dict(lr_overrides={"*teacher.*": (1e-3, 1e-4)}) if correction else {}
        trainer = Trainer(parallel_ctx, pair, arch, loss_fn, rows, cfg, tmp_path / f"fused_{fused}", name="distill",
                          checkpoint_module=pair.student, **extra)
        history = trainer.fit()["history"]
        runs[fused] = history, {n: p.detach().clone() - before[n] for n, p in pair.named_parameters()}
    (off_hist, off_delta), (on_hist, on_delta) = runs[False], runs[True]
    buffers = {p.main_grad.data_ptr() for p in pair.parameters() if hasattr(p, "main_grad")}  # the fused run's
    assert passes and all("weight_scale" not in kw for kw in passes)  # no backward recompute
    assert all(kw["grad_weight"].data_ptr() in buffers for kw in passes)  # d W went into DDP's main_grad
    for off, on in zip(off_hist, on_hist):
        assert on["loss"] == pytest.approx(off["loss"], rel=REL_TOL)
        if correction:
            assert on["teacher_loss"] == pytest.approx(off["teacher_loss"], rel=REL_TOL)
    moved = [n for n, d in off_delta.items() if d.abs().max() > 0]
    assert any(n.startswith("student.") for n in moved)
    assert any(n.startswith("teacher.") for n in moved) == correction
    for name in off_delta:
        assert rel_err(on_delta[name], off_delta[name]) <= 1e-4, (name, rel_err(on_delta[name], off_delta[name]))
