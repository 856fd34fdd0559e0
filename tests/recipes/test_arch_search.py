"""Minitron's architecture search inside the recipe (prune.search) and on a checkpoint (nemo-neo-prune --search).

The real SmolLM2 teacher runs one small search end to end (3 candidates, top-2 distilled for one step
each, then the distill stage). The quick-score check (every candidate against pruning that shape
directly), SIGKILL / rerun and the command line use the tiny random teacher on SmolLM2's vocabulary
(tests/conftest.py `tiny_pair`), so that the whole set stays short; the lm-eval task score (slow: lm-eval
reads the task's files for every scored candidate) runs on the tiny teacher through the command line.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import REPO, SHARED_DATA, read_json
from test_recipe import env, recipe_cmd, run_recipe, tiny, user_error
from test_recipe_config import compose

from nemo_neo.chaos import ENV
from nemo_neo.checkpoint.native import load_full_state, read_index
from nemo_neo.cli.prune import main as prune_main
from nemo_neo.cli.prune import meta_parameter_count
from nemo_neo.prune.search import AXES, SearchError, arch_for
from nemo_neo.recipes import arch_search
from nemo_neo.recipes import config as rc
from nemo_neo.recipes.arch_search import ArchSearch, MeasureSpec, SearchConfig, checkpoint_loss, spearman
from nemo_neo.recipes.methods import MethodConfig
from nemo_neo.recipes.prune import prune_checkpoint
from nemo_neo.train.loop import TrainConfig

# the real teacher: 100M parameters by MLP, heads and query groups -> 3 candidates, the best 2 distilled
REAL = ["stages=[prune,distill]", "data.text_files=[{corpus}]", "data.seq_length=32", "data.max_valid_sequences=4",
        "prune.importance.num_samples=8", "prune.target=null", "prune.search.budget.params=100e6",
        "prune.search.axes=[ffn_hidden_size,num_attention_heads,num_query_groups]",
        "prune.search.multiple_of.ffn_hidden_size=128", "prune.search.top_k=2", "prune.search.kd_steps=1",
        "distill.train.steps=1", "distill.train.global_batch_size=2", "distill.train.micro_batch_size=2",
        "distill.train.eval_every=1", "distill.train.save_every=1"]
# the tiny teacher: 15k non-embedding parameters by MLP, heads and depth -> 3 candidates (one drops a layer)
TINY = ["stages=[prune,distill]", "prune.target=null", "prune.search.budget.non_embedding_params=15000",
        "prune.search.axes=[num_layers,ffn_hidden_size,num_attention_heads]", "prune.search.multiple_of.ffn_hidden_size=16",
        "prune.search.top_k=2", "prune.search.kd_steps=3", "distill.train.steps=2"]


def search_dir(run_dir):
    return run_dir / "prune" / "search"


def same_weights(a, b) -> bool:
    _, x, _ = load_full_state(a)
    _, y, _ = load_full_state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def real_run(module_tmp, tiny_pair):
    run_dir = module_tmp("real_search") / "run"
    args = [a.format(corpus=tiny_pair / "corpus.txt") for a in REAL]
    run_recipe(run_dir, *args)
    return run_dir, args


@pytest.mark.slow
def test_search_on_the_real_teacher_distils_the_best_scored_candidate(real_run, smollm2_ckpt):
    run_dir, _ = real_run
    result = read_json(search_dir(run_dir) / "results.json")
    cands = result["candidates"]
    assert len(cands) == 3 and all(c["parameters"] <= 100e6 for c in cands)
    teacher, _ = read_index(smollm2_ckpt)
    for c in cands:  # the count of every candidate is the meta-device build's
        total, non_embedding = meta_parameter_count(arch_for(teacher, {k: c[k] for k in AXES}).to_hf_config())
        assert (c["parameters"], c["non_embedding_parameters"]) == (total, non_embedding)
    distilled = [c for c in cands if "kd_score" in c]
    assert sorted(c["quick_rank"] for c in distilled) == [1, 2]  # the top-2 quick scores, and only they
    winner = min(distilled, key=lambda c: c["kd_score"])
    assert result["winner"] == winner["id"] and [c["id"] for c in cands if c["winner"]] == [winner["id"]]
    # the prune stage's student is the winner's pruned weights, and the distill stage starts from it
    prune = read_json(run_dir / "prune" / "metrics.json")
    assert prune["checkpoint"] == str(run_dir / "prune" / "student") and prune["winner"] == winner["id"]
    assert read_json(run_dir / "distill" / "metrics.json")["student_start"] == prune["checkpoint"]
    assert same_weights(run_dir / "prune" / "student", search_dir(run_dir) / winner["id"] / "pruned")
    assert read_index(run_dir / "prune" / "student")[0].num_parameters() == winner["parameters"]
    assert prune["validation"]["loss"] == pytest.approx(winner["quick_score"], rel=1e-6)
    table = (search_dir(run_dir) / "results.md").read_text()
    assert all(c["id"] in table for c in cands) and table.count("| - |") == 1 and "Spearman" in table
    assert result["rank_correlation"] in (1.0, -1.0)  # two distilled candidates: the ranks agree or not
    assert (search_dir(run_dir) / "search.png").stat().st_size > 10_000
    # released: the non-distilled candidate's pruned weights and every short run's training state
    loser = next(c for c in cands if "kd_score" not in c)
    assert not (search_dir(run_dir) / loser["id"] / "pruned").exists()
    assert not any((search_dir(run_dir) / c["id"] / "kd" / "checkpoints").exists() for c in distilled)


@pytest.fixture(scope="module")
def tiny_run(module_tmp, tiny_pair):
    run_dir = module_tmp("tiny_search") / "run"
    args = tiny(tiny_pair, *TINY)
    run_recipe(run_dir, *args)
    return run_dir, args


def test_quick_scores_equal_pruning_each_shape_directly(tiny_run, tiny_pair, parallel_ctx, tmp_path):
    """The prune stage's own path with each candidate as a fixed target (importance computed afresh;
    the depth candidate by its own contiguous-block search) gives the same loss on the same rows."""
    from nemo_neo.recipes.run_dir import RunDirectory
    from nemo_neo.recipes.stages import Recipe

    run_dir, args = tiny_run
    cfg = rc.build(compose(f"run_dir={run_dir}", *args))
    teacher_ckpt = tiny_pair / "teacher"
    train, valid = Recipe(cfg, parallel_ctx, RunDirectory(run_dir, True), teacher_ckpt).rows()
    teacher, _ = read_index(teacher_ckpt)
    cands = read_json(search_dir(run_dir) / "results.json")["candidates"]
    assert {c["kind"] for c in cands} == {"width", "depth"}
    for c in cands:
        target = {k: c[k] for k in AXES if c[k] != getattr(teacher, k)}
        report = prune_checkpoint(teacher_ckpt, tmp_path / c["id"], target, importance=cfg.prune.importance,
                                  ctx=parallel_ctx, calib_rows=train.rows(cfg.prune.importance.num_samples), valid_rows=valid)
        assert report.get("dropped_layers", []) == c["dropped_layers"]
        loss = checkpoint_loss(parallel_ctx, tmp_path / c["id"], valid, cfg.evaluate.micro_batch_size)["loss"]
        assert loss == pytest.approx(c["quick_score"], rel=1e-6), c["id"]


def test_sigkill_after_a_finished_candidate_then_rerun_skips_it(tiny_run, tmp_path):
    full, args = tiny_run
    killed = tmp_path / "killed"
    proc = subprocess.run(recipe_cmd(killed, *args), cwd=REPO, env={**env(), ENV: "prune:candidate_finished:1"},
                          start_new_session=True, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    done = sorted(search_dir(killed).glob("*/kd.json"))
    assert len(done) == 1 and not (killed / "prune" / "metrics.json").exists()
    finished = done[0].parent
    # its records and pruned weights (its short run's training state is released after the record)
    marks = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished.rglob("*")
             if p.is_file() and p.relative_to(finished).parts[0] != "kd"}

    run_recipe(killed, *args)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in marks} == marks  # the finished candidate: untouched
    a, b = (read_json(search_dir(r) / "results.json") for r in (full, killed))
    keys = ("id", "parameters", "quick_score", "quick_rank", "kd_score", "winner", "dropped_layers")
    assert [{k: c.get(k) for k in keys} for c in a["candidates"]] == [{k: c.get(k) for k in keys} for c in b["candidates"]]
    assert a["winner"] == b["winner"] and a["rank_correlation"] == b["rank_correlation"]
    assert read_json(killed / "distill" / "metrics.json")["student_start"] == str(killed / "prune" / "student")
    assert same_weights(full / "distill" / "student", killed / "distill" / "student")


# --- bad input: one line ------------------------------------------------------------------------


def test_a_budget_nothing_meets_is_one_line_naming_the_smallest_reachable_size(tiny_pair, tmp_path):
    proc = run_recipe(tmp_path / "r", *tiny(tiny_pair, *TINY, "prune.search.budget.non_embedding_params=100"), fails=True)
    line = user_error(proc)
    assert "no candidate meets non_embedding_params<=100" in line and "smallest reachable size" in line, line
    assert not (tmp_path / "r" / "prune").exists()


@pytest.mark.parametrize("override,needle", [
    ("+prune.search.budget.flops=1", "unknown budget(s) ['flops']"),
    ("+prune.search.top_kk=2", "prune.search: unknown key(s) ['top_kk']"),
    ("+prune.search.measure.steps=2", "prune.search.measure: unknown key(s) ['steps']"),
    ("prune.search.score=accuracy", "score='accuracy': use val_loss or task:<lm-eval task name>"),
    ("prune.search.score=task:", "score='task:': use val_loss or task:"),
    ("prune.search.max_width_pruning=1.5", "max_width_pruning=1.5 must be in [0, 1)"),
    ("prune.search.top_k=0", "top_k=0 must be >= 1"),
    ("prune.target.hidden_size=432", "prune.search chooses the pruned shape itself"),  # the preset's target kept
])
def test_bad_search_config_is_refused_by_name(override, needle):
    base = ("prune.search.budget.params=100e6",) + (() if override.startswith("prune.target") else ("prune.target=null",))
    with pytest.raises(rc.RecipeConfigError) as e:
        rc.build(compose(*base, override))
    assert needle in str(e.value), str(e.value)


def test_search_config_defaults_are_off_and_task_scores_are_accepted(smollm2_ckpt):
    assert rc.build(compose()).prune.search is None  # the default demo prunes to its fixed target
    cfg = rc.build(compose("prune.target=null", "prune.search.budget.params=1e8", "prune.search.score=task:neo_winogrande",
                           "prune.search.data_dir=../shared/data")).prune.search
    assert cfg.higher_is_better and cfg.budget == {"params": 1e8} and cfg.multiple_of == {}
    arch, _ = read_index(smollm2_ckpt)
    with pytest.raises(SearchError, match="lm-eval has no task 'no_such_task'"):
        arch_search.check(SearchConfig(budget={"params": 1e8}, score="task:no_such_task"), arch)
    assert len(arch_search.check(cfg, arch)) >= 1


def test_spearman_rank_correlation():
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == 0.8 and spearman([1], [2]) is None and spearman([1, 1], [1, 2]) is None


# --- on a checkpoint: the command line, and measured budgets ------------------------------------------


@pytest.mark.slow
def test_prune_search_on_a_checkpoint_scored_by_a_task_writes_the_winner_and_the_results(tiny_pair, tmp_path, capsys):
    """The command line on a checkpoint, with a measured latency budget and an lm-eval task as the KD score."""
    out = tmp_path / "student"
    assert prune_main(["--ckpt", str(tiny_pair / "teacher"), "--out", str(out), "--search",
                       "non_embedding_params=15000,latency_ms=1e6", "--search-axes", "ffn_hidden_size,num_attention_heads",
                       "--multiple-of", "ffn_hidden_size=16", "--calib-data", str(tiny_pair / "corpus.txt"),
                       "--num-samples", "8", "--seq-length", "16", "--top-k", "2", "--kd-steps", "1",
                       "--kd-batch-size", "2,2", "--measure", "8,2,1", "--score", "task:neo_winogrande",
                       "--task-limit", "4", "--data-dir", str(SHARED_DATA)]) == 0
    result = read_json(tmp_path / "student_search" / "results.json")
    cands = result["candidates"]
    assert [c["id"] for c in cands] == ["L2-h32-f48-a2-g2", "L2-h32-f32-a4-g2"]
    assert all(0 < c["measured"]["latency_ms"] <= 1e6 and c["measured"]["throughput"] > 0 for c in cands)
    assert result["higher_is_better"] and all(0 <= c["kd_score"] <= 1 for c in cands)  # accuracy on 4 documents
    best = max(cands, key=lambda c: (c["kd_score"], -c["quick_score"]))  # ties: the better quick score
    assert result["winner"] == best["id"]
    assert same_weights(out, tmp_path / "student_search" / result["winner"] / "pruned")
    assert result["winner"] in capsys.readouterr().out


def test_a_measured_budget_nothing_meets_names_the_best_measured(tiny_pair, tmp_path, parallel_ctx):
    cfg = SearchConfig(budget={"non_embedding_params": 15000, "throughput": 1e12}, axes=["ffn_hidden_size"], multiple_of={"ffn_hidden_size": 16},
                       measure=MeasureSpec(isl=8, osl=2))
    search = ArchSearch(parallel_ctx, cfg, tiny_pair / "teacher", tiny_pair / "teacher", None, None, None, tmp_path,
                        MethodConfig(), TrainConfig())
    with pytest.raises(SearchError, match=r"no candidate meets throughput=1e\+12 on this machine: the best measured"):
        search.candidates()
    assert not (tmp_path / "candidates.json").exists()


def test_a_search_directory_of_other_settings_is_refused(tiny_pair, tmp_path, parallel_ctx):
    (tmp_path / "candidates.json").write_text('{"fingerprint": "another", "candidates": []}')
    search = ArchSearch(parallel_ctx, SearchConfig(budget={"non_embedding_params": 15000}), tiny_pair / "teacher",
                        tiny_pair / "teacher", None, None, None, tmp_path, MethodConfig(), TrainConfig())
    with pytest.raises(SearchError, match="holds a search with other settings"):
        search.candidates()
