"""The nemo_neo recipe as a hydra app, launched with torchrun on one or many nodes.

    torchrun --standalone --nproc_per_node 1 examples/prune_distill.py [hydra overrides]

Stages run in order and each writes `<run_dir>/<stage>/metrics.json`. Implemented so far:
  evaluate: the teacher's LM validation loss / perplexity on real text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("evaluate",)


def resolve_teacher(cfg, ctx) -> Path:
    if cfg.teacher.checkpoint:
        return Path(cfg.teacher.checkpoint)
    from nemo_neo.models.default_teacher import default_teacher_checkpoint

    if ctx.is_main:  # one rank converts (once, cached); the others wait for it
        path = default_teacher_checkpoint()
    dist.barrier()
    return default_teacher_checkpoint()


def validation_sequences(cfg, tokenizer):
    from nemo_neo.data import default_corpus, pack_tokens, read_text, split_train_valid

    text = read_text(cfg.data.text_files) if cfg.data.text_files else default_corpus()
    _, valid = split_train_valid(text, cfg.data.valid_fraction)
    return pack_tokens(tokenizer(valid).input_ids, cfg.data.seq_length, cfg.data.max_valid_sequences)


@hydra.main(version_base=None, config_path="../conf", config_name="prune_distill")
def main(cfg: DictConfig) -> None:
    from transformers import AutoTokenizer

    from nemo_neo.eval import validation_loss
    from nemo_neo.models.load import load_model
    from nemo_neo.parallel import ParallelConfig, destroy, initialize

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {unknown}; available: {list(STAGES)}")
    ctx = initialize(ParallelConfig(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.seed))
    run_dir = Path(cfg.run_dir)
    teacher = resolve_teacher(cfg, ctx)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    if "evaluate" in cfg.stages:
        model, arch, _ = load_model(teacher, ctx)
        sequences = validation_sequences(cfg, tokenizer)
        metrics = validation_loss(model, ctx, sequences, cfg.eval.micro_batch_size, desc="teacher validation")
        metrics.update(model="teacher", checkpoint=str(teacher), parameters=arch.num_parameters(),
                       layout={"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size})
        if ctx.is_main:
            out = run_dir / "evaluate"
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            print(f"teacher {arch.num_parameters() / 1e6:.1f}M params: validation loss {metrics['loss']:.4f}, "
                  f"perplexity {metrics['perplexity']:.2f} over {metrics['tokens']} tokens -> {out / 'metrics.json'}")
    destroy()


if __name__ == "__main__":
    main()
