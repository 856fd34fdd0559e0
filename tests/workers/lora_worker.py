"""torchrun worker: LoRA (or MoSLoRA) on a checkpoint at a given TP/PP with deterministic nonzero
adapters; one forward+backward; writes gathered logits, loss and adapter gradients.

    torchrun --nproc_per_node N tests/workers/lora_worker.py --ckpt C --out O --tp T [--pp P] [--mixer] [--parts q,v]
"""

import argparse
from pathlib import Path

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.checkpoint import sharding  # noqa: E402
from nemo_neo.checkpoint.load import load_model  # noqa: E402
from nemo_neo.checkpoint.native import gather_stage_tensors  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.parallel.reduce import merge_stage_dicts  # noqa: E402
from nemo_neo.peft import LoRAConfig, adapter_state, apply_lora  # noqa: E402
from nemo_neo.train.schedule import run_microbatches, wrap_ddp  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--mixer", action="store_true")
    p.add_argument("--parts", default="q,k,v")
    args = p.parse_args()
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    model, arch, _ = load_model(args.ckpt, ctx)
    adapters = apply_lora(model, LoRAConfig(rank=4, alpha=8.0, mixer=args.mixer, qkv_parts=args.parts.split(",")), ctx)
    with torch.no_grad():  # nonzero B, the same full tensor sliced on every layout
        for name, lora in adapters.items():
            full_rows = lora.lora_B.shape[0] * (1 if lora.row_parallel else ctx.tp_size)
            g = torch.Generator().manual_seed(len(name) * 1009 + sum(map(ord, name)))
            full = torch.randn(full_rows, lora.rank, generator=g) * 0.05
            lora.lora_B.copy_(sharding.shard(name + ".lora_B", full, ctx.tp_rank, ctx.tp_size))
    ddp = wrap_ddp(model)
    tokens = torch.randint(0, arch.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def loss_fn(per_token, b):
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}

    with torch.no_grad():
        logits = run_microbatches(ddp, [batch], lambda o, b: (o.sum() * 0.0, {"logits": gather_from_tensor_model_parallel_region(o)}), forward_only=True)
    losses = run_microbatches(ddp, [batch], loss_fn, pass_labels=True)
    grads = gather_stage_tensors({sharding.canonical_name(n): q.main_grad for n, q in model.named_parameters() if q.requires_grad}, arch, ctx)
    weights = adapter_state(model, arch, ctx)
    grads, weights = merge_stage_dicts(grads, ctx), merge_stage_dicts(weights, ctx)
    if ctx.is_main:
        torch.save({"grads": grads, "adapters": weights}, Path(args.out) / "grads.pt")
    if ctx.is_last_stage and ctx.tp_rank == 0:
        torch.save({"logits": logits[0]["logits"], "loss": losses[0]["loss"]}, Path(args.out) / "outputs.pt")
    destroy()


if __name__ == "__main__":
    main()
