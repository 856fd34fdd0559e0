"""Prune a model: width to a target architecture by activation importance, or depth.

Dry run (no weights; prints the pruned architecture and parameter counts, built on the meta device):
  python tools/prune.py --hf-config config.json --target hidden_size=3072,ffn_hidden_size=9216 --dry-run
  python tools/prune.py --hf-config config.json --drop-layers 16-31 --dry-run

Real pruning of a nemo_neo checkpoint (single process):
  python tools/prune.py --ckpt teacher/ --out student/ --target ffn_hidden_size=768,hidden_size=432 \
      --calib-data text.txt [--num-samples 1024 --seq-length 256] [--scores scores.pt]
  python tools/prune.py --ckpt teacher/ --out student/ --drop-layers 15-29
  python tools/prune.py --ckpt teacher/ --out student/ --target num_layers=15 --calib-data valid.txt
      (depth by search: the contiguous block whose removal hurts the validation loss least;
       writes depth_search.json/.png into <out>/pruning/)
  python tools/prune.py --ckpt teacher/ --out student/ --target num_layers=15 \
      --depth-metric task:neo_winogrande --data-dir ../shared/data --task-limit 200
      (the block whose removal keeps WinoGrande accuracy highest, through lm-eval)

Architecture search (Minitron): the maximal candidate shapes under a budget, without weights:
  python tools/prune.py --hf-config config.json --search params=4.6e9 --dry-run \
      [--multiple-of hidden_size=256,ffn_hidden_size=512] [--max-width-pruning 0.5 --max-depth-pruning 0.5]
      [--search-axes num_layers,hidden_size,ffn_hidden_size] [--memory 1,4096,bfloat16]
  budgets: params, non_embedding_params, memory_gb (weights + KV cache at --memory batch,seq,dtype), AND-ed;
  on a checkpoint also latency_ms / throughput, measured here (torch backend, --measure isl,osl,batch).
And on a checkpoint: every candidate pruned by importance and scored by the validation loss, the best
--top-k distilled from the checkpoint for --kd-steps each and scored again; the winner's pruned weights
go to --out, results.json / results.md / search.png (and the resumable work) to --search-dir:
  python tools/prune.py --ckpt teacher/ --out student/ --search params=100e6 --calib-data text.txt \
      --top-k 3 --kd-steps 20 [--score val_loss|task:neo_winogrande --data-dir ../shared/data]

Scores are saved (--save-scores) and reused (--scores) so pruning can be redone without recalibrating.
"""

import argparse
import json
import sys
from pathlib import Path

from nemo_neo import enable_compat
from nemo_neo.checkpoint.atomic import check_output_dir
from nemo_neo.checkpoint.native import read_index
from nemo_neo.errors import exit_on_user_error
from nemo_neo.models.arch import arch_from_hf_config, transformers_config
from nemo_neo.parallel import initialize
from nemo_neo.prune.depth import check_drop_layers
from nemo_neo.prune.importance import ImportanceConfig
from nemo_neo.prune.search import MemorySpec, SearchError, enumerate_candidates, parse_budget
from nemo_neo.prune.width import PruneTargetError, parse_target, pruned_arch
from nemo_neo.recipes.arch_search import ArchSearch, MeasureSpec, SearchConfig, check
from nemo_neo.recipes.methods import MethodConfig
from nemo_neo.recipes.prune import prune_checkpoint, text_samples
from nemo_neo.train.loop import TrainConfig
from nemo_neo.train.optim import OptimConfig


def parse_layers(text: str) -> list[int]:
    out = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def student_arch(arch, target_text: str = "", drop_text: str | None = None, tp: int = 1, pp: int = 1):
    """(pruned arch, target dict, layers to drop) from the --target / --drop-layers texts, validated."""
    target = parse_target(target_text or "")
    drop = parse_layers(drop_text) if drop_text else []
    if drop:
        target["num_layers"] = arch.num_layers - len(check_drop_layers(arch.num_layers, drop))
    return pruned_arch(arch, target, tp, pp), target, drop


def meta_parameter_count(hf_config: dict) -> tuple[int, int]:
    """(total, non-embedding) parameters of the HF model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    config = transformers_config(hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embed = model.get_input_embeddings().weight.numel()
    if not config.tie_word_embeddings:
        embed += model.get_output_embeddings().weight.numel()
    return total, total - embed


def describe(arch) -> dict:
    return {k: getattr(arch, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                          "num_query_groups", "head_dim", "vocab_size")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-config", help="a Hugging Face config.json (dry run)")
    src.add_argument("--ckpt", help="a nemo_neo checkpoint to prune")
    p.add_argument("--target", default="", help="key=value[,...]: hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, num_layers")
    p.add_argument("--drop-layers", default=None, help="explicit layers to drop, e.g. 16-31 or 3,5,7 (0-based)")
    p.add_argument("--dry-run", action="store_true", help="print the pruned architecture; touch no weights")
    p.add_argument("--out", help="output checkpoint directory")
    p.add_argument("--calib-data", nargs="*", default=None, help=".txt/.jsonl calibration text (default: CPython docs)")
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--scores", help="reuse importance scores saved by --save-scores")
    p.add_argument("--save-scores", help="write the importance scores here")
    p.add_argument("--depth-metric", default="loss", help="depth search by 'loss' or 'task:<lm-eval task>' accuracy (e.g. task:neo_winogrande)")
    p.add_argument("--task-limit", type=int, default=None, help="documents per candidate for --depth-metric task:...")
    p.add_argument("--data-dir", default=None, help="where the task pack's local files live (e.g. ../shared/data)")
    p.add_argument("--tp", type=int, default=1, help="TP the pruned model must support")
    p.add_argument("--pp", type=int, default=1, help="PP the pruned model must support")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--search", default=None, help="architecture search under budgets, e.g. params=4.6e9,memory_gb=12")
    p.add_argument("--search-axes", default=None, help="axes the search may change (default: all but num_query_groups)")
    p.add_argument("--max-width-pruning", type=float, default=0.5, help="largest fraction of each width axis to prune")
    p.add_argument("--max-depth-pruning", type=float, default=0.5, help="largest fraction of the layers to prune")
    p.add_argument("--multiple-of", default="", help="grid step per axis, e.g. hidden_size=256,ffn_hidden_size=512")
    p.add_argument("--memory", default="1,4096,bfloat16", help="memory_gb budget's batch,seq_length,dtype")
    p.add_argument("--measure", default="128,32,1", help="latency_ms / throughput budgets: ISL,OSL,batch size")
    p.add_argument("--max-candidates", type=int, default=None, help="quick-score only the largest N candidates")
    p.add_argument("--top-k", type=int, default=3, help="candidates (best quick scores) that get a short distillation")
    p.add_argument("--kd-steps", type=int, default=20, help="steps of each short distillation")
    p.add_argument("--kd-batch-size", default="8,2", help="global,micro batch size of the short distillations")
    p.add_argument("--kd-lr", type=float, default=1e-4, help="peak LR of the short distillations (cosine to a tenth)")
    p.add_argument("--score", default="val_loss", help="KD score: val_loss or task:<lm-eval task> (accuracy)")
    p.add_argument("--search-dir", default=None, help="the search's work and results (default: <out>_search)")
    args = p.parse_args(argv)
    enable_compat()

    with exit_on_user_error():
        if args.hf_config:
            arch = arch_from_hf_config(json.loads(Path(args.hf_config).read_text()))
        else:
            arch, _ = read_index(args.ckpt)
        if args.search is not None:
            return _search(args, arch)
        new, target, drop = student_arch(arch, args.target, args.drop_layers, args.tp, args.pp)  # validates first
        if args.dry_run:
            before, after = meta_parameter_count(arch.to_hf_config()), meta_parameter_count(new.to_hf_config())
            print(json.dumps({"original": {**describe(arch), "parameters": before[0], "non_embedding_parameters": before[1]},
                              "pruned": {**describe(new), "parameters": after[0], "non_embedding_parameters": after[1]}}, indent=2))
            return 0
        if not args.ckpt or not args.out:
            raise PruneTargetError("pruning weights needs --ckpt and --out (or pass --dry-run with --hf-config)")
        check_output_dir(args.out, args.overwrite)

        result = prune_checkpoint(args.ckpt, args.out, target, drop, calib_data=args.calib_data,
                                  num_samples=args.num_samples, seq_length=args.seq_length, scores_path=args.scores,
                                  save_scores_path=args.save_scores, tp=args.tp, pp=args.pp, overwrite=args.overwrite,
                                  depth_metric=args.depth_metric, task_limit=args.task_limit, data_dir=args.data_dir)
        print(json.dumps(result, indent=2))
        return 0


def _ints(text: str, option: str, example: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SearchError(f"{option} {text!r}: use integers like {example}") from None


def search_config(args) -> SearchConfig:
    batch, seq, dtype = (args.memory.split(",") + ["", "", ""])[:3]
    try:
        memory = MemorySpec(int(batch or 1), int(seq or 4096), dtype or "bfloat16")
    except ValueError:
        raise SearchError(f"--memory {args.memory!r}: use batch,seq_length,dtype (e.g. 1,4096,bfloat16)") from None
    isl, osl, bs = (_ints(args.measure, "--measure", "128,32,1") + [1, 1, 1])[:3]
    kwargs = {}
    if args.search_axes:
        kwargs["axes"] = [a.strip() for a in args.search_axes.split(",") if a.strip()]
    return SearchConfig(budget=parse_budget(args.search), max_width_pruning=args.max_width_pruning,
                        max_depth_pruning=args.max_depth_pruning, multiple_of=parse_target(args.multiple_of),
                        memory=memory, measure=MeasureSpec(isl, osl, bs), max_candidates=args.max_candidates,
                        top_k=args.top_k, kd_steps=args.kd_steps, score=args.score, task_limit=args.task_limit,
                        data_dir=args.data_dir, **kwargs)


def _search(args, arch) -> int:
    cfg = search_config(args)
    space = cfg.space(args.tp, args.pp)
    if args.dry_run:
        candidates = enumerate_candidates(arch, space)
        before = meta_parameter_count(arch.to_hf_config())
        print(json.dumps({"original": {**describe(arch), "parameters": before[0], "non_embedding_parameters": before[1]},
                          "budget": space.budget, "memory": vars(space.memory), "candidates": candidates}, indent=2))
        return 0
    if not args.ckpt or not args.out:
        raise SearchError("the search on weights needs --ckpt and --out (or pass --dry-run to list the candidates)")
    check_output_dir(args.out, args.overwrite)
    check(cfg, arch, args.tp, args.pp)  # nothing fits, an unknown task: one line before any work
    gbs, mbs = (_ints(args.kd_batch_size, "--kd-batch-size", "8,2") + [2])[:2]
    train, valid = text_samples(args.ckpt, args.calib_data, args.seq_length, max(args.num_samples, cfg.kd_steps * gbs))
    out = Path(args.out)
    work = Path(args.search_dir) if args.search_dir else out.with_name(out.name + "_search")
    search = ArchSearch(initialize(), cfg, args.ckpt, args.ckpt, train, valid, train.rows(args.num_samples), work,
                        MethodConfig(method="kd"), TrainConfig(global_batch_size=gbs, micro_batch_size=mbs,
                                                               optim=OptimConfig(lr=args.kd_lr, min_lr=args.kd_lr / 10)),
                        ImportanceConfig(num_samples=args.num_samples), depth_metric=args.depth_metric, tp=args.tp,
                        pp=args.pp)
    result = search.run(out)
    print((work / "results.md").read_text())
    print(json.dumps({"winner": result["winner"], "checkpoint": str(out), "results": str(work / "results.json"),
                      "png": str(work / "search.png"), "rank_correlation": result["rank_correlation"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
