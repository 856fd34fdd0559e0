"""PNG plots of a recipe run: training loss curves and the before/after model comparison."""

from __future__ import annotations

import json
from pathlib import Path

# Trainer logs (<stage>/<name>_log.jsonl) of the stages that train, and what they train.
CURVES = {"correct": "teacher correction", "distill": "distillation"}
TRAIN_LOSS = {"correct": "train LM loss", "distill": "train loss (objective)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt


def read_logs(run_root: Path) -> dict[str, list[dict]]:
    """{"<stage>/<name>": records} for every training log of the run."""
    logs = {}
    for stage in CURVES:
        for path in sorted((Path(run_root) / stage).glob("*_log.jsonl")):
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if records:
                logs[f"{stage}/{path.stem.removesuffix('_log')}"] = records
    return logs


def _before(metrics_file: Path) -> dict:
    if not metrics_file.is_file():
        return {}
    return json.loads(metrics_file.read_text()).get("before") or {}


def loss_curves(run_root: Path, out: Path) -> Path | None:
    logs = read_logs(run_root)
    if not logs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(logs), figsize=(5.5 * len(logs), 4), squeeze=False)
    for ax, (name, records) in zip(axes[0], logs.items()):
        stage = name.split("/")[0]
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label=TRAIN_LOSS[stage], lw=1)
        before = _before(Path(run_root) / stage / "metrics.json")  # validation before training = step 0
        for key, style in (("val_loss", "o-"), ("val_kl", "s--"), ("teacher_loss", "-")):
            points = [(0, before[key[4:]])] if key.startswith("val_") and key[4:] in before else []
            points += [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), style, label=key.replace("_", " "), ms=4)
        ax.set_title(f"{CURVES[stage]} ({name.split('/')[1]})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss per token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def comparison(results: dict[str, dict], out: Path) -> Path:
    """Bar chart: validation loss of each model of the run, with parameter counts."""
    plt = _pyplot()
    labels = list(results)
    losses = [results[k]["loss"] for k in labels]
    fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 4))
    bars = ax.bar(range(len(labels)), losses, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974"][: len(labels)])
    for bar, label in zip(bars, labels):
        params = results[label].get("parameters")
        text = f"{bar.get_height():.3f}" + (f"\n{params / 1e6:.1f}M" if params else "")
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), [label.replace(" ", "\n", 1) for label in labels], fontsize=8)
    ax.set_ylabel("validation loss per token")
    ax.set_title("before / after: validation loss (lower is better)")
    ax.set_ylim(0, max(losses) * 1.2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the (parameters, score) points no other point beats with as few parameters."""
    better = (lambda a, b: a >= b) if higher_is_better else (lambda a, b: a <= b)
    front = []
    for i, (p, s) in enumerate(points):
        if not any(j != i and q <= p and better(t, s) and (q, t) != (p, s) for j, (q, t) in enumerate(points)):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def search_scores(candidates: list[dict], out: Path, score: str, higher_is_better: bool) -> Path:
    """Architecture search: parameters vs quick score (every candidate) and KD score (the top-K),
    each series' Pareto front drawn as a line, the winner starred."""
    plt = _pyplot()
    fig, (ax_q, ax_k) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = ((ax_q, "quick_score", "quick score: val loss after pruning", False),
              (ax_k, "kd_score", f"KD score after the short distillation ({score})", higher_is_better))
    for ax, key, title, higher in series:
        rows = [c for c in candidates if key in c]
        points = [(c["parameters"] / 1e6, c[key]) for c in rows]
        ax.scatter(*zip(*points), s=28, color="#4c72b0", label="candidate", zorder=2)
        front = pareto_front(points, higher)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o--", color="#c44e52", mfc="none", ms=10,
                label="Pareto front", zorder=3)
        for c, (x, y) in zip(rows, points):
            ax.annotate(c["id"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if c.get("winner"):
                ax.scatter([x], [y], marker="*", s=220, color="#dd8452", label="winner", zorder=4)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(("higher" if higher else "lower") + " is better")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
