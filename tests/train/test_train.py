"""The training loop on real and tiny models: distillation helps, resume after SIGKILL is bitwise,
a non-finite loss stops the run and keeps the last good checkpoint."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, free_port, kill_tree, torchrun

from nemo_neo.checkpoint.native import load_full_state
from nemo_neo.prune import drop_layers_checkpoint

WORKER = "tests/workers/train_worker.py"


def test_distilling_real_teacher_into_half_depth_student(smollm2_ckpt, tmp_path):
    """SmolLM2-135M teacher -> student = teacher minus its last 15 layers, on WikiText-2."""
    student = drop_layers_checkpoint(smollm2_ckpt, tmp_path / "student", range(15, 30))
    run_dir = tmp_path / "run"
    torchrun(WORKER, 1, "--student", student, "--teacher", smollm2_ckpt, "--run-dir", run_dir,
             "--data", SHARED_DATA / "wikitext2_valid.txt", "--steps", 12, "--save-every", 12, "--seq", 64,
             "--gbs", 4, "--mbs", 2, "--lr", 1e-4, "--max-valid", 12, timeout=900)
    result = json.loads((run_dir / "result.json").read_text())
    before, after = result["before"], result["final"]
    assert after["val_kl"] < 0.8 * before["kl"], (before, after)
    assert after["val_loss"] < 0.8 * before["loss"], (before, after)
    losses = [h["loss"] for h in result["history"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    # the distilled student is a normal checkpoint: only the student was written, 15 layers
    arch, state, index = load_full_state(run_dir / "checkpoints" / "step_0000012")
    assert arch.num_layers == 15 and index["metadata"]["step"] == 12
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())


def tiny_args(tmp, run_dir):
    return ["--student", tmp / "student", "--teacher", tmp / "teacher", "--run-dir", run_dir,
            "--data", tmp / "corpus.txt", "--steps", 60, "--save-every", 5, "--seq", 16, "--gbs", 4, "--mbs", 1,
            "--distributed-optimizer"]


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_pair, tmp_path):
    """A DP=2 run with the distributed optimizer (each rank holds half of the Adam state) is killed with
    SIGKILL after a checkpoint; the same command resumes, and its history (every step, on every rank)
    equals the uninterrupted run's bit for bit, as do the final weights."""
    full = tmp_path / "full"
    torchrun(WORKER, 2, *tiny_args(tiny_pair, full))
    reference = json.loads((full / "result.json").read_text())["history"]
    assert len(reference) == 60

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / WORKER), *map(str, tiny_args(tiny_pair, killed))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.05)
    kill_tree(proc)  # the agent and both ranks (own sessions), mid-run
    assert latest.is_file(), "the run never wrote a checkpoint"
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads(latest.read_text())["step"]
    assert 5 <= killed_at < 60

    torchrun(WORKER, 2, *tiny_args(tiny_pair, killed))
    resumed = json.loads((killed / "result.json").read_text())
    assert resumed["resumed_from"] == killed_at
    # the whole curve: steps up to the checkpoint read back from the killed run's log, the rest retrained
    after = {h["step"]: h["loss"] for h in resumed["history"]}
    expected = {h["step"]: h["loss"] for h in reference}
    assert after == expected  # exact float equality: bitwise on CPU
    _, a, _ = load_full_state(full / "checkpoints" / "step_0000060")
    _, b, _ = load_full_state(killed / "checkpoints" / "step_0000060")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(killed / "checkpoints" / "step_0000060" / "train_state" / "rank00001.pt", weights_only=False)
    assert state["optimizer_shards"], "rank 1's own shard of the distributed optimizer's state"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_pair, tmp_path, parallel_ctx):
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.distill.objective import kd_loss_fn
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import NonFiniteLossError, TrainConfig, Trainer

    pair, arch = build_pair(parallel_ctx, tiny_pair / "student", tiny_pair / "teacher")
    base = kd_loss_fn(KDLossConfig(kind="forward_kl"))
    calls = {"n": 0}

    def poisoned(outputs, batch):  # the 3rd step's loss is NaN
        calls["n"] += 1
        loss_sum, tokens, report = base(outputs, batch)
        if calls["n"] == 3:
            loss_sum = loss_sum * float("nan")
            report = {"loss_sum": loss_sum.detach().clone(), "tokens": tokens}
        return loss_sum, tokens, report

    rows = torch.randint(0, arch.vocab_size, (16, 9), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=5, global_batch_size=2, micro_batch_size=2, save_every=2, eval_every=100)
    trainer = Trainer(parallel_ctx, pair, arch, poisoned, rows, cfg, tmp_path / "run", "distill",
                      checkpoint_module=pair.student)
    # the optimizer holds only the student's parameters; the teacher has no grads and no state
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in pair.student.parameters()}
    assert not any(p.requires_grad for p in pair.teacher.parameters()) and not pair.teacher.training
    saved_before = {k: v.clone() for k, v in pair.student.state_dict().items() if v is not None and "extra" not in k}
    with pytest.raises(NonFiniteLossError, match="at step 3.*step_0000002"):
        trainer.fit()
    ckpts = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 2
    assert not (ckpts / "step_0000003").exists()
    load_full_state(ckpts / "step_0000002")  # whole and readable
    assert any(not torch.equal(saved_before[k], v) for k, v in pair.student.state_dict().items() if k in saved_before)


@pytest.mark.parametrize("train_teacher", [False, True])
def test_activation_recompute_gives_identical_gradients(tiny_pair, parallel_ctx, train_teacher):
    """selective (every module megatron can rebuild) and full recompute: the same gradients as keeping
    the activations, for the student and (teacher correction in parallel) the teacher."""
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.distill.objective import kd_loss_fn, kd_with_correction_loss_fn
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.schedule import run_microbatches, wrap_ddp

    ids = torch.randint(0, 49152, (2, 13), generator=torch.Generator().manual_seed(0))
    loss_fn = kd_with_correction_loss_fn(KDLossConfig()) if train_teacher else kd_loss_fn(KDLossConfig())
    grads = []
    for mode, modules in (("none", ()), ("selective", ("core_attn", "mlp", "layernorm")), ("full", ())):
        pair, _ = build_pair(parallel_ctx, tiny_pair / "student", tiny_pair / "teacher", recompute=mode,
                             recompute_modules=modules, train_teacher=train_teacher)
        expected = None if mode == "none" else mode
        assert pair.student.config.recompute_granularity == expected
        assert pair.teacher.config.recompute_granularity == (expected if train_teacher else None)
        pair.config.calculate_per_token_loss = True
        layer = pair.student.decoder.layers[0]
        calls = {"mlp": 0, "core_attention": 0}
        for name, module in (("mlp", layer.mlp), ("core_attention", layer.self_attention.core_attention)):
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        ddp = wrap_ddp(pair)
        pair.train()
        run_microbatches(ddp, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}], loss_fn)
        # rebuilt in backward = run twice: nothing without recompute, the named modules, whole layers
        assert calls == {"none": {"mlp": 1, "core_attention": 1}, "selective": {"mlp": 2, "core_attention": 2},
                         "full": {"mlp": 2, "core_attention": 2}}[mode]
        grads.append({n: p.main_grad.clone() for n, p in pair.named_parameters() if p.requires_grad})
    assert any(k.startswith("teacher.") for k in grads[0]) == train_teacher
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        # recomputed layers may sum in another order: equal up to fp32 rounding, relative to each gradient
        rel = {k: ((other[k] - grads[0][k]).norm() / grads[0][k].norm()).item() for k in grads[0]}
        assert max(rel.values()) <= 1e-6, max(rel.items(), key=lambda kv: kv[1])
    zero = [k for k, g in grads[0].items() if not g.abs().sum() > 0]
    assert not zero, zero


def test_recompute_settings_are_checked():
    from nemo_neo.errors import ConfigError
    from nemo_neo.models.gpt import recompute_overrides

    assert recompute_overrides("none") == {}
    assert recompute_overrides("full")["recompute_granularity"] == "full"
    assert recompute_overrides("selective", ["mlp"]) == {"recompute_granularity": "selective", "recompute_modules": ["mlp"]}
    with pytest.raises(ConfigError, match="use one of none, selective, full"):
        recompute_overrides("partial")
    with pytest.raises(ConfigError, match="core_attn, mlp, layernorm"):
        recompute_overrides("selective", ["moe_act"])
    with pytest.raises(ConfigError, match="one or more"):
        recompute_overrides("selective", [])


def test_full_disk_during_a_save_is_one_error_and_keeps_the_last_checkpoint(tiny_pair, tmp_path, parallel_ctx,
                                                                             monkeypatch, capsys):
    """ENOSPC in the middle of writing step 2's checkpoint: one DiskWriteError naming the path and the
    free space, the partial .step_0000002.tmp removed, step 1 and latest.json intact."""
    import errno

    from nemo_neo.checkpoint import native
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.distill.objective import kd_loss_fn
    from nemo_neo.errors import DiskWriteError, exit_on_user_error
    from nemo_neo.recipes.distill import build_pair
    from nemo_neo.train.loop import TrainConfig, Trainer

    pair, arch = build_pair(parallel_ctx, tiny_pair / "student", tiny_pair / "teacher")
    rows = torch.randint(0, arch.vocab_size, (16, 9), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, global_batch_size=2, micro_batch_size=2, save_every=1, eval_every=100)
    trainer = Trainer(parallel_ctx, pair, arch, kd_loss_fn(KDLossConfig()), rows, cfg, tmp_path / "run", "distill",
                      checkpoint_module=pair.student)
    real_save, calls = native.save_file, {"n": 0}

    def fills_the_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2: a file half written, then the disk is full
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(native, "save_file", fills_the_disk)
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        trainer.fit()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line.lower()]  # beside the progress bar
    assert "Traceback" not in stderr and len(err) == 1, stderr[-3000:]
    assert err[0].startswith("error: could not write") and "No space left on device" in err[0], err
    assert "step_0000002" in err[0] and "MiB free" in err[0]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "step_0000001"]  # no partial directory
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 1
    load_full_state(ckpts / "step_0000001")  # whole and readable
    with pytest.raises(DiskWriteError):  # the same without the entry point's handler: a UserError
        calls["n"] = 1
        Trainer(parallel_ctx, pair, arch, kd_loss_fn(KDLossConfig()), rows, cfg, tmp_path / "run2", "distill",
                checkpoint_module=pair.student).fit()
