"""KD and LLM-Neo from a teacher cache reproduce online top-K (+ tail) KD step by step, without the
teacher's weights, and its validation KL (the cache's validation split); the recipe's keys for it
are typed and checked."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file, save_file
from test_recipe_config import compose

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.distill.cache_writer import write_teacher_cache
from nemo_neo.distill.losses import KDLossConfig
from nemo_neo.distill.objective import distillation_metrics
from nemo_neo.distill.teacher_cache import MANIFEST, TeacherCacheError
from nemo_neo.errors import ConfigError
from nemo_neo.peft.apply import LoRAConfig
from nemo_neo.recipes import config as rc
from nemo_neo.recipes import distill as recipe_distill
from nemo_neo.recipes.methods import MethodConfig, train_student
from nemo_neo.train.loop import TrainConfig
from nemo_neo.train.optim import OptimConfig

K, T = 8, 1.5


@pytest.fixture(scope="module")
def setup(hf_model_factory, module_tmp, parallel_ctx):
    tmp = module_tmp("cached_kd")
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), tmp / "teacher")
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), tmp / "student")
    sharpen(tmp / "teacher")
    g = torch.Generator().manual_seed(5)
    rows, valid = torch.randint(0, 130, (16, 13), generator=g), torch.randint(0, 130, (4, 13), generator=g)
    write_teacher_cache(parallel_ctx, tmp / "teacher", rows, tmp / "cache", K, T, chunk_samples=4, progress=False,
                        valid_samples=valid)
    return tmp, rows, valid


def sharpen(ckpt, factor: float = 25.0) -> None:
    """A random model's next-token distribution is nearly uniform (KL ~ 1e-3, the size of float16's
    rounding); a scaled output layer gives the teacher a peaked one, as a trained model has."""
    for path in ckpt.glob("*.safetensors"):
        state = load_file(path)
        if "output_layer.weight" in state:
            state["output_layer.weight"] = state["output_layer.weight"] * factor
            save_file(state, path)


def train(setup, ctx, method, run, loss, **kw):
    tmp, rows, valid = setup
    valid = kw.pop("valid", valid)
    cfg = TrainConfig(steps=3, global_batch_size=4, micro_batch_size=2, save_every=100, eval_every=100,
                      optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0))
    result = train_student(ctx, MethodConfig(method=method, loss=loss, lora=LoRAConfig(rank=4, alpha=8.0)), tmp / "student", kw.pop("teacher", tmp / "teacher"),
                           rows, valid, cfg, tmp / run, **kw)
    return [r["loss"] for r in result["history"]], result


@pytest.mark.parametrize("method", ["kd", "llm_neo"])
def test_kd_from_the_cache_reproduces_online_top_k_kd(setup, parallel_ctx, method, monkeypatch):
    loss = KDLossConfig(kind="forward_kl", temperature=T, top_k=K)
    online, _ = train(setup, parallel_ctx, method, f"{method}_online", loss)
    loaded = []
    real_load = recipe_distill.load_model
    monkeypatch.setattr(recipe_distill, "load_model", lambda ckpt, *a, **k: loaded.append(ckpt) or real_load(ckpt, *a, **k))
    cached, result = train(setup, parallel_ctx, method, f"{method}_cached", replace_top_k(loss, None),
                           teacher_cache=setup[0] / "cache")
    assert loaded == [setup[0] / "student"]  # no teacher weights
    assert cached == pytest.approx(online, rel=2e-3)  # float16 log-probs in the cache
    if method == "kd":  # the comparison can tell top-K from full KD
        full, _ = train(setup, parallel_ctx, method, f"{method}_full", replace_top_k(loss, None))
        assert abs(full[0] - online[0]) > 1e-2 * abs(online[0])
    # validation: the online top-K + tail KL of the same student (before and after), from the teacher's logits
    for when, student in (("before", setup[0] / "student"), ("after", setup[0] / f"{method}_cached" / "final")):
        online_val = online_validation(setup, parallel_ctx, student, loss)
        assert result[when]["kl"] == pytest.approx(online_val["kl"], rel=2e-3), when  # float16 log-probs
        assert result[when]["loss"] == pytest.approx(online_val["loss"], rel=1e-5), when
    if method == "kd":  # the student it measures changed (LoRA's few steps move it less)
        assert result["before"]["kl"] != pytest.approx(result["after"]["kl"], rel=5e-3)


def online_validation(setup, ctx, student_ckpt, loss) -> dict:
    tmp, _, valid = setup
    pair, _ = recipe_distill.build_pair(ctx, student_ckpt, tmp / "teacher")
    return distillation_metrics(pair, ctx, valid, 4, kl_config=loss)


def test_a_cache_without_the_validation_split(setup, parallel_ctx, tmp_path, caplog):
    """An old cache (no validation split) trains and validates on the LM loss alone, with a warning
    saying how to add the split; rerunning the writer adds it and leaves the training chunks as
    they were; validation rows other than the cached ones are refused."""
    tmp, rows, valid = setup
    old = tmp_path / "old"
    shutil.copytree(tmp / "cache", old)
    for path in old.glob("valid_chunk_*"):
        path.unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["valid"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    loss = KDLossConfig(kind="forward_kl", temperature=T)
    with caplog.at_level(logging.WARNING, logger="nemo_neo.recipes"):
        _, result = train(setup, parallel_ctx, "kd", "old_cache", loss, teacher_cache=old)
    assert set(result["after"]) == {"loss", "perplexity"}
    assert "has no validation split" in caplog.text
    train_chunks = {p.name: p.stat().st_mtime_ns for p in old.glob("chunk_*")}
    write_teacher_cache(parallel_ctx, tmp / "teacher", rows, old, K, T, chunk_samples=4, progress=False,
                        valid_samples=valid)
    assert {p.name: p.stat().st_mtime_ns for p in old.glob("chunk_*")} == train_chunks
    assert sorted(p.name for p in old.glob("valid_chunk_*")) == sorted(p.name for p in (tmp / "cache").glob("valid_chunk_*"))
    with pytest.raises(TeacherCacheError, match="another validation set"):
        train(setup, parallel_ctx, "kd", "other_valid", loss, teacher_cache=old, valid=valid.flip(0))


def replace_top_k(loss, top_k):
    from dataclasses import replace

    return replace(loss, top_k=top_k)


def test_a_loss_the_cache_cannot_serve_is_refused(setup, parallel_ctx):
    with pytest.raises(ConfigError, match="temperature 1.0 differs from the cache's 1.5"):
        train(setup, parallel_ctx, "kd", "bad_t", KDLossConfig(), teacher_cache=setup[0] / "cache")
    with pytest.raises(ConfigError, match="top_k=9, more than the 8 cached"):
        train(setup, parallel_ctx, "kd", "bad_k", KDLossConfig(temperature=T, top_k=9), teacher_cache=setup[0] / "cache")


def test_recipe_keys():
    cfg = rc.build(compose("distill.teacher_cache=/c", "distill.method=llm_neo"))
    assert cfg.distill.teacher_cache == "/c" and "cache_teacher" not in cfg.stages
    staged = rc.build(compose("stages=[cache_teacher,distill]", "cache_teacher.top_k=16", "distill.loss.temperature=2.0"))
    assert (staged.cache_teacher.top_k, staged.cache_teacher.temperature) == (16, 2.0)
    with pytest.raises(rc.RecipeConfigError, match="kd or llm_neo, not 'sft'"):
        rc.build(compose("distill.teacher_cache=/c", "distill.method=sft"))


@pytest.mark.slow
def test_cli_writes_the_cache_and_the_recipe_distils_from_it(tiny_pair, tmp_path):
    """nemo-neo-cache-teacher writes <run_dir>/cache_teacher; `stages=[prune,cache_teacher,distill]`
    in that run_dir skips the finished stage and distils from its cache with the top-K loss the
    online run computes (llm_neo, the same steps)."""
    from test_recipe import losses, run_recipe, tiny

    args = tiny(tiny_pair, "distill.method=llm_neo", "distill.lora.rank=4", "distill.lora.alpha=8",
                "distill.train.steps=3", "cache_teacher.top_k=16", "cache_teacher.chunk_samples=8")
    cli = subprocess.run([sys.executable, str(REPO / "tools" / "cache_teacher.py"), f"run_dir={tmp_path / 'cached'}", *args],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    run_recipe(tmp_path / "cached", *args, "stages=[prune,cache_teacher,distill]")
    run_recipe(tmp_path / "online", *args, "stages=[prune,distill]", "distill.loss.top_k=16")
    metrics = json.loads((tmp_path / "cached" / "distill" / "metrics.json").read_text())
    assert metrics["teacher_cache"] == str(tmp_path / "cached" / "cache_teacher" / "cache")
    cached, online = (losses(tmp_path / r / "distill" / "distill_log.jsonl") for r in ("cached", "online"))
    assert cached.keys() == online.keys() and cached == pytest.approx(online, rel=2e-3)
