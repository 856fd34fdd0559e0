"""The first-step loss of the NeMo subclass == NeMo's own llm.distill loss on the same batch and models.

NeMo's side is its distillation code itself: ModelOpt's ``LogitsKLLoss`` as NeMo 2.7.3 ships it
(``nemo.collections.llm.modelopt.distill.loss``, forward KL, no T^2 factor) reduced by the masked token
mean of NeMo's ``_DistillationLossReduction``, on the logits of the teacher and student that NeMo's
configs build from the NeMo checkpoints. The models are not wrapped by ModelOpt's DistillationModel
(its conversion is not needed for the loss).

Reduction difference: NeMo's llm.distill averages per micro-batch (token mean of each micro-batch,
then the mean over micro-batches); the subclass takes the token mean over the whole global batch
(NeMo's LM-loss convention). With one micro-batch they coincide; with several, the subclass's value
is sum(loss_sum) / sum(tokens). The test uses one micro-batch (two rows, one with a masked prompt),
where both reduce to the masked token mean.
"""

from __future__ import annotations

import nemo_steps
import pytest
import torch


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_first_step_loss_equals_nemo_llm_distill_loss(temperature, nemo_ckpts, neo_ckpts, tmp_path):
    from nemo.collections.llm.modelopt.distill.loss import LogitsKLLoss
    from nemo.collections.llm.modelopt.distill.model import _DistillationLossReduction

    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.nemo.convert import load_nemo_module
    from nemo_neo.nemo.models import neo_layer_spec

    kd = KDLossConfig(kind="forward_kl", temperature=temperature, t2_scaling=False, chunk_tokens=7)
    ours, _ = nemo_steps.nemo_step(nemo_ckpts, neo_ckpts, kd, None, tmp_path, mbs=2, gbs=2)  # one micro-batch

    tokens, _, loss_mask = nemo_steps.batch(2)
    with torch.no_grad():
        student = load_nemo_module(nemo_ckpts[nemo_steps.STUDENT], neo_layer_spec)(tokens, position_ids=None, attention_mask=None)
        teacher = load_nemo_module(nemo_ckpts[nemo_steps.TEACHER], neo_layer_spec)(tokens, position_ids=None, attention_mask=None)
    per_token = LogitsKLLoss(student_config(nemo_ckpts), temperature=temperature)(
        student.transpose(0, 1), teacher.transpose(0, 1))  # ModelOpt's loss takes [s, b, V]
    reduction = _DistillationLossReduction.__new__(_DistillationLossReduction)  # only its masking helper
    reduction._cp_size, reduction._tp_size = 1, 1
    nemo_loss = float(reduction._masked_token_loss(per_token, loss_mask))
    assert nemo_loss > 1e-3  # random tiny models: a small but real divergence
    # Both are fp32 (ModelOpt casts with .float()) but sum differently (chunked log-sum-exp vs F.kl_div
    # of softmaxes); on a KL this small (~6e-3 at T=2) that is up to ~2e-6 relative.
    assert ours == pytest.approx(nemo_loss, rel=5e-6)


def student_config(nemo_ckpts):
    from nemo_neo.nemo.convert import load_nemo_model_context

    return load_nemo_model_context(nemo_ckpts[nemo_steps.STUDENT]).config
