"""The GPU (CUDA) paths, run for real; every test is skipped without CUDA, so CPU CI is unaffected.

Models are SmolLM2-135M-shaped (hidden 576, FFN 1536, 9 heads / 3 KV heads, vocab 49152, tied
embeddings) with random weights: the checks compare against independent references, not against
stored outputs, so no real weights are needed.

* process groups: `nemo_neo.parallel.initialize` picks NCCL and the CUDA device, the CPU
  compatibility layer stays off, megatron-core builds its weights on the GPU;
* forward parity: our megatron-core GPT in fp32 / bf16 vs transformers' LlamaForCausalLM in fp64
  (same weights) on the GPU;
* distillation losses on CUDA (chunked, fp32 and bf16 logits) vs the torch.nn.functional formulas
  of tests/distill/test_distill_losses.py in fp64;
* under `torchrun --nproc_per_node 1` (NCCL), this file run as a worker: one fp32 KD step whose loss
  and student gradients must equal transformers + the formula in fp64; bf16 KD training with
  checkpoint save / load / resume; LLM-Neo (KD into LoRA adapters) training;
* LoRA on CUDA vs a transformers model whose weights have the adapters added by hand;
* FP8 export with nvidia-modelopt on the GPU (skipped when modelopt is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)
sys.path.insert(0, str(REPO / "tests"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# SmolLM2-135M's shape; the student has half its layers.
SMOL = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=100000.0),
)
STUDENT_LAYERS = 15
# The KD step checked against transformers (ce_kl exercises CE, temperature, T^2 and alpha at once).
KD_EXACT_LOSS = dict(kind="ce_kl", temperature=2.0, alpha=0.3, t2_scaling=True)
KD_EXACT_BATCHES, KD_EXACT_SHAPE = 2, (2, 48)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double().to(actual.device)
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_hf(out: Path, seed: int, **overrides) -> Path:
    """A random HF Llama of SMOL's shape (+ overrides) saved to `out`, norms drawn around 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**SMOL, **overrides}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smol(module_tmp):
    """Random SmolLM2-shaped teacher (30 layers) and an independent random student (15 layers):
    HF directories and nemo_neo checkpoints."""
    from nemo_neo.checkpoint.convert import convert_hf_to_neo

    root = module_tmp("gpu_smol")
    paths = {"teacher_hf": make_hf(root / "teacher_hf", seed=0),
             "student_hf": make_hf(root / "student_hf", seed=1, num_hidden_layers=STUDENT_LAYERS)}
    for name in ("teacher", "student"):
        convert_hf_to_neo(paths[f"{name}_hf"], root / name)
        paths[name] = root / name
    return paths


def hf_model(path, dtype, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def release():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- in-process


def test_initialize_picks_nccl_and_cuda(parallel_ctx, smol):
    import torch.distributed as dist

    from nemo_neo._compat import cpu as cpu_compat
    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.models.arch import arch_from_hf_config
    from nemo_neo.models.gpt import transformer_config

    assert dist.get_backend() == "nccl"
    assert parallel_ctx.device == torch.device("cuda", torch.cuda.current_device())
    assert not cpu_compat.is_active()  # the CPU redirection is off when CUDA is there
    arch = arch_from_hf_config(json.loads((smol["student"] / "config.json").read_text()))
    assert transformer_config(arch).use_cpu_initialization is False
    model, _, _ = load_model(smol["student"], parallel_ctx)
    where = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert where == {"cuda"}, where
    del model
    release()


def test_forward_matches_transformers_fp32_and_bf16(parallel_ctx, smol):
    """Reference: transformers in fp64 on the GPU. fp32 must agree to rounding; bf16 as well as
    transformers' own bf16 does (within 2x its error)."""
    from nemo_neo.checkpoint.load import load_model

    device = parallel_ctx.device
    ids = torch.randint(0, SMOL["vocab_size"], (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = hf_model(smol["teacher_hf"], torch.float64, device)(ids).logits
        release()
        assert ref.shape == (2, 256, SMOL["vocab_size"]) and ref.abs().max() > 0.5
        errors = {}
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            ours, _, _ = load_model(smol["teacher"], parallel_ctx, dtype)
            ours.eval()
            out = ours(ids, position_ids=None, attention_mask=None)
            assert out.dtype == dtype and out.shape == ref.shape
            errors[f"ours_{name}"] = rel_err(out, ref)
            del ours, out
            hf = hf_model(smol["teacher_hf"], dtype, device)
            errors[f"hf_{name}"] = rel_err(hf(ids).logits, ref)
            del hf
            release()
    print("forward rel. errors vs fp64 transformers:", errors)
    assert errors["ours_fp32"] <= 1e-4, errors
    assert errors["ours_bf16"] <= max(2 * errors["hf_bf16"], 1e-3) and errors["ours_bf16"] < 0.05, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_distillation_losses_on_cuda_match_formula(parallel_ctx, dtype):
    """Every loss kind, chunked ("auto" makes several chunks here) on CUDA logits, vs the full-vocab
    functional formula in fp64 on the same (rounded) values."""
    from test_distill_losses import CASES, make_inputs, reference_results

    from nemo_neo.distill import KDLossConfig, distillation_loss

    device = parallel_ctx.device
    inputs = make_inputs(seed=3, dtype=dtype, batch=2, seq=300, vocab=SMOL["vocab_size"])
    inputs = {k: v.to(device) for k, v in inputs.items()}
    for case, kwargs in CASES.items():
        config = KDLossConfig(**kwargs)  # chunk_tokens="auto"
        upcast = {k: (v.double() if v.is_floating_point() and v.dim() == 3 else v) for k, v in inputs.items()}
        ref_sum, ref_count, ref_grad = reference_results(upcast, config)
        student = inputs["student"].clone().requires_grad_(True)
        out = distillation_loss(student, inputs["teacher"], config, labels=inputs["labels"], loss_mask=inputs["loss_mask"])
        (out.loss_sum / out.num_tokens).backward()
        assert out.loss_sum.device.type == device.type and student.grad.dtype == dtype
        assert out.num_tokens.item() == ref_count.item()
        assert rel_err(out.loss_sum, ref_sum) <= 1e-5, case
        assert rel_err(student.grad, ref_grad) <= (1e-5 if dtype == torch.float32 else 1e-2), case
        assert student.grad[inputs["loss_mask"] == 0].abs().max().item() == 0.0, case


def _qv_rows(arch) -> torch.Tensor:
    """Rows of q and v in megatron's grouped linear_qkv (written out here, independently of
    nemo_neo.peft.lora.qkv_part_rows)."""
    d, hpg = arch.head_dim, arch.heads_per_group
    per_group = (hpg + 2) * d
    rows = []
    for g in range(arch.num_query_groups):
        rows += list(range(g * per_group, g * per_group + hpg * d))  # q heads of group g
        rows += list(range(g * per_group + (hpg + 1) * d, (g + 1) * per_group))  # v of group g
    return torch.tensor(rows)


def test_lora_on_cuda_matches_transformers_with_adapters_added(parallel_ctx, smol, tmp_path):
    """MoSLoRA on q,v (scattered rows) + all other linears, fp32 on CUDA. Reference: transformers in
    fp64 with W + (alpha / r) B M A added to each adapted weight by hand."""
    from nemo_neo.checkpoint.convert import convert_neo_to_hf
    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.checkpoint.native import load_full_state, save_full_state
    from nemo_neo.peft import LoRAConfig, adapters_of, apply_lora, merge_lora

    device = parallel_ctx.device
    model, arch, _ = load_model(smol["student"], parallel_ctx)
    config = LoRAConfig(rank=8, alpha=16.0, mixer=True, qkv_parts=["q", "v"])
    adapters = apply_lora(model, config, parallel_ctx)
    assert len(adapters) == 4 * arch.num_layers
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in adapters.values():
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.05)
    assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {device.type}
    ids = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(6)).to(device)
    model.eval()
    adapted = model(ids, position_ids=None, attention_mask=None)

    _, state, _ = load_full_state(smol["student"])
    base_state = {k: v.clone() for k, v in state.items()}
    rows = _qv_rows(arch)
    scale = config.alpha / config.rank
    for name, lora in adapters.items():
        a, b, m = (t.detach().double().cpu() for t in (lora.lora_A, lora.lora_B, lora.lora_M))
        delta = scale * b @ m @ a
        weight = state[name + ".weight"].double()
        if name.endswith("linear_qkv"):
            weight[rows] += delta
        else:
            weight += delta
        state[name + ".weight"] = weight.float()
    save_full_state(tmp_path / "added", arch, state)
    save_full_state(tmp_path / "base", arch, base_state)
    for name in ("added", "base"):
        convert_neo_to_hf(tmp_path / name, tmp_path / f"{name}_hf")
    with torch.no_grad():
        ref = hf_model(tmp_path / "added_hf", torch.float64, device)(ids).logits
        base = hf_model(tmp_path / "base_hf", torch.float64, device)(ids).logits
    assert rel_err(adapted.detach(), ref) <= 1e-4
    assert rel_err(base, ref) > 1e-2  # the adapters change the output far beyond that tolerance

    # backward on CUDA: gradients reach every adapter and no base weight
    model.train()
    logits = model(ids, position_ids=None, attention_mask=None)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.eval()
    with torch.no_grad():
        assert merge_lora(model) == len(adapters) and not adapters_of(model)
        merged = model(ids, position_ids=None, attention_mask=None)
    assert rel_err(merged, adapted.detach()) <= 1e-5
    del model, adapted, logits, merged
    release()


# ------------------------------------------------------------------------------- torchrun (NCCL)


@pytest.fixture(scope="module")
def worker_result(smol, module_tmp):
    from conftest import torchrun

    out = module_tmp("gpu_worker")
    torchrun("tests/test_gpu.py", 1, "--student", smol["student"], "--teacher", smol["teacher"], "--out", out,
             timeout=900)
    return json.loads((out / "result.json").read_text()), out


def _phase(worker_result, name) -> dict:
    result, _ = worker_result
    phase = result[name]
    assert "error" not in phase, f"worker phase {name} failed:\n{phase.get('error')}"
    return phase


def test_worker_runs_on_nccl_and_cuda(worker_result):
    env = _phase(worker_result, "environment")
    assert env["backend"] == "nccl" and env["device"].startswith("cuda") and env["world_size"] == 1
    assert env["cpu_compat_active"] is False


def test_kd_step_matches_transformers_and_formula(worker_result, smol, parallel_ctx):
    """One fp32 KD step (2 micro-batches, masked tokens) through megatron's schedule and DDP on CUDA:
    the loss and every student gradient equal those of transformers models in fp64 + the formula."""
    from test_distill_losses import reference_loss

    from nemo_neo.checkpoint.hf_mapping import hf_to_neo
    from nemo_neo.checkpoint.native import read_index
    from nemo_neo.distill import KDLossConfig

    phase = _phase(worker_result, "kd_exact")
    _, out = worker_result
    saved = torch.load(out / "kd_exact.pt")
    device = parallel_ctx.device
    student, teacher = hf_model(smol["student_hf"], torch.float64, device), hf_model(smol["teacher_hf"], torch.float64, device)
    config = KDLossConfig(**KD_EXACT_LOSS)
    total, count = 0.0, 0.0
    sums = []
    for batch in saved["batches"]:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            t_logits = teacher(batch["input_ids"]).logits
        s_logits = student(batch["input_ids"]).logits
        loss_sum, num = reference_loss(s_logits, t_logits, batch["labels"], batch["loss_mask"], config)
        sums.append(loss_sum)
        count += num.item()
    total = torch.stack(sums).sum()
    (total / count).backward()
    assert phase["tokens"] == count
    assert abs(phase["loss"] - (total / count).item()) <= 1e-5 * abs(total.item() / count)
    arch, _ = read_index(smol["student"])
    ref_grads = hf_to_neo({n: p.grad for n, p in student.named_parameters()}, arch)
    ours = saved["grads"]
    assert sorted(ours) == sorted(ref_grads)
    worst = max(rel_err(ours[k], ref_grads[k]) for k in ours)
    assert worst <= 1e-4, worst
    assert all(ref_grads[k].abs().max() > 0 for k in ref_grads)
    del student, teacher
    release()


def test_bf16_kd_training_checkpoint_and_resume(worker_result):
    """bf16 KD training (30-layer teacher -> 15-layer student) on CUDA: the loss falls, the saved
    checkpoint equals the live weights, reloads to the same logits, and a run resumed from the
    middle checkpoint continues with the uninterrupted run's losses."""
    train = _phase(worker_result, "train")
    resume = _phase(worker_result, "resume")
    losses = [h["loss"] for h in train["history"]]
    assert len(losses) == train["steps"] and all(l == l and abs(l) < 1e4 for l in losses)  # finite
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert train["final"]["val_kl"] < train["before"]["kl"], (train["before"], train["final"])
    on_gpu = worker_result[0]["environment"]["device"].startswith("cuda")
    assert train["student_dtype"] == ("torch.bfloat16" if on_gpu else "torch.float32")  # nemo_neo's default
    assert train["optimizer_numel"] == train["student_numel"]  # the student's weights, no teacher weight
    assert train["peak_memory_gb"] > 0
    assert train["checkpoint_max_abs_diff"] == 0.0  # the checkpoint holds exactly the live weights
    assert train["reload_logits_rel_err"] <= 1e-3
    assert resume["resumed_from"] == train["save_every"]
    expected = {h["step"]: h["loss"] for h in train["history"] if h["step"] > train["save_every"]}
    got = {h["step"]: h["loss"] for h in resume["history"]}
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 2e-2 * abs(loss), (step, got[step], loss)


def test_llm_neo_lora_training_on_cuda(worker_result):
    lora = _phase(worker_result, "lora")
    losses = [h["loss"] for h in lora["history"]]
    assert len(losses) == 8 and all(l == l and abs(l) < 1e4 for l in losses), losses
    assert lora["final"]["val_kl"] < lora["before"]["kl"], (lora["before"], lora["final"])
    assert lora["optimizer_numel"] == lora["adapter_numel"] > 0  # only the adapters learn
    assert lora["base_weights_unchanged"]
    assert lora["lora_B_nonzero"]


# ------------------------------------------------------------------------------------- FP8 export


def _train_tokenizer(text: str, out: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None, reason="needs nvidia-modelopt")
def test_fp8_export_on_gpu(tmp_path):
    """modelopt FP8 PTQ + export of a small random Llama on the GPU: the unified checkpoint's format,
    E4M3 rounding bounds against the BF16 export, and logits close to the BF16 model's."""
    from nemo_neo.checkpoint.convert import convert_hf_to_neo
    from nemo_neo.data.text import default_corpus
    from nemo_neo.export.fp8 import export_bf16, export_fp8
    from nemo_neo.export.fp8_check import dequantized_model, fp8_weights, quant_config, read_state, rounding_bound

    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = default_corpus()[:200_000]
    (tmp_path / "calib.txt").write_text(text)
    tok = _train_tokenizer(text, tmp_path / "tok", vocab_size=1024)
    layers = 2
    hf = make_hf(tmp_path / "hf", seed=2, vocab_size=1024, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    convert_hf_to_neo(hf, tmp_path / "neo")
    report = export_fp8(tmp_path / "neo", tmp_path / "fp8", tmp_path / "calib.txt", calib_samples=8, calib_seq_len=64,
                        batch_size=4, kv_cache_fp8=True, tokenizer=tok, device=device)
    assert report["device"].startswith(device) and report["quant_algo"] == "FP8"
    assert report["kv_cache_quant_algo"] == "FP8" and report["calib_samples"] == 8
    export_bf16(tmp_path / "neo", tmp_path / "bf16", tokenizer=tok)
    quant = quant_config(tmp_path / "fp8")
    assert quant["quant_algo"] == "FP8" and "lm_head" in quant["exclude_modules"]
    state, reference = read_state(tmp_path / "fp8"), read_state(tmp_path / "bf16")
    quantized = fp8_weights(state)
    assert len(quantized) == layers * 7
    for name in quantized:
        w = reference[name].float()
        scale = state[name[: -len("weight")] + "weight_scale"].float()
        err = (state[name].float() * scale - w).abs()
        assert bool((err <= rounding_bound(w, scale)).all()), name
    ids = torch.randint(3, 1024, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = hf_model(tmp_path / "bf16", torch.float32, device)(ids).logits
        deq = dequantized_model(tmp_path / "fp8").to(device)(ids).logits
    assert 0 < rel_err(deq, ref) <= 0.1


# ----------------------------------------------------------------------------------------- worker


def _record(result: dict, name: str, fn, out: Path):
    try:
        result[name] = fn()
    except Exception:  # noqa: BLE001 -- each phase reports its own failure to the test
        result[name] = {"error": traceback.format_exc()}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))


def _kd_exact(ctx, args, out: Path) -> dict:
    from nemo_neo.checkpoint import sharding
    from nemo_neo.distill import KDLossConfig
    from nemo_neo.distill.objective import kd_loss_fn
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.schedule import run_microbatches, wrap_ddp

    pair, arch = build_pair(ctx, args.student, args.teacher, dtype=torch.float32)
    pair.config.calculate_per_token_loss = True
    ddp = wrap_ddp(pair)
    pair.train()
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(KD_EXACT_BATCHES):
        tokens = torch.randint(0, arch.vocab_size, (KD_EXACT_SHAPE[0], KD_EXACT_SHAPE[1] + 1), generator=g)
        mask = (torch.rand(*KD_EXACT_SHAPE, generator=g) > 0.2).float()
        batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask})
    reports = run_microbatches(ddp, [{k: v.to(ctx.device) for k, v in b.items()} for b in batches],
                               kd_loss_fn(KDLossConfig(**KD_EXACT_LOSS)), adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
    loss_sum = sum(r["loss_sum"].double().item() for r in reports)
    tokens = sum(r["tokens"].double().item() for r in reports)
    grads = {sharding.canonical_name(n): p.main_grad.detach().cpu().clone() for n, p in pair.student.named_parameters()
             if not (arch.tie_embeddings and n == "output_layer.weight")}
    torch.save({"batches": batches, "grads": grads}, out / "kd_exact.pt")
    assert all(p.grad is None for p in pair.teacher.parameters())
    return {"loss": loss_sum / tokens, "tokens": tokens, "grad_device": str(next(pair.student.parameters()).main_grad.device)}


def _optimizer_numel(optimizer) -> int:
    """Elements the optimizer updates. For bf16 megatron's optimizer holds fp32 master copies, not
    the model's parameters, so they are compared by size."""
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def _trainer(ctx, args, run_dir, steps, lora=False):
    from nemo_neo.distill import KDLossConfig
    from nemo_neo.distill.objective import distillation_metrics, kd_loss_fn
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import TrainConfig, Trainer
    from nemo_neo.train.optim import OptimConfig

    pair, arch = build_pair(ctx, args.student, args.teacher)  # bf16 on CUDA (default_dtype)
    if lora:
        from nemo_neo.peft import LoRAConfig, apply_lora

        apply_lora(pair.student, LoRAConfig(rank=16, alpha=32.0, qkv_parts=["q", "v"]), ctx)
    g = torch.Generator().manual_seed(11)
    rows = torch.randint(0, arch.vocab_size, (64, args.seq + 1), generator=g)
    valid = torch.randint(0, arch.vocab_size, (8, args.seq + 1), generator=g)
    cfg = TrainConfig(steps=steps, global_batch_size=8, micro_batch_size=4, save_every=args.save_every,
                      eval_every=steps, optim=OptimConfig(lr=5e-3 if lora else 5e-4, min_lr=1e-5, warmup_steps=1))

    def evaluate(_model):
        return distillation_metrics(pair, ctx, valid, 4)

    # forward KL only: on random tokens the CE term of LLM-Neo's alpha * CE + (1 - alpha) * KL cannot fall
    loss = KDLossConfig(kind="forward_kl")
    trainer = Trainer(ctx, pair, arch, kd_loss_fn(loss), rows, cfg, run_dir, "distill", evaluate=evaluate,
                      checkpoint_module=pair.student, adjust_tensor_shapes_fn=pair.pair_tensor_shapes)
    return pair, arch, trainer, evaluate


def _train(ctx, args, out: Path) -> dict:
    from nemo_neo.checkpoint.load import load_model
    from nemo_neo.checkpoint.native import gather_stage_tensors, load_full_state, local_tensors
    from nemo_neo.train.loop import peak_memory_bytes

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    pair, arch, trainer, evaluate = _trainer(ctx, args, out / "run", args.steps)
    before = evaluate(pair)
    result = trainer.fit()
    saved_ckpt = out / "run" / "checkpoints" / f"step_{args.steps:07d}"
    _, saved, _ = load_full_state(saved_ckpt)
    live = gather_stage_tensors(local_tensors(pair.student, arch), arch, ctx)
    diff = max((saved[k].float() - live[k].float()).abs().max().item() for k in live)
    assert sorted(saved) == sorted(live)
    reloaded, _, _ = load_model(saved_ckpt, ctx, next(pair.student.parameters()).dtype)
    ids = torch.randint(0, arch.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    pair.eval(), reloaded.eval()
    with torch.no_grad():
        a = pair.student(ids, position_ids=None, attention_mask=None)
        b = reloaded(ids, position_ids=None, attention_mask=None)
    return {"steps": args.steps, "save_every": args.save_every, "history": result["history"], "final": result["final"],
            "before": before, "student_dtype": str(next(pair.student.parameters()).dtype),
            "optimizer_numel": _optimizer_numel(trainer.optimizer),
            "student_numel": sum(p.numel() for p in pair.student.parameters()),
            "peak_memory_gb": peak_memory_bytes() / 2**30, "checkpoint_max_abs_diff": diff,
            "reload_logits_rel_err": rel_err(b, a)}


def _resume(ctx, args, out: Path) -> dict:
    src, dst = out / "run" / "checkpoints", out / "resumed" / "checkpoints"
    name = f"step_{args.save_every:07d}"
    dst.mkdir(parents=True)
    shutil.copytree(src / name, dst / name)
    (dst / "latest.json").write_text(json.dumps({"name": name, "step": args.save_every}) + "\n")
    _, _, trainer, _ = _trainer(ctx, args, out / "resumed", args.steps)
    result = trainer.fit()
    return {"resumed_from": result["resumed_from"], "history": result["history"]}


def _lora(ctx, args, out: Path) -> dict:
    from nemo_neo.checkpoint.native import load_full_state

    pair, arch, trainer, evaluate = _trainer(ctx, args, out / "lora", 8, lora=True)
    before = evaluate(pair)
    result = trainer.fit()
    adapters = sum(p.numel() for n, p in pair.student.named_parameters() if ".lora_" in n)
    _, original, _ = load_full_state(args.student)
    from nemo_neo.checkpoint import sharding

    base = {sharding.canonical_name(n): p for n, p in pair.student.named_parameters() if ".lora_" not in n}
    unchanged = all(torch.equal(p.detach().cpu(), original[n].to(p.dtype)) for n, p in base.items()
                    if not (arch.tie_embeddings and n == "output_layer.weight"))
    return {"history": result["history"], "before": before, "final": result["final"],
            "optimizer_numel": _optimizer_numel(trainer.optimizer), "adapter_numel": adapters,
            "base_weights_unchanged": unchanged,
            "lora_B_nonzero": all(p.abs().sum().item() > 0 for n, p in pair.student.named_parameters() if n.endswith("lora_B"))}


def worker_main(argv=None) -> None:
    """torchrun --nproc_per_node 1 tests/test_gpu.py --student S --teacher T --out O"""
    import torch.distributed as dist

    from nemo_neo._compat import cpu as cpu_compat
    from nemo_neo.parallel import destroy, initialize

    p = argparse.ArgumentParser()
    for name in ("--student", "--teacher", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args(argv)
    out = Path(args.out)
    ctx = initialize()
    result = {"environment": {"backend": dist.get_backend(), "device": str(ctx.device), "world_size": ctx.world_size,
                              "cpu_compat_active": cpu_compat.is_active(),
                              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    _record(result, "kd_exact", lambda: _kd_exact(ctx, args, out), out)
    _record(result, "train", lambda: _train(ctx, args, out), out)
    _record(result, "resume", lambda: _resume(ctx, args, out), out)
    _record(result, "lora", lambda: _lora(ctx, args, out), out)
    destroy()


if __name__ == "__main__":
    worker_main()
