#!/usr/bin/env python
"""Generation throughput: SmolLM2-135M vs its depth- and width-pruned students (BENCHMARKS.md).

    python benchmarks/throughput_students.py --out runs/throughput_students [--repeats 3]

Students (built once under --work, untrained: throughput depends only on the shapes):
- depth: the 15 even-numbered layers of 30 (`nemo_neo.prune.drop_layers_checkpoint`), 81.4M params;
- width: hidden 576 -> 432 and FFN 1536 -> 1088 with all heads kept (Minitron's 8B -> 4B width
  recipe shrinks hidden by the same 0.75), 83.4M params, via `nemo_neo.prune.prune_width_random`
  (unit choice does not change speed).
Each repeat runs tools/throughput_bench.py's study (torch backend on CPU: fp32, since this CPU
has no bf16 instructions; bf16 with torch.compile on a GPU) with the models in rotated order;
the table reports the median output tokens/s per row and the ratios to the teacher.
"""

import argparse
import json
import statistics
from pathlib import Path

from nemo_neo import enable_compat  # noqa: E402

enable_compat()  # an entry point: switch on what megatron-core needs here (nemo_neo._compat)

def build_students(teacher: Path, work: Path) -> dict[str, Path]:
    from benchmarks.random_models import build_students as build  # one definition of the two students

    work.mkdir(parents=True, exist_ok=True)
    return {"teacher": teacher, **build(teacher, work)}


def parameters(ckpt: Path) -> int:
    from nemo_neo.checkpoint.native import read_index

    arch, _ = read_index(ckpt)
    return arch.num_parameters()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/throughput_students")
    p.add_argument("--work", default=None, help="where the students are built (default: <out>/students)")
    p.add_argument("--isl-osl", nargs="+", default=["128,64", "512,64"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--precision", default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
    from nemo_neo.recipes.throughput import Row, parse_pairs, plot, run_study

    out = Path(args.out)
    models = build_students(default_teacher_checkpoint(), Path(args.work) if args.work else out / "students")
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    names = list(models)
    runs = []
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who runs first
        result = run_study({n: str(models[n]) for n in order}, parse_pairs(args.isl_osl), args.batch_sizes,
                           args.num_requests, out / f"repeat{r}", backend="torch", precision=precision)
        runs.append(result)
    table = {}
    for result in runs:
        for row in result["rows"]:
            table.setdefault((row["model"], row["isl"], row["osl"], row["batch_size"]), []).append(row)
    rows = []
    for (model, isl, osl, bs), rs in table.items():
        med = statistics.median(x["output_tokens_per_s"] for x in rs)
        secs = statistics.median(x["seconds"] for x in rs)
        rows.append(Row(model, "torch", precision, isl, osl, bs, rs[0]["num_requests"], secs, rs[0]["num_requests"] / secs,
                        med, med * (isl + osl) / osl, rs[0]["new_tokens_min"], rs[0]["new_tokens_max"]))
    rows.sort(key=lambda r: (r.isl, r.osl, r.batch_size, names.index(r.model)))
    base = {(r.isl, r.osl, r.batch_size): r.output_tokens_per_s for r in rows if r.model == "teacher"}
    summary = {"machine": runs[0]["machine"], "precision": precision, "repeats": args.repeats,
               "parameters": {n: parameters(m) for n, m in models.items()},
               "rows": [dict(r.__dict__, speedup=round(r.output_tokens_per_s / base[(r.isl, r.osl, r.batch_size)], 3)) for r in rows]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, out / "throughput.png", title=f"SmolLM2-135M vs pruned students, torch {precision}, median of {args.repeats}")
    print(f"parameters: {summary['parameters']}")
    print("| ISL/OSL | batch | teacher tok/s | depth tok/s (x) | width tok/s (x) |")
    for isl, osl, bs in sorted(base):
        cells = {r.model: r for r in rows if (r.isl, r.osl, r.batch_size) == (isl, osl, bs)}
        t = cells["teacher"].output_tokens_per_s
        print(f"| {isl}/{osl} | {bs} | {t:.1f} | " + " | ".join(
            f"{cells[m].output_tokens_per_s:.1f} ({cells[m].output_tokens_per_s / t:.2f}x)" for m in ("depth", "width")) + " |")


if __name__ == "__main__":
    main()
