"""Run the recipe's stages in order inside one torchrun job (one node or several).

Every rank runs this; the layout (TP x PP, DP = world / (TP x PP)) comes from the config and is
validated against the world size first. A stage whose metrics.json exists is skipped, so rerunning
the same command after a crash or a SIGKILL continues where the run stopped (an interrupted
training stage resumes from its latest checkpoint).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from nemo_neo import chaos
from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.native import INDEX, is_neo_checkpoint, read_index
from nemo_neo.export.hf import is_hf_dir
from nemo_neo.parallel import ParallelContext, chunks, initialize
from nemo_neo.recipes import arch_search, plan_check
from nemo_neo.recipes import config as rc
from nemo_neo.recipes.default_teacher import default_teacher_checkpoint
from nemo_neo.recipes.run_dir import RunDirectory
from nemo_neo.recipes.stages import Recipe

log = logging.getLogger("nemo_neo.recipes")


def resolve_teacher(cfg: rc.RecipeConfig, ctx: ParallelContext, run: RunDirectory) -> Path:
    """The teacher checkpoint: the one named (nemo_neo, or a Hugging Face directory converted once
    into the run directory), or the embedded SmolLM2-135M-Instruct (converted once, cached)."""
    named = cfg.teacher_checkpoint
    if named and is_neo_checkpoint(named):
        return Path(named)
    if named and not is_hf_dir(named):
        raise rc.RecipeConfigError(f"teacher.checkpoint={named} is neither a nemo_neo checkpoint ({INDEX}) nor a "
                                   "Hugging Face directory (config.json + safetensors); point it at one of those")
    if named:
        out = run.root / "teacher"
        if ctx.is_main and not is_neo_checkpoint(out):
            convert_hf_to_neo(named, out, overwrite=True)
        dist.barrier()
        return out

    # one process per node converts (once, cached); the others wait for it, then look it up
    path = default_teacher_checkpoint() if ctx.local_rank == 0 else None
    dist.barrier()
    return path or default_teacher_checkpoint()


def run(cfg: DictConfig) -> dict:
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter group
    recipe_cfg = rc.build(cfg)  # typed once; names, modes, keys checked before any process group or model
    ctx = initialize(recipe_cfg.parallel)
    run_dir = RunDirectory(cfg.run_dir, ctx.is_main)
    state = run_dir.check(cfg)  # every rank checks before anyone writes
    dist.barrier()
    run_dir.record(cfg)
    if ctx.is_main:
        log.info("run_dir %s (%s): stages %s on %d rank(s), TP=%d PP=%d DP=%d", run_dir.root, state, list(cfg.stages),
                 ctx.world_size, ctx.tp_size, ctx.pp_size, ctx.dp_size)
    recipe = Recipe(recipe_cfg, ctx, run_dir, resolve_teacher(recipe_cfg, ctx, run_dir))
    plan_check.check_virtual_pipeline(recipe_cfg, recipe.teacher)
    plan_check.check_layout_fits(recipe_cfg, cfg.get("plan"), ctx.world_size, recipe.teacher)  # refuse a layout that cannot fit
    search = recipe_cfg.prune.search
    if search is not None and "prune" in recipe_cfg.stages and run_dir.done("prune") is None:
        # a budget nothing meets is one error line now, not after the stages before prune have run
        source = recipe_cfg.prune.input or recipe.teacher
        arch_search.check(search, read_index(source)[0], recipe_cfg.parallel.tensor_parallel,
                          recipe_cfg.parallel.pipeline_parallel)
    summary = {}
    for stage in rc.STAGES:
        if stage not in recipe_cfg.stages:
            continue
        done = run_dir.done(stage)
        if done is not None:
            if ctx.is_main:
                log.info("%s: already finished (%s), skipped", stage, run_dir.metrics_file(stage))
                if not recipe_cfg.keep_training_state:  # a run killed right after the record left them
                    run_dir.release_training_state(stage)
            summary[stage] = done
            continue
        start = time.perf_counter()
        chaos.set_stage(stage)
        if stage in rc.VIRTUAL_PIPELINE_STAGES:
            metrics = getattr(recipe, stage)()
        else:  # one model per rank: without the interleaved pipeline (parallel.virtual_pipeline)
            with chunks.one_chunk_per_rank(ctx) as recipe.ctx:
                metrics = getattr(recipe, stage)()
            recipe.ctx = ctx
        metrics["seconds"] = round(time.perf_counter() - start, 1)
        dist.barrier()  # every rank is past the stage before it is marked finished
        chaos.point("before_metrics")
        run_dir.finish(stage, metrics, keep_training_state=recipe_cfg.keep_training_state)
        dist.barrier()  # and later stages on every rank read the checkpoints it recorded
        summary[stage] = metrics
        if ctx.is_main:
            log.info("%s: done in %.0f s -> %s", stage, metrics["seconds"], run_dir.metrics_file(stage))
    if ctx.is_main:
        log.info("%s", headline(summary))
    return summary


def headline(summary: dict) -> str:
    """One readable line per model the run evaluated."""
    models = summary.get("evaluate", {}).get("models", {})
    if not models:
        return "finished: " + ", ".join(summary) if summary else "nothing to run"
    rows = [f"  {label:<32} {m.get('parameters', 0) / 1e6:7.1f}M params  val loss {m['loss']:.4f}  ppl {m['perplexity']:.2f}"
            for label, m in models.items()]
    return "validation loss per model:\n" + "\n".join(rows)
