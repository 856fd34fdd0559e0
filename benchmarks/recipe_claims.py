#!/usr/bin/env python
"""The papers' qualitative claims, reproduced at small scale on the real SmolLM2-135M teacher, every
run through the recipe's own entry point (`torchrun examples/prune_distill.py`).

    python benchmarks/recipe_claims.py [--root runs/claims --steps 40 --seq 128 --batch 4]

Runs (all students distill for the same steps on the same data, validated on the same rows):
  width_kd        corrected teacher -> width prune (MLP 768, hidden 432) -> KD    (the recipe)
  random_kd       same shape, random init -> KD                                    (Minitron: pruning helps)
  width_ce        width prune -> CE training on the text, no teacher               (Minitron: KD helps)
  uncorrected_kd  prune + KD from the uncorrected teacher                          (teacher correction helps)
  depth_kd        depth prune to the same parameter count (12 layers) -> KD        (width beats depth)
  half_{llm_neo,lora,kd}  half-depth student: LLM-Neo vs LoRA vs full KD            (LLM-Neo ~ KD, >= LoRA)
Writes <root>/claims.json and <root>/claims.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def recipe(run_dir: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "examples" / "prune_distill.py"), f"run_dir={run_dir}", *overrides]
    print(f"\n=== {run_dir.name}: {' '.join(overrides)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((run_dir / "distill" / "metrics.json").read_text()) if (run_dir / "distill" / "metrics.json").is_file() else {}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "claims")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences) of every distillation step")
    p.add_argument("--valid", type=int, default=24, help="validation sequences")
    args = p.parse_args()
    root = args.root.resolve()
    steps = [f"distill.train.steps={args.steps}", f"distill.train.eval_every={args.steps}",
             f"distill.train.save_every={args.steps}", f"distill.train.global_batch_size={args.batch}",
             f"distill.train.micro_batch_size={args.batch}", f"data.seq_length={args.seq}",
             f"data.max_valid_sequences={args.valid}"]
    base = root / "base"  # teacher correction + width pruning, shared by the runs below
    recipe(base, "stages=[correct,prune]")
    corrected, pruned = base / "correct" / "teacher", base / "prune" / "student"
    half = root / "half"  # the LLM-Neo preset's student: the teacher minus 15 layers
    plan = {  # most telling first: the table is rewritten after every run
        "width_kd": ("stages=[distill]", f"distill.student={pruned}", f"distill.teacher={corrected}"),
        "random_kd": ("stages=[prune,distill]", f"prune.input={corrected}", "prune.random_init=true",
                      f"distill.teacher={corrected}"),
        "width_ce": ("stages=[distill]", f"distill.student={pruned}", "distill.method=sft", f"distill.teacher={corrected}"),
        "uncorrected_kd": ("stages=[prune,distill]",),
        "depth_kd": ("stages=[prune,distill]", f"prune.input={corrected}", "~prune.target", "+prune.target.num_layers=12",
                     f"distill.teacher={corrected}"),
        **{f"half_{m}": ("preset=llm_neo_smollm2_cpu", "stages=[distill]", f"distill.method={m}",
                         f"distill.student={half / 'prune' / 'student'}") for m in ("llm_neo", "lora", "kd")},
    }
    table = {}
    for name, overrides in plan.items():
        if name.startswith("half_") and not (half / "prune" / "metrics.json").is_file():
            recipe(half, "preset=llm_neo_smollm2_cpu", "stages=[prune]")
        m = recipe(root / name, *overrides, *steps)
        after = m["after"]
        table[name] = {"val_loss": after["loss"], "val_kl": after.get("kl"), "before_loss": m["before"]["loss"],
                       "peak_memory_gb": max(h["peak_memory_gb"] for h in m["history"]),
                       "tokens_per_s": sorted(h["tokens_per_s"] for h in m["history"])[len(m["history"]) // 2],
                       "parameters": m.get("trainable", {}).get("total"),
                       "trainable_parameters": m.get("trainable", {}).get("trainable")}
        (root / "claims.json").write_text(json.dumps(table, indent=2) + "\n")
        plot(table, root / "claims.png")
    print(json.dumps(table, indent=2))


def plot(table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(range(len(names)), [table[n]["val_loss"] for n in names], color="#4c72b0")
    for i, n in enumerate(names):
        ax.annotate(f"{table[n]['val_loss']:.3f}", (i, table[n]["val_loss"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("student validation loss after distillation")
    ax.set_title("Minitron / LLM-Neo claims at small scale (SmolLM2-135M teacher, same steps and data)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
