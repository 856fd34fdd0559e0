"""Resume through NeMo's own machinery: a distillation run stopped after a checkpoint and continued by
``AutoResume`` gives the losses of the uninterrupted run (student weights, optimizer state and data
position restored from NeMo's checkpoint; the frozen teacher is rebuilt from its own checkpoint).
"""

from __future__ import annotations

import nemo_steps
import pytest

STEPS, MBS, GBS = 4, 1, 2


def _train(nemo_ckpts, neo_ckpts, log_dir, max_steps: int) -> list[float]:
    import lightning.pytorch as pl
    import torch
    from nemo import lightning as nl
    from nemo.collections import llm

    nemo_steps.fresh_batch_sizes()
    kd, lora = nemo_steps.recipe("minitron_forward_kl")
    model = nemo_steps.build_model(nemo_ckpts, neo_ckpts, kd, lora)
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, *_args):
            losses.append(float(trainer.callback_metrics["reduced_train_loss"]))

    trainer = nl.Trainer(devices=1, accelerator="cpu", max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
                         strategy=nl.MegatronStrategy(pipeline_dtype=torch.float32), callbacks=[Losses()],
                         enable_progress_bar=False, log_every_n_steps=1)
    # AutoResume continues from the "-last" checkpoint
    ckpt = nl.ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, monitor="reduced_train_loss", save_last=True,
                              save_optim_on_train_end=True,  # the stopped run ends on its checkpoint step
                              filename="{step}-{consumed_samples}")
    llm.train(model, nemo_steps.data_module(STEPS * GBS, MBS, GBS), trainer,
              log=nl.NeMoLogger(log_dir=str(log_dir), ckpt=ckpt, use_datetime_version=False),
              resume=nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True))
    return losses


def test_stopped_run_resumes_with_the_same_losses(nemo_ckpts, neo_ckpts, tmp_path):
    full = _train(nemo_ckpts, neo_ckpts, tmp_path / "full", STEPS)
    first = _train(nemo_ckpts, neo_ckpts, tmp_path / "split", STEPS // 2)  # stops after the step-2 checkpoint
    rest = _train(nemo_ckpts, neo_ckpts, tmp_path / "split", STEPS)  # AutoResume picks that checkpoint up
    assert len(full) == STEPS and len(first) == STEPS // 2 and len(rest) == STEPS // 2
    assert len(set(full)) == STEPS  # the steps see different rows: the data position matters
    assert first == pytest.approx(full[:2], rel=1e-6)
    assert rest == pytest.approx(full[2:], rel=1e-6)
