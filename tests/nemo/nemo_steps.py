"""Distillation steps through NeMo's trainer with `NeoDistillationLlamaModel`, shared by the tests and
their torchrun worker (`nemo_pp_worker.py`): the same data, model and optimizer at any TP x PP.

Not a test module (no test_ prefix); imported as a sibling by both.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEACHER, STUDENT = "llama3_gqa_untied", "student_of_llama3"  # the models of conftest.neo_ckpts
VOCAB, SEQ = 130, 16
LR, WD, CLIP = 1e-2, 0.01, 1.0


def batch(rows: int = 2, seed: int = 0):
    """tokens, labels, loss_mask of `rows` sequences; row 1 has a 5-token prompt that does not count."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    loss_mask = torch.ones(rows, SEQ)
    loss_mask[1, :5] = 0
    return data[:, :-1].contiguous(), data[:, 1:].contiguous(), loss_mask


def recipe(name: str):
    """(KDLossConfig, LoRAConfig | None) of the two recipes the tests run."""
    from nemo_neo.distill.losses import KDLossConfig
    from nemo_neo.peft.apply import LoRAConfig

    if name == "minitron_forward_kl":
        return KDLossConfig(kind="forward_kl", temperature=1.0, chunk_tokens=7), None
    if name == "llm_neo_lora":  # LLM-Neo: adapters on the student only, alpha * CE + (1 - alpha) * KL
        return (KDLossConfig(kind="ce_kl", alpha=0.3, temperature=2.0, chunk_tokens=7),
                LoRAConfig(rank=4, alpha=8.0, seed=3))
    raise ValueError(name)


def nemo_config(neo_ckpt):
    import nemo_neo.nemo as nn_nemo
    from nemo_neo.checkpoint.native import read_index
    from nemo_neo.nemo.config import cpu_overrides
    from nemo_neo.nemo.models import neo_layer_spec

    arch, _ = read_index(neo_ckpt)
    return nn_nemo.nemo_config_from_arch(arch, transformer_layer_spec=neo_layer_spec, **cpu_overrides())


def build_model(nemo_ckpts, neo_ckpts, kd, lora):
    from megatron.core.optimizer import OptimizerConfig
    from nemo import lightning as nl

    import nemo_neo.nemo as nn_nemo

    optim = nl.MegatronOptimizerModule(OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=CLIP,
        use_distributed_optimizer=False, bf16=False, params_dtype=torch.float32))
    return nn_nemo.NeoDistillationLlamaModel(nemo_config(neo_ckpts[STUDENT]), nemo_config(neo_ckpts[TEACHER]),
                                             nemo_ckpts[TEACHER], kd_loss=kd, lora=lora,
                                             student_ckpt_path=nemo_ckpts[STUDENT], optim=optim)


def data_module(rows: int, mbs: int, gbs: int):
    import lightning.pytorch as pl
    from nemo import lightning as nl
    from torch.utils.data import DataLoader

    tokens, labels, loss_mask = batch(rows)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None]
    samples = [{"tokens": tokens[i], "labels": labels[i], "loss_mask": loss_mask[i], "position_ids": torch.arange(SEQ),
                "attention_mask": causal} for i in range(rows)]

    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    class Rows(pl.LightningDataModule):
        # The data position in NeMo's checkpoints, as NeMo's own data modules keep it (resume).
        state_dict, load_state_dict = PreTrainingDataModule.state_dict, PreTrainingDataModule.load_state_dict

        def setup(self, stage: str = "") -> None:
            self.init_global_step = self.trainer.global_step

        def __init__(self):
            super().__init__()
            self.data_sampler = nl.MegatronDataSampler(seq_len=SEQ, micro_batch_size=mbs, global_batch_size=gbs)
            # what llm.train's callbacks read from a NeMo data module
            self.seq_length, self.micro_batch_size, self.global_batch_size = SEQ, mbs, gbs

        def train_dataloader(self):
            return DataLoader(samples, batch_size=mbs)

    return Rows()


def nemo_step(nemo_ckpts, neo_ckpts, kd, lora, root, tp: int = 1, pp: int = 1, mbs: int = 2, gbs: int = 2):
    """One optimizer step over `gbs` rows (gbs / mbs micro-batches) at TP x PP, in this process's world.

    Returns (loss on this rank -- NeMo's reduced_train_loss, meaningful on the last stage --, the
    model). `save_student` writes what the step produced."""
    from nemo import lightning as nl

    fresh_batch_sizes()
    model = build_model(nemo_ckpts, neo_ckpts, kd, lora)
    strategy = nl.MegatronStrategy(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                   ckpt_save_optimizer=False)
    trainer = nl.Trainer(devices=tp * pp, accelerator="cpu", strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                         enable_progress_bar=False, default_root_dir=str(root))
    trainer.fit(model, data_module(gbs, mbs, gbs))
    return float(trainer.callback_metrics["reduced_train_loss"]), model


def fresh_batch_sizes() -> None:
    """NeMo sets megatron's process-wide micro-batch calculator once and asserts later runs agree;
    tests in one process use several batch sizes."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    destroy_num_microbatches_calculator()


def student_pair(model):
    from nemo_neo.nemo.models import _NemoDistillationPair

    return next(m for m in model.modules() if isinstance(m, _NemoDistillationPair))


def save_student(model, out) -> None:
    """The student (LoRA folded in) as NeMo's checkpointing would write it, with megatron-core's saver:
    any TP x PP reads back as the same full tensors (`read_full`)."""
    from megatron.core import dist_checkpointing

    Path(out).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(student_pair(model).sharded_state_dict(prefix="module."), str(out))


def read_full(ckpt_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a megatron-core distributed checkpoint, unsharded, by torch's own DCP reader."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    load(state, storage_reader=reader, no_dist=True)
    return state
