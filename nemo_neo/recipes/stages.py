"""The recipe's stages: correct -> prune -> distill -> evaluate -> export.

Each stage reads the checkpoints the earlier stages recorded in their metrics.json (or the one the
config names), writes its own checkpoint under <run_dir>/<stage>/, and returns its metrics; the
driver (`nemo_neo.recipes.driver`) skips stages that already finished and records the rest.
Every rank of the torchrun job calls every stage; file writes happen on the main rank only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from nemo_neo.checkpoint.load import build_for_context
from nemo_neo.checkpoint.native import link_model_files, read_index, save_distributed
from nemo_neo.data import build_gpt_datasets, default_corpus, indexed_from_text
from nemo_neo.distill.cache_writer import write_teacher_cache
from nemo_neo.eval.harness import accuracies, evaluate
from nemo_neo.export.fp8 import export_fp8
from nemo_neo.export.hf import export_hf
from nemo_neo.parallel import ParallelContext
from nemo_neo.prune.search import AXES
from nemo_neo.recipes import config as rc
from nemo_neo.recipes import plots
from nemo_neo.recipes.arch_search import ArchSearch, checkpoint_loss
from nemo_neo.recipes.default_teacher import cache_root
from nemo_neo.recipes.distill import distill
from nemo_neo.recipes.methods import train_student
from nemo_neo.recipes.prune import prune_checkpoint
from nemo_neo.recipes.run_dir import RunDirectory


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


class Recipe:
    """What the stages share: the parallel context, the run directory, the config and the data."""

    def __init__(self, cfg: rc.RecipeConfig, ctx: ParallelContext, run: RunDirectory, teacher_ckpt: Path):
        self.cfg, self.ctx, self.run = cfg, ctx, run
        self.teacher = Path(teacher_ckpt)
        self._rows = None

    # --- data: indexed once (cached across runs), read through megatron-core on every rank ----------
    def rows(self):
        """(train samples, validation rows): text files are tokenized once into the indexed format
        (held-out documents never in training), or Megatron indexed datasets are blended; both come
        back through megatron-core's GPTDataset. Collective: every rank calls it (one builder per node)."""
        if self._rows is None:
            from transformers import AutoTokenizer

            d = self.cfg.data
            tokenizer = AutoTokenizer.from_pretrained(str(self.teacher))
            # enough samples for the longest training stage; each stage reads from the first sample on
            samples = max(t.steps * t.global_batch_size for t in (self.cfg.correct.train, self.cfg.distill.train))
            cache = Path(d.index_cache) if d.index_cache else cache_root() / "indexed"
            if d.blend or d.blend_per_split:
                train, valid, _ = build_gpt_datasets(d.blend, d.blend_per_split, d.split if d.blend else None,
                                                     seq_length=d.seq_length, train_samples=samples,
                                                     valid_samples=None, seed=d.seed, tokenizer=tokenizer,
                                                     cache_dir=cache / "indices", mmap_bin_files=d.mmap_bin_files)
                valid = valid.rows(d.max_valid_sequences) if valid is not None else torch.empty(0, d.seq_length + 1,
                                                                                                dtype=torch.long)
            else:
                train, valid = indexed_from_text(list(d.text_files), tokenizer, d.seq_length, train_samples=samples,
                                                 valid_fraction=d.valid_fraction, max_valid=d.max_valid_sequences,
                                                 seed=d.seed, cache_dir=cache, mmap_bin_files=d.mmap_bin_files)
            self._rows = (train, valid)
        return self._rows

    # --- which checkpoint each stage starts from ----------------------------------------------------
    def _recorded(self, stage: str, key: str = "checkpoint") -> Path | None:
        done = self.run.done(stage)
        return Path(done[key]) if done and done.get(key) else None

    def corrected_teacher(self) -> Path:
        """The teacher later stages use: the corrected one when correction ran, else the original."""
        return self._recorded("correct") or self.teacher

    def student_start(self) -> Path:
        if self.cfg.distill.student:
            return Path(self.cfg.distill.student)
        pruned = self._recorded("prune")
        if pruned is None:
            raise rc.RecipeConfigError("the distill stage needs a student: run the prune stage first (stages=[..., prune, "
                                       "distill]) or name one with distill.student=<checkpoint>")
        return pruned

    def distill_teacher(self) -> Path:
        return Path(self.cfg.distill.teacher) if self.cfg.distill.teacher else self.corrected_teacher()

    # --- stages ------------------------------------------------------------------------------------
    def correct(self) -> dict:
        """Teacher correction: a light LM fine-tune of the teacher on the distillation data."""
        c = self.cfg.correct
        source = Path(c.input) if c.input else self.teacher
        if c.in_parallel:  # the teacher is corrected inside the distill stage instead
            return {"mode": "in_parallel", "checkpoint": None, "source": str(source)}

        train, valid = self.rows()
        out_dir = self.run.stage_dir("correct")
        result = train_student(self.ctx, c.method, source, None, train, valid, c.train, out_dir,
                               out_ckpt=out_dir / "teacher", **self.cfg.parallel.recompute_options)
        return {"mode": c.mode, "source": str(source), **result}

    def prune(self) -> dict:
        p = self.cfg.prune
        source = Path(p.input) if p.input else self.corrected_teacher()
        train, valid = self.rows()
        importance = p.importance
        out = self.run.stage_dir("prune") / "student"
        if p.search is not None:
            report = self._search(source, out, train.rows(importance.num_samples), valid)
        else:
            report = prune_checkpoint(source, out, dict(p.target or {}), drop=list(p.drop_layers or []) or None,
                                      num_samples=importance.num_samples, importance=importance,
                                      depth_metric=p.depth_metric, task_limit=p.task_limit, data_dir=p.data_dir,
                                      overwrite=True, ctx=self.ctx, calib_rows=train.rows(importance.num_samples),
                                      valid_rows=valid)
        if p.random_init:  # baseline: the pruned shape with fresh weights
            report["random_init"] = self._reinitialize(out)
        report["checkpoint"] = str(out)
        report["validation"] = self._validation_loss(out, "pruned student")
        return report

    def _search(self, source: Path, out: Path, calib, valid) -> dict:
        """Minitron's architecture search (nemo_neo.recipes.arch_search) in <run_dir>/prune/search; the
        winner's pruned weights become the stage's student, so the distill stage trains the winner."""
        p, d, par = self.cfg.prune, self.cfg.distill, self.cfg.parallel
        train, _ = self.rows()
        search = ArchSearch(self.ctx, p.search, source, self.distill_teacher(), train, valid, calib,
                            self.run.stage_dir("prune") / "search", d.method, d.train, p.importance,
                            depth_metric=p.depth_metric, eval_micro_batch_size=self.cfg.evaluate.micro_batch_size,
                            keep_training_state=self.cfg.keep_training_state, tp=par.tensor_parallel,
                            pp=par.pipeline_parallel)
        result = search.run(out)
        winner = next(c for c in result["candidates"] if c["winner"])
        return {"source": str(source), "search": str(search.work / "results.json"), "winner": winner["id"],
                "target": {k: winner[k] for k in AXES}, "dropped_layers": winner["dropped_layers"],
                "parameters": winner["parameters"], "seconds_search": result["seconds"]}

    def _reinitialize(self, ckpt: Path) -> int:
        from megatron.core import tensor_parallel

        arch, _ = read_index(ckpt)
        seed = self.cfg.parallel.seed
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        model = build_for_context(arch, self.ctx)  # megatron-core's init (normal, std 0.02)
        save_distributed(ckpt, arch, model, self.ctx, tokenizer_src=ckpt, metadata={"random_init": seed}, overwrite=True)
        return seed

    def _validation_loss(self, ckpt: Path, desc: str) -> dict:
        _, valid = self.rows()
        return checkpoint_loss(self.ctx, ckpt, valid, self.cfg.evaluate.micro_batch_size, desc=desc)

    def cache_teacher(self) -> dict:
        """The distill teacher's top-K targets of every training and validation sample, once, for the
        distill stage (the validation split gives its validation KL)."""
        c = self.cfg.cache_teacher
        train, valid = self.rows()
        out = Path(c.dir) if c.dir else self.run.stage_dir("cache_teacher") / "cache"
        return write_teacher_cache(self.ctx, self.distill_teacher(), train, out, c.top_k, c.temperature,
                                   c.chunk_samples, c.micro_batch_size, c.values_dtype, valid_samples=valid)

    def teacher_cache(self) -> Path | None:
        if self.cfg.distill.teacher_cache:
            return Path(self.cfg.distill.teacher_cache)
        return self._recorded("cache_teacher", "cache") if "cache_teacher" in self.cfg.stages else None

    def distill(self) -> dict:
        d = self.cfg.distill
        student, teacher = self.student_start(), self.distill_teacher()
        train, valid = self.rows()
        out_dir = self.run.stage_dir("distill")
        cache = self.teacher_cache()
        if cache is not None:
            result = train_student(self.ctx, d.method, student, teacher, train, valid, d.train, out_dir,
                                   out_ckpt=out_dir / "student", eval_micro_batch_size=self.cfg.evaluate.micro_batch_size,
                                   teacher_cache=cache, **self.cfg.parallel.recompute_options)
        elif self.cfg.correct.in_parallel:
            c = self.cfg.correct.train.optim
            result = distill(self.ctx, student, teacher, train, valid, d.train, out_dir, d.loss,
                             self.cfg.evaluate.micro_batch_size, correct_teacher_lr=(c.lr, c.min_lr),
                             **self.cfg.parallel.recompute_options)
            # the final student and teacher as models of their own (hard links): they outlive the
            # training checkpoints, which are released once the stage is finished
            for key, name in (("checkpoint", "student"), ("teacher_checkpoint", "teacher")):
                if self.ctx.is_main:
                    link_model_files(result[key], out_dir / name, overwrite=True)
                result[key] = str(out_dir / name)
            _barrier(self.ctx)
        else:
            result = train_student(self.ctx, d.method, student, teacher, train, valid, d.train, out_dir,
                                   out_ckpt=out_dir / "student", eval_micro_batch_size=self.cfg.evaluate.micro_batch_size,
                                   **self.cfg.parallel.recompute_options)
        return {"method": "kd+correction" if self.cfg.correct.in_parallel else d.method.method, "student_start": str(student),
                "teacher": str(teacher), **result}

    def evaluate(self) -> dict:
        """Validation loss of every model the run produced (same rows), lm-eval tasks if asked, plots."""
        models = {"teacher": self.teacher}
        for label, stage, key in (("corrected teacher", "correct", "checkpoint"), ("pruned student", "prune", "checkpoint"),
                                  ("distilled student", "distill", "checkpoint"),
                                  ("teacher corrected in parallel", "distill", "teacher_checkpoint")):
            path = self._recorded(stage, key)
            if path is not None:
                models[label] = path
        results = {}
        for label, path in models.items():
            results[label] = {"checkpoint": str(path), **self._validation_loss(path, f"{label} validation")}
            if self.cfg.evaluate.tasks:
                results[label]["tasks"] = self._tasks(path)
        if self.ctx.is_main:
            out = self.run.stage_dir("evaluate")
            plots.comparison(results, out / "comparison.png")
            plots.loss_curves(self.run.root, out / "loss_curves.png")
        return {"models": results}

    def _tasks(self, ckpt: Path) -> dict:
        from nemo_neo.eval.lm_eval_model import NeoLM

        e = self.cfg.evaluate
        lm = NeoLM(checkpoint=str(ckpt), ctx=self.ctx, batch_size=e.micro_batch_size)
        results = evaluate(tasks=list(e.tasks), limit=e.task_limit, data_dir=e.data_dir, lm=lm, include_defaults=False)
        return accuracies(results) if results is not None else {}

    def export(self) -> dict:
        x = self.cfg.export
        source = Path(x.input) if x.input else (self._recorded("distill") or self._recorded("prune"))
        if source is None:
            raise rc.RecipeConfigError("the export stage needs a model: run distill (or prune) first, or name one with "
                                       "export.input=<checkpoint>")
        out_dir = self.run.stage_dir("export")
        report = {"source": str(source)}
        if self.ctx.is_main:
            report["hf"] = export_hf(source, out_dir / "hf", dtype=x.dtype, overwrite=True)
            if x.fp8:
                calib = list(self.cfg.data.text_files) or [self._default_text_file(out_dir)]
                report["fp8"] = export_fp8(source, out_dir / "fp8", calib, calib_samples=x.fp8_calib_samples,
                                           calib_seq_len=self.cfg.data.seq_length, overwrite=True)
        _barrier(self.ctx)
        report["checkpoint"] = str(out_dir / "hf")
        return report

    @staticmethod
    def _default_text_file(out_dir: Path) -> Path:
        path = out_dir / "calibration.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(default_corpus())
        return path
