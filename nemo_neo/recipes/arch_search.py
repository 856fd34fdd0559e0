"""Minitron's architecture search, the workflow: prune every candidate shape, rank, distil the best few.

The candidate shapes and their exact counts come from `nemo_neo.prune.search` (budgets, bounds,
TP/PP divisibility). Then, in a work directory that makes the search resumable:

    candidates.json      the enumerated candidates (after any measured latency / throughput budget)
    importance.pt        the source's activation importance, computed once and reused by every candidate
    <id>/pruned/         the candidate pruned by importance (depth: the contiguous block whose removal
                         hurts the validation loss least), through the prune stage's `prune_checkpoint`
    <id>/quick.json      its quick score: the validation LM loss right after pruning
    <id>/kd/             top-K only: a short distillation (same data, same seed: the Trainer resumes it)
    <id>/kd.json         its KD score; written last, so a finished candidate is never redone
    results.json / results.md / search.png   every candidate; params vs score with the Pareto front

The winner (best KD score; ties: better quick score, then the candidate id) is published as the
pruned student at `out` (hard links of its pruned weights), where the prune stage publishes its
model, so the distill stage trains the winning shape from its pruned weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_neo import chaos
from nemo_neo.checkpoint.load import load_model
from nemo_neo.checkpoint.native import link_model_files, read_index
from nemo_neo.eval.lm_loss import validation_loss
from nemo_neo.eval.tasks import task_manager
from nemo_neo.models.arch import GPTArch, transformers_config
from nemo_neo.prune.importance import ImportanceConfig, compute_importance
from nemo_neo.prune.search import (
    AXES,
    DEFAULT_AXES,
    MEASURED_BUDGETS,
    MemorySpec,
    SearchError,
    SearchSpace,
    arch_for,
    enumerate_candidates,
    within,
)
from nemo_neo.recipes import plots
from nemo_neo.recipes.depth_search import task_metric
from nemo_neo.recipes.methods import MethodConfig, train_student
from nemo_neo.recipes.prune import prune_checkpoint
from nemo_neo.recipes.run_dir import write_json
from nemo_neo.recipes.throughput import TorchBackend, make_requests, timed_row
from nemo_neo.train.loop import TrainConfig
from nemo_neo.train.retention import remove_checkpoint_dir


@dataclass
class MeasureSpec:
    """How latency_ms / throughput budgets are measured: the throughput tool's torch backend on a
    random-weight model of the candidate's shape (speed does not depend on the weights' values).
    latency_ms: wall time of one batch of `batch_size` requests (ISL prompt, exactly OSL new
    tokens); throughput: output tokens per second."""

    isl: int = 128
    osl: int = 32
    batch_size: int = 1
    num_requests: int = 2
    precision: str = "bf16"

    def __post_init__(self):
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise SearchError(f"measure.precision={self.precision!r}: use bf16, fp16 or fp32 (the torch backend's)")
        bad = {k: getattr(self, k) for k in ("isl", "osl", "batch_size", "num_requests") if int(getattr(self, k)) < 1}
        if bad:
            raise SearchError(f"measure values must be >= 1, got {bad}")


@dataclass
class SearchConfig:
    """The recipe's prune.search section (and `nemo-neo-prune --search` on a checkpoint). Off while
    `budget` is empty. score: `val_loss` (lower is better) or `task:<lm-eval task>` (accuracy)."""

    budget: dict = field(default_factory=dict)
    axes: list = field(default_factory=lambda: list(DEFAULT_AXES))
    max_width_pruning: float = 0.5
    max_depth_pruning: float = 0.5
    multiple_of: dict = field(default_factory=dict)
    memory: MemorySpec = field(default_factory=MemorySpec)  # for the memory_gb budget
    measure: MeasureSpec = field(default_factory=MeasureSpec)  # for latency_ms / throughput
    max_candidates: int | None = None  # quick-score only the largest N candidates (null: all)
    top_k: int = 3
    kd_steps: int = 20
    score: str = "val_loss"
    task_limit: int | None = None
    data_dir: str | None = None

    def __post_init__(self):
        self.memory = self.memory if isinstance(self.memory, MemorySpec) else MemorySpec(**dict(self.memory or {}))
        self.measure = self.measure if isinstance(self.measure, MeasureSpec) else MeasureSpec(**dict(self.measure or {}))
        if not (self.score == "val_loss" or (self.score.startswith("task:") and len(self.score) > 5)):
            raise SearchError(f"score={self.score!r}: use val_loss or task:<lm-eval task name> (e.g. task:neo_winogrande)")
        for key in ("top_k", "kd_steps") + (("max_candidates",) if self.max_candidates is not None else ()):
            if int(getattr(self, key)) < 1:
                raise SearchError(f"{key}={getattr(self, key)} must be >= 1")
        if self.enabled:
            self.space()  # budget names, axes and bounds are checked here, before any work

    @property
    def enabled(self) -> bool:
        return bool(self.budget)

    @property
    def higher_is_better(self) -> bool:
        return self.score != "val_loss"

    def space(self, tp: int = 1, pp: int = 1) -> SearchSpace:
        return SearchSpace(budget=dict(self.budget), axes=list(self.axes), max_width_pruning=self.max_width_pruning,
                           max_depth_pruning=self.max_depth_pruning, multiple_of=dict(self.multiple_of), tp=tp, pp=pp,
                           memory=self.memory)


def checkpoint_loss(ctx, ckpt, rows, micro_batch_size: int = 4, desc: str = "validation") -> dict:
    """Validation LM loss of a checkpoint (and its parameter count): the one evaluation every stage uses."""
    model, arch, _ = load_model(ckpt, ctx)
    metrics = validation_loss(model, ctx, rows, micro_batch_size, desc=desc)
    metrics["parameters"] = arch.num_parameters()
    return metrics


def check(cfg: SearchConfig, arch: GPTArch, tp: int = 1, pp: int = 1) -> list[dict]:
    """Before any work: the arithmetic candidates (one error line naming the smallest reachable size
    when none fits) and, for a task score, that lm-eval knows the task."""
    candidates = enumerate_candidates(arch, cfg.space(tp, pp))
    if cfg.score.startswith("task:"):
        task = cfg.score[5:]
        if task not in task_manager(data_dir=cfg.data_dir, include_defaults=False).all_tasks:
            raise SearchError(f"score={cfg.score!r}: lm-eval has no task {task!r}; use one of the pack's (e.g. "
                              "task:neo_winogrande with data_dir) or val_loss")
    return candidates


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class ArchSearch:
    """One search in `work`; every rank of the job calls `run` (file writes on the main rank)."""

    def __init__(self, ctx, cfg: SearchConfig, source, teacher, train, valid, calib_rows, work, method: MethodConfig,
                 train_cfg: TrainConfig, importance: ImportanceConfig | None = None, depth_metric: str = "loss",
                 eval_micro_batch_size: int = 4, keep_training_state: bool = False, tp: int = 1, pp: int = 1):
        self.ctx, self.cfg, self.source, self.teacher = ctx, cfg, Path(source), Path(teacher)
        self.train, self.valid, self.calib = train, valid, calib_rows
        self.work, self.method, self.importance = Path(work), method, importance or ImportanceConfig()
        self.depth_metric, self.mbs, self.keep = depth_metric, eval_micro_batch_size, keep_training_state
        self.tp, self.pp = tp, pp
        # the short distillation: the distill stage's loop and optimizer for kd_steps, validated at the end
        self.kd_cfg = replace(train_cfg, steps=cfg.kd_steps, eval_every=cfg.kd_steps,
                              save_every=max(1, min(train_cfg.save_every, cfg.kd_steps)))

    def fingerprint(self) -> str:
        """What the records in `work` depend on: the search and short-KD settings, models and data sizes."""
        what = {"search": asdict(self.cfg), "kd": asdict(self.kd_cfg), "method": asdict(self.method),
                "importance": asdict(self.importance), "depth_metric": self.depth_metric, "source": str(self.source),
                "teacher": str(self.teacher), "rows": [len(self.train or ()), len(self.valid if self.valid is not None else ())]}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _write(self, path: Path, data: dict) -> None:
        if self.ctx.is_main:
            write_json(path, data)
        _barrier(self.ctx)

    # --- candidates ---------------------------------------------------------------------------------
    def candidates(self) -> list[dict]:
        path = self.work / "candidates.json"
        recorded = _read(path)
        if recorded is not None:
            if recorded.get("fingerprint") != self.fingerprint():
                # its records (scores, short runs) answer another question: mixing them would rank wrongly
                raise SearchError(f"{self.work} holds a search with other settings (budget, bounds, steps, data or "
                                  "models); remove that directory or choose a new run_dir / --search-dir")
            return recorded["candidates"]
        arch, _ = read_index(self.source)
        found = check(self.cfg, arch, self.tp, self.pp)
        found = found[: self.cfg.max_candidates] if self.cfg.max_candidates else found
        measured = [b for b in self.cfg.budget if b in MEASURED_BUDGETS]
        if measured:
            for c in found:
                c["measured"] = measure(arch, c, self.cfg.measure, self.source)
            kept = [c for c in found if within(c["measured"], {b: self.cfg.budget[b] for b in measured})]
            if not kept:
                best = {b: min(c["measured"][b] for c in found) if b == "latency_ms" else max(c["measured"][b] for c in found)
                        for b in measured}
                raise SearchError(f"no candidate meets {', '.join(f'{b}={self.cfg.budget[b]:g}' for b in measured)} on this "
                                  f"machine: the best measured of the {len(found)} candidates is {best} (smallest "
                                  f"{found[-1]['id']}, {found[-1]['parameters']:,} parameters); relax the budget")
            found = kept
        self._write(path, {"source": str(self.source), "budget": self.cfg.budget, "fingerprint": self.fingerprint(),
                           "candidates": found})
        return found

    def scores_path(self) -> Path:
        """The source's importance scores, computed once (atomic file: a kill leaves none or all)."""
        path = self.work / "importance.pt"
        if not path.is_file():
            start = time.perf_counter()
            model, arch, _ = load_model(self.source, self.ctx)
            scores = compute_importance(model, arch, self.ctx, self.calib, self.importance)
            scores["seconds"] = round(time.perf_counter() - start, 2)
            del model
            if self.ctx.is_main:
                tmp = path.with_name(f".{path.name}.tmp")
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(scores, tmp)
                os.replace(tmp, path)
            _barrier(self.ctx)
        return path

    # --- per candidate --------------------------------------------------------------------------------
    def quick(self, c: dict, scores: Path) -> dict:
        """Prune by importance and score by the validation loss, once."""
        done = _read(self.work / c["id"] / "quick.json")
        if done is not None:
            return done
        source = {k: getattr(read_index(self.source)[0], k) for k in AXES}
        target = {k: c[k] for k in AXES if c[k] != source[k]}
        start = time.perf_counter()
        report = prune_checkpoint(self.source, self.work / c["id"] / "pruned", target, scores_path=scores,
                                  importance=self.importance, depth_metric=self.depth_metric, overwrite=True,
                                  ctx=self.ctx, calib_rows=self.calib, valid_rows=self.valid, task_limit=self.cfg.task_limit,
                                  data_dir=self.cfg.data_dir)
        pruned = time.perf_counter()
        metrics = checkpoint_loss(self.ctx, self.work / c["id"] / "pruned", self.valid, self.mbs, desc=f"{c['id']} quick score")
        if metrics["parameters"] != c["parameters"]:  # the arithmetic and the pruned weights must agree
            raise SearchError(f"{c['id']}: pruned to {metrics['parameters']:,} parameters, the count said {c['parameters']:,}")
        result = {"quick_score": metrics["loss"], "quick_perplexity": metrics["perplexity"],
                  "dropped_layers": report.get("dropped_layers", []), "prune_seconds": round(pruned - start, 2),
                  "quick_seconds": round(time.perf_counter() - pruned, 2)}
        self._write(self.work / c["id"] / "quick.json", result)
        return result

    def short_kd(self, c: dict) -> dict:
        """N steps of the distill stage's method, then the KD score; never redone once kd.json exists."""
        cand = self.work / c["id"]
        done = _read(cand / "kd.json")
        if done is not None:
            return done
        start = time.perf_counter()
        result = train_student(self.ctx, self.method, cand / "pruned", self.teacher, self.train, self.valid, self.kd_cfg,
                               cand / "kd", out_ckpt=cand / "kd" / "student", eval_micro_batch_size=self.mbs)
        trained = time.perf_counter()
        if self.cfg.score == "val_loss":
            score = result["after"]["loss"]
        else:
            model, _, _ = load_model(cand / "kd" / "student", self.ctx)
            score = task_metric(self.ctx, self.source, self.cfg.score[5:], self.cfg.task_limit, self.cfg.data_dir)(model)
            del model
        record = {"kd_score": score, "kd_after": result["after"], "kd_steps": self.kd_cfg.steps,
                  "kd_resumed_from": result["resumed_from"], "kd_seconds": round(trained - start, 2),
                  "kd_score_seconds": round(time.perf_counter() - trained, 2)}
        self._write(cand / "kd.json", record)
        chaos.point("candidate_finished")  # a test hook: a kill here must not redo this candidate
        return record

    def _release(self, path: Path) -> None:
        """Training state and models the search no longer needs (after the records that make them so)."""
        if self.ctx.is_main and not self.keep and path.is_dir():
            remove_checkpoint_dir(path)

    # --- the search -------------------------------------------------------------------------------------
    def run(self, out) -> dict:
        start = time.perf_counter()
        candidates = self.candidates()
        scores = self.scores_path()
        for c in candidates:
            c.update(self.quick(c, scores))
        sign = -1 if self.cfg.higher_is_better else 1
        ranked = sorted(candidates, key=lambda c: (c["quick_score"], c["id"]))
        for rank, c in enumerate(ranked, 1):
            c["quick_rank"] = rank
        top = ranked[: self.cfg.top_k]
        for c in ranked[self.cfg.top_k:]:
            self._release(self.work / c["id"] / "pruned")
        for c in top:
            c.update(self.short_kd(c))
            for name in ("kd/checkpoints", "kd/student"):
                self._release(self.work / c["id"] / name)
        winner = min(top, key=lambda c: (sign * c["kd_score"], c["quick_score"], c["id"]))
        for c in candidates:
            c["winner"] = c is winner
        if self.ctx.is_main:
            link_model_files(self.work / winner["id"] / "pruned", out, overwrite=True)
        _barrier(self.ctx)
        result = {"source": str(self.source), "teacher": str(self.teacher), "budget": self.cfg.budget,
                  "search": {k: v for k, v in asdict(self.cfg).items() if k != "budget"},
                  "importance_seconds": torch.load(scores, weights_only=False).get("seconds"),
                  "score": self.cfg.score, "higher_is_better": self.cfg.higher_is_better, "winner": winner["id"],
                  "rank_correlation": spearman([c["quick_score"] for c in top], [sign * c["kd_score"] for c in top]),
                  "candidates": candidates, "checkpoint": str(out)}
        result["seconds"] = round(time.perf_counter() - start, 1)
        if self.ctx.is_main:
            write_json(self.work / "results.json", result)
            (self.work / "results.md").write_text(markdown_table(result))
            plots.search_scores(candidates, self.work / "search.png", self.cfg.score, self.cfg.higher_is_better)
        _barrier(self.ctx)
        return result


def measure(arch: GPTArch, c: dict, spec: MeasureSpec, tokenizer_src) -> dict:
    """latency_ms and throughput of the candidate's shape on this machine (random weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = transformers_config(arch_for(arch, {k: c[k] for k in AXES}).to_hf_config())
    torch.manual_seed(0)
    backend = TorchBackend(model=AutoModelForCausalLM.from_config(config), precision=spec.precision, compile=False)
    requests = make_requests(AutoTokenizer.from_pretrained(str(tokenizer_src)), spec.isl, spec.num_requests)
    row = timed_row(backend, requests, spec.isl, spec.osl, spec.batch_size, desc=f"{c['id']} latency")
    batches = -(-spec.num_requests // spec.batch_size)
    return {"latency_ms": round(1000 * row["seconds"] / batches, 2), "throughput": round(row["output_tokens_per_s"], 2)}


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than two distinct ranks."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    if sx == 0 or sy == 0:
        return None
    return round(sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy), 4)


def markdown_table(result: dict) -> str:
    """Every candidate: shape, parameters, quick score, KD score ('-' when not distilled)."""
    lines = [f"Architecture search under {result['budget']} (score: {result['score']}; winner **{result['winner']}**)", "",
             "| candidate | layers | hidden | ffn | heads | groups | params | quick val loss | KD score | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(result["candidates"], key=lambda c: c["quick_rank"]):
        kd = f"{c['kd_score']:.4f}" if "kd_score" in c else "-"
        lines.append(f"| {c['id']} | {c['num_layers']} | {c['hidden_size']} | {c['ffn_hidden_size']} | "
                     f"{c['num_attention_heads']} | {c['num_query_groups']} | {c['parameters'] / 1e6:.2f}M | "
                     f"{c['quick_score']:.4f} | {kd} | {'winner' if c['winner'] else ''} |")
    rho = result["rank_correlation"]
    lines += ["", f"Spearman rank correlation of the quick and KD rankings over the distilled candidates (+1: the "
                  f"same order): {'n/a' if rho is None else f'{rho:.3f}'}", ""]
    return "\n".join(lines)

