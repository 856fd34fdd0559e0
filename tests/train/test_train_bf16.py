"""bf16 parameters with fp32 main params and grads through megatron-core's optimizer, on CPU."""

import torch


def _kd_run(ctx, pair_dir, run_dir, dtype, steps, lora=False):
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.distill.objective import distillation_metrics, kd_loss_fn
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import TrainConfig, Trainer
    from nemo_neo.train.optim import OptimConfig

    pair, arch = build_pair(ctx, pair_dir / "student", pair_dir / "teacher", dtype=dtype)
    if lora:
        from nemo_neo.peft import LoRAConfig, apply_lora

        apply_lora(pair.student, LoRAConfig(rank=4, alpha=8.0), ctx)
    rows = torch.randint(0, arch.vocab_size, (40, 17), generator=torch.Generator().manual_seed(0))

    def evaluate(_model):
        return distillation_metrics(pair, ctx, rows[32:], 4, None)

    before = evaluate(pair)
    cfg = TrainConfig(steps=steps, global_batch_size=4, micro_batch_size=2, save_every=100, eval_every=steps,
                      optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1))
    trainer = Trainer(ctx, pair, arch, kd_loss_fn(KDLossConfig()), rows[:32], cfg, run_dir, "distill",
                      evaluate=evaluate, checkpoint_module=pair.student)
    return trainer, before, trainer.fit(), pair


def test_bf16_kd_step_matches_fp32_and_lowers_validation_kl(tiny_pair, tmp_path, parallel_ctx):
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    _, _, fp32, _ = _kd_run(parallel_ctx, tiny_pair, tmp_path / "fp32", torch.float32, steps=1)
    trainer, before, bf16, pair = _kd_run(parallel_ctx, tiny_pair, tmp_path / "bf16", torch.bfloat16, steps=6)
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    assert all(isinstance(o, Float16OptimizerWithFloat16Params) for o in inner)
    # the model is bf16 (the local spec's torch RMSNorm keeps fp32 weights, which the optimizer steps
    # as they are); the optimizer steps fp32 main copies of the bf16 ones
    bf16_params = [p for n, p in pair.student.named_parameters() if "layernorm" not in n]
    assert all(p.dtype == torch.bfloat16 for p in bf16_params)
    mains = [p for o in inner for g in o.fp32_from_float16_groups for p in g]
    assert len(mains) == len(bf16_params) and all(p.dtype == torch.float32 for p in mains)
    # first step, same checkpoint: equal to bf16 precision (8 mantissa bits)
    a, b = bf16["history"][0]["loss"], fp32["history"][0]["loss"]
    assert abs(a - b) / abs(b) < 2**-7, (a, b)
    assert bf16["final"]["val_kl"] < 0.8 * before["kl"], (before, bf16["final"])


def test_bf16_lora_adapters_train_with_fp32_main_params(tiny_pair, tmp_path, parallel_ctx):
    trainer, before, result, pair = _kd_run(parallel_ctx, tiny_pair, tmp_path / "lora", torch.bfloat16, steps=3, lora=True)
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    mains = [p for o in inner for g in o.fp32_from_float16_groups for p in g]
    adapters = [p for n, p in pair.student.named_parameters() if ".lora_" in n]
    assert adapters and len(mains) == len(adapters) and all(p.dtype == torch.float32 for p in mains)
    assert result["final"]["val_kl"] < before["kl"], (before, result["final"])
