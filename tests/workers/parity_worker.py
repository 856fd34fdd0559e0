"""torchrun worker: load a checkpoint at a given TP/PP, run forward and one forward+backward,
and write full (gathered) logits, loss and gradients for comparison with a TP=1/PP=1 run.

    torchrun --nproc_per_node N tests/workers/parity_worker.py --ckpt C --out O --tp T --pp P [--save S]
"""

import argparse
from pathlib import Path

import torch

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

from nemo_neo.checkpoint.load import load_model  # noqa: E402
from nemo_neo.checkpoint.native import gather_stage_tensors, save_distributed  # noqa: E402
from nemo_neo.parallel import ParallelConfig, destroy, initialize  # noqa: E402
from nemo_neo.parallel.reduce import merge_stage_dicts  # noqa: E402
from nemo_neo.train.schedule import run_microbatches, wrap_ddp  # noqa: E402


def make_microbatches(vocab: int, n: int = 2, batch: int = 2, seq: int = 12):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--save", default=None)
    args = p.parse_args()
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ctx = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp))
    model, arch, _ = load_model(args.ckpt, ctx)
    ddp = wrap_ddp(model)
    batches = make_microbatches(arch.vocab_size)

    def logits_fn(out, batch):
        return out.sum() * 0.0, {"logits": gather_from_tensor_model_parallel_region(out).detach()}

    with torch.no_grad():
        logits = run_microbatches(ddp, batches, logits_fn, forward_only=True)

    def loss_fn(per_token_loss, batch):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    ddp.zero_grad_buffer()
    losses = run_microbatches(ddp, batches, loss_fn, pass_labels=True)
    grads = gather_stage_tensors({n: p.main_grad for n, p in model.named_parameters() if not (arch.tie_embeddings and n == "output_layer.weight")}, arch, ctx)
    merged = merge_stage_dicts(grads, ctx)
    out = Path(args.out)
    if ctx.is_main:
        torch.save(merged, out / "grads.pt")
    if ctx.is_last_stage and ctx.tp_rank == 0:
        torch.save({"logits": torch.stack([r["logits"] for r in logits]),
                    "loss": torch.stack([r["loss"] for r in losses])}, out / "outputs.pt")
    if args.save:
        save_distributed(args.save, arch, model, ctx, tokenizer_src=args.ckpt)
    destroy()


if __name__ == "__main__":
    main()
