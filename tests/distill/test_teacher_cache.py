"""The teacher cache: written once at any layout (TP, PP, DP) and read at any layout with the same
targets, refused when it does not fit the run, resumed after a SIGKILL; KD from it at PP=2 gives
the PP=1 losses and validation (KD from it vs online top-K KD: tests/recipes/test_teacher_cache_training.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, torchrun
from workers.teacher_cache_worker import cached_kd

from nemo_neo.checkpoint.convert import convert_hf_to_neo
from nemo_neo.checkpoint.load import load_model
from nemo_neo.distill.cache_writer import write_teacher_cache
from nemo_neo.distill.teacher_cache import TeacherCache, TeacherCacheError, chunk_path, make_manifest
from nemo_neo.errors import UserError

WORKER = "tests/workers/teacher_cache_worker.py"
K, T, CHUNK = 8, 1.5, 3  # as the worker writes


@pytest.fixture(scope="module")
def setup(hf_model_factory, module_tmp, parallel_ctx):
    tmp = module_tmp("teacher_cache")
    convert_hf_to_neo(hf_model_factory("llama3_gqa_untied"), tmp / "teacher")
    convert_hf_to_neo(hf_model_factory("student_of_llama3"), tmp / "student")
    for name in ("teacher", "student"):
        (tmp / name / "tokenizer.json").write_text('{"model": "the shared one"}')
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 130, (10, 13), generator=g)  # 4 chunks, the last short
    valid = torch.randint(0, 130, (4, 13), generator=g)  # 2 validation chunks
    torch.save(rows, tmp / "rows.pt")
    torch.save(valid, tmp / "valid.pt")
    write_teacher_cache(parallel_ctx, tmp / "teacher", rows, tmp / "cache", K, T, chunk_samples=CHUNK,
                        micro_batch_size=2, progress=False, valid_samples=valid)
    return tmp, rows


def chunk_bytes(cache) -> dict:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("*chunk_*"))}  # both splits


def test_targets_are_the_teachers_top_k_log_probs_and_tail(setup, parallel_ctx):
    tmp, rows = setup
    teacher, _, _ = load_model(tmp / "teacher", parallel_ctx)
    with torch.no_grad():
        logits = teacher(rows[:, :-1], position_ids=None, attention_mask=None).double()
    log_p = torch.log_softmax(logits / T, dim=-1)
    got = TeacherCache(tmp / "cache").targets(torch.arange(len(rows)), rows)
    assert torch.equal(got.ids, logits.topk(K, dim=-1).indices)
    assert torch.allclose(got.log_probs.double(), log_p.gather(-1, got.ids), atol=1e-2, rtol=1e-3)  # float16
    tail = 1 - log_p.exp().gather(-1, got.ids).sum(-1)
    assert torch.allclose(got.log_tail.double().exp(), tail, rtol=1e-4)


def test_the_same_targets_at_dp1_dp2_and_tp2(setup, tmp_path):
    """Written at DP=2 the chunks are byte-identical to DP=1's; written at TP=2 they hold the same ids
    (values within float16 rounding); read through the sampler at DP=1, DP=2 and TP=2 every sample
    gets the same targets, which are its own (by index)."""
    tmp, rows = setup
    cache = TeacherCache(tmp / "cache")
    reads = {}
    for name, tp in (("dp2", 1), ("tp2", 2)):
        (tmp_path / name).mkdir()
        torchrun(WORKER, 2, "--rows", tmp / "rows.pt", "--valid", tmp / "valid.pt", "--teacher", tmp / "teacher",
                 "--write-to", tmp_path / f"cache_{name}", "--cache", tmp / "cache", "--out", tmp_path / name, "--tp", tp)
        reads[name] = {}
        for rank in (0, 1):
            reads[name].update(torch.load(tmp_path / name / f"rank{rank}.pt"))
    assert chunk_bytes(tmp_path / "cache_dp2") == chunk_bytes(tmp / "cache")
    assert_same_targets(TeacherCache(tmp_path / "cache_tp2"), cache, len(rows))
    assert sorted(reads["dp2"]) == sorted(reads["tp2"]) and len(reads["dp2"]) >= len(rows) - 2  # the same global batches
    for name, got in reads.items():
        for i, targets in got.items():
            for value, expected in zip(targets.values(), cache.targets([i])):
                assert torch.equal(value, expected[0]), (name, i)


def assert_same_targets(got: TeacherCache, ref: TeacherCache, num_train: int, num_valid: int = 4) -> None:
    """The same ids in both splits, the values within float16 rounding."""
    for split, n in (("train", num_train), ("valid", num_valid)):
        a, b = got.targets(torch.arange(n), split=split), ref.targets(torch.arange(n), split=split)
        assert torch.equal(a.ids, b.ids), split
        assert torch.allclose(a.log_probs.float(), b.log_probs.float(), atol=2e-3), split
        assert torch.allclose(a.log_tail, b.log_tail, atol=1e-4, rtol=1e-4), split


def test_pp2_writes_the_pp1_cache_and_distils_from_it_with_the_pp1_losses(setup, tmp_path, parallel_ctx):
    """One PP=2 launch: the teacher split over two stages writes the cache PP=1 wrote (both splits),
    and the student split over two stages (the sparse loss on the last) trains from the cache with the
    PP=1 losses and validation KL / LM loss (fp32: only the reduction order differs)."""
    tmp, rows = setup
    valid = torch.load(tmp / "valid.pt")
    torchrun(WORKER, 2, "--rows", tmp / "rows.pt", "--valid", tmp / "valid.pt", "--teacher", tmp / "teacher",
             "--write-to", tmp_path / "cache_pp2", "--pp", 2, "--student", tmp / "student", "--cache", tmp / "cache",
             "--train-out", tmp_path)
    assert_same_targets(TeacherCache(tmp_path / "cache_pp2"), TeacherCache(tmp / "cache"), len(rows))
    got = torch.load(tmp_path / "cached_kd.pt")
    ref = cached_kd(parallel_ctx, tmp / "student", tmp / "cache", rows, valid, tmp_path / "pp1")
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)  # KL ~1e-3 here: fp32 sums reordered
    for when in ("before", "after"):
        assert set(got[when]) == {"kl", "loss", "perplexity"}
        assert got[when] == pytest.approx(ref[when], rel=1e-4), when


def test_a_cache_for_another_run_is_refused_by_name(setup, tmp_path, parallel_ctx):
    tmp, rows = setup
    cache = TeacherCache(tmp / "cache")
    cache.check(rows, 130, tmp / "student", tmp / "teacher")  # the run it was made for
    with pytest.raises(TeacherCacheError, match="another dataset"):
        cache.check(torch.randint(0, 130, rows.shape), 130)
    with pytest.raises(TeacherCacheError, match="another sequence length"):
        cache.check(rows[:, :-2], 130)
    with pytest.raises(TeacherCacheError, match="another teacher checkpoint"):
        cache.check(rows, 130, teacher_ckpt=tmp / "student")
    shutil.copytree(tmp / "student", tmp_path / "other_tok")
    (tmp_path / "other_tok" / "tokenizer.json").write_text('{"model": "another"}')
    with pytest.raises(TeacherCacheError, match="another tokenizer"):
        cache.check(rows, 130, tmp_path / "other_tok")
    with pytest.raises(TeacherCacheError, match="other tokens"):  # same fingerprint probes, other rows read
        cache.targets([1], rows[[2]])
    shutil.copytree(tmp / "cache", tmp_path / "holed")
    chunk_path(tmp_path / "holed", 2).unlink()
    with pytest.raises(TeacherCacheError, match="chunk_000002.safetensors"):
        TeacherCache(tmp_path / "holed").check(rows, 130)
    with pytest.raises(TeacherCacheError, match="chunk_000002.safetensors is missing"):
        TeacherCache(tmp_path / "holed").targets([7])
    with pytest.raises(TeacherCacheError, match="top_k=131 must be between 1 and the teacher's vocab size 130"):
        make_manifest(tmp / "teacher", rows, 131, T)
    with pytest.raises(TeacherCacheError, match="another K"):  # resuming into a cache of other settings
        write_teacher_cache(parallel_ctx, tmp / "teacher", rows, tmp / "cache", K + 1, T, chunk_samples=CHUNK)
    assert issubclass(TeacherCacheError, UserError)


def test_sigkill_while_caching_then_the_same_command_equals_an_uninterrupted_cache(setup, tmp_path):
    tmp, _ = setup
    cmd = [sys.executable, str(REPO / WORKER), "--rows", str(tmp / "rows.pt"), "--valid", str(tmp / "valid.pt"),
           "--teacher", str(tmp / "teacher"),
           "--write-to", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run(cmd, env={**env, "NEMO_NEO_CHAOS_KILL": "cache_teacher:cache_chunk:2"}, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "cache").glob("chunk_*")] == ["chunk_000000.safetensors"]
    assert list((tmp_path / "cache").glob(".chunk_000001.safetensors.tmp-*"))  # killed inside the second write
    rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert chunk_bytes(tmp_path / "cache") == chunk_bytes(tmp / "cache")
    assert not list((tmp_path / "cache").glob(".*tmp*"))
