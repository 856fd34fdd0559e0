"""The LR schedule against its closed form, LoRA's initialization against peft's, and an in-process
resume round trip (optimizer, schedule, data position, RNG, the `latest` pointer).

These pin what the end-to-end training tests only see through a loss curve: a schedule that warms
up from the wrong LR or decays linearly, an adapter that does not start at the base model, or a
resume that forgets one piece of state would otherwise pass them.
"""

import math

import pytest
import torch

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.load import load_model
from nemo_neo.data.dataset import DistributedBatchSampler
from nemo_neo.peft import LoRAConfig, apply_lora
from nemo_neo.train import state as ckpt_state
from nemo_neo.train.optim import OptimConfig, build_optimizer, current_lr
from nemo_neo.train.schedule import wrap_ddp


@pytest.fixture(scope="module")
def ckpt(hf_model_factory, module_tmp):
    path = module_tmp("ref_train") / "neo"
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), path)
    return path


def expected_lr(k: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from lr / (warmup + 1) to lr over `warmup` steps, then cosine to min_lr at `total`."""
    if k <= warmup:
        start = lr / (warmup + 1)
        return start + (lr - start) * k / warmup
    ratio = min(1.0, (k - warmup) / (total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("warmup,total", [(3, 12), (50, 6)], ids=["warmup3_of12", "warmup_capped"])
def test_lr_schedule_matches_closed_form(ckpt, parallel_ctx, warmup, total):
    model, _, _ = load_model(ckpt, parallel_ctx)
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    optimizer, scheduler = build_optimizer(wrap_ddp(model), cfg, total_steps=total)
    capped = min(warmup, total - 1)  # warm-up never takes the whole run: the last steps decay
    seen = []
    for _ in range(total + 1):
        seen.append(current_lr(optimizer))
        scheduler.step(1)
    want = [expected_lr(k, cfg.lr, cfg.min_lr, capped, total) for k in range(total + 1)]
    assert seen == pytest.approx(want, rel=1e-9)
    assert seen[0] > 0 and max(seen) == pytest.approx(cfg.lr) and seen[-1] == pytest.approx(cfg.min_lr)


def test_lora_init_matches_peft_and_starts_at_the_base_model(ckpt, parallel_ctx):
    """peft: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the adapted model
    starts as the base model, exactly."""
    model, arch, _ = load_model(ckpt, parallel_ctx)
    ids = torch.randint(0, arch.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, position_ids=None, attention_mask=None)
    adapters = apply_lora(model, LoRAConfig(rank=8, alpha=16, qkv_parts=["q", "v"]), parallel_ctx)
    with torch.no_grad():
        after = model(ids, position_ids=None, attention_mask=None)
    assert torch.equal(before, after)
    for name, lora in adapters.items():
        a = lora.lora_A.detach()
        bound = 1.0 / math.sqrt(a.shape[1])
        assert torch.count_nonzero(lora.lora_B) == 0, name
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound, name  # U(-b, b) fills its range
        assert abs(a.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), name  # not a narrower law


def _trainer(ckpt, ctx, rows):
    model, arch, _ = load_model(ckpt, ctx)
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer(ddp, OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2), total_steps=20)
    sampler = DistributedBatchSampler(len(rows), global_batch_size=4, micro_batch_size=2, seed=3)
    return model, arch, ddp, optimizer, scheduler, sampler


def _train_step(ddp, optimizer, scheduler, batches, rows):
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    for idx in batches:
        ids = rows[idx]
        logits = ddp(ids[:, :-1], position_ids=None, attention_mask=None)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + 1e-3 * torch.randn(()) * logits.mean()  # the RNG's state matters to the step
        loss.backward()
    optimizer.step()
    scheduler.step(1)


def test_resume_restores_every_piece_of_state(ckpt, parallel_ctx, tmp_path):
    rows = torch.randint(0, 130, (24, 9), generator=torch.Generator().manual_seed(1))
    model, arch, ddp, optimizer, scheduler, sampler = _trainer(ckpt, parallel_ctx, rows)
    batches = iter(sampler)
    for _ in range(3):
        _train_step(ddp, optimizer, scheduler, next(batches), rows)
    root = tmp_path / "checkpoints"
    saved = ckpt_state.save_training_checkpoint(root, 3, arch, model, parallel_ctx, optimizer, scheduler, sampler)
    assert ckpt_state.latest_checkpoint(root) == saved

    # a failed save must leave the pointer on the last complete checkpoint
    def boom(*args, **kwargs):
        raise OSError("disk full")

    real = ckpt_state.save_distributed
    ckpt_state.save_distributed = boom
    try:
        with pytest.raises(OSError, match="disk full"):
            ckpt_state.save_training_checkpoint(root, 4, arch, model, parallel_ctx, optimizer, scheduler, sampler)
    finally:
        ckpt_state.save_distributed = real
    assert ckpt_state.latest_checkpoint(root) == saved

    rng_at_save = torch.get_rng_state()  # captured here, independently of the library's rng_state()

    # a fresh trainer (step 0, RNG elsewhere) resumes; it must take exactly the original's next steps
    model2, arch2, ddp2, optimizer2, scheduler2, sampler2 = _trainer(ckpt, parallel_ctx, rows)
    torch.manual_seed(1234)
    step = ckpt_state.load_training_checkpoint(saved, arch2, model2, parallel_ctx, optimizer2, scheduler2, sampler2)
    assert step == 3
    assert current_lr(optimizer2) == current_lr(optimizer) and scheduler2.num_steps == scheduler.num_steps
    batches2 = iter(sampler2)
    resumed = [next(batches2) for _ in range(2)]
    for b in resumed:
        _train_step(ddp2, optimizer2, scheduler2, b, rows)
    torch.set_rng_state(rng_at_save)
    for b2 in resumed:
        b1 = next(batches)
        assert all(torch.equal(x, y) for x, y in zip(b1, b2))  # the same data order
        _train_step(ddp, optimizer, scheduler, b1, rows)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
