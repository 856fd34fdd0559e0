"""The end-to-end recipe, `torchrun examples/prune_distill.py`, as a user launches it.

The real-teacher test runs the README's CPU default at reduced steps; the others use a tiny random
teacher with SmolLM2's tokenizer (tests/conftest.py `tiny_pair`) so multi-node, SIGKILL-resume and
bad-input checks stay fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, kill_tree, read_json

from nemo_neo.checkpoint.native import load_full_state

APP = REPO / "examples" / "prune_distill.py"


def recipe_cmd(run_dir, *overrides, nproc: int = 1, launcher=()) -> list[str]:
    launch = list(launcher) or [f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(APP), f"run_dir={run_dir}", *map(str, overrides)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_recipe(run_dir, *overrides, nproc: int = 1, fails: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(recipe_cmd(run_dir, *overrides, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)
    if (proc.returncode != 0) != fails:
        pytest.fail(f"recipe exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def user_error(proc) -> str:
    """The recipe's own one-line error. torchrun then reports the failed worker (its agent's
    ChildFailedError); no traceback may come from our code: no frame of a file of the package or of
    the app. (Matched on the package's own path, not on "nemo_neo/": a checkout named nemo_neo has
    that in every path, its venv's python included.)"""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-4000:]
    ours = (f'File "{REPO / "nemo_neo"}/', f'File "{APP}"')
    assert not any(frame in proc.stderr for frame in ours), proc.stderr[-4000:]
    return lines[0]


def tiny(pair: Path, *extra) -> list[str]:
    """The CPU preset scaled to the tiny teacher (hidden 32, MLP 64, 2 layers)."""
    return [f"teacher.checkpoint={pair / 'teacher'}", f"data.text_files=[{pair / 'corpus.txt'}]", "data.seq_length=16",
            "data.max_valid_sequences=8", "prune.target.hidden_size=24", "prune.target.ffn_hidden_size=32",
            "prune.importance.num_samples=16", "correct.train.steps=4", "correct.train.save_every=2",
            "correct.train.eval_every=2", "distill.train.steps=12", "distill.train.save_every=3",
            "distill.train.eval_every=6", "distill.train.lr=1e-3", *extra]


def losses(log: Path) -> dict[int, float]:
    """step -> loss from a Trainer log; a resumed run re-logs the steps after its checkpoint, the last wins."""
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


# --- the CPU default on the real teacher ------------------------------------------------------


@pytest.mark.slow
def test_cpu_default_recipe_end_to_end_on_real_teacher(tmp_path, smollm2_ckpt):
    run_dir = tmp_path / "run"
    run_recipe(run_dir, "correct.train.steps=4", "correct.train.eval_every=4", "distill.train.steps=10",
               "distill.train.eval_every=10", "prune.importance.num_samples=16", "data.max_valid_sequences=8")
    models = read_json(run_dir / "evaluate" / "metrics.json")["models"]
    # teacher correction lowers the teacher's loss on (held-out) distillation data
    assert models["corrected teacher"]["loss"] < models["teacher"]["loss"], models
    # distillation repairs the pruned student
    assert models["distilled student"]["loss"] < models["pruned student"]["loss"], models
    assert models["distilled student"]["parameters"] < 0.6 * models["teacher"]["parameters"]
    prune = read_json(run_dir / "prune" / "metrics.json")
    assert prune["source"] == str(run_dir / "correct" / "teacher")  # pruned from the corrected teacher
    distill = read_json(run_dir / "distill" / "metrics.json")
    assert distill["teacher"] == str(run_dir / "correct" / "teacher")
    for png in ("comparison.png", "loss_curves.png"):
        assert (run_dir / "evaluate" / png).stat().st_size > 10_000
    assert any((run_dir / "distill" / "tensorboard").iterdir())
    # the exported student loads in transformers and scores like the distilled checkpoint
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "hf", dtype=torch.float32)
    assert hf.num_parameters() == models["distilled student"]["parameters"]


# --- one node or two: same losses -------------------------------------------------------------


def test_two_agents_on_loopback_train_the_same_losses_as_one_agent(tiny_pair, tmp_path):
    one = tmp_path / "one"
    run_recipe(one, *tiny(tiny_pair, "stages=[correct,prune,distill]"), nproc=2)
    two = tmp_path / "two"
    port = free_port()
    agents = [subprocess.Popen(recipe_cmd(two, *tiny(tiny_pair, "stages=[correct,prune,distill]"), launcher=(
        "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}")),
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [a.communicate(timeout=900)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    for stage, name in (("correct", "sft"), ("distill", "distill")):
        a, b = losses(one / stage / f"{name}_log.jsonl"), losses(two / stage / f"{name}_log.jsonl")
        assert len(a) == (4 if stage == "correct" else 12)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), stage
    assert read_json(two / "distill" / "metrics.json")["final"]["val_loss"] == pytest.approx(
        read_json(one / "distill" / "metrics.json")["final"]["val_loss"], rel=1e-6)


def test_recipe_at_tp2_pp2_matches_one_process(tiny_pair, tmp_path):
    """Correction, importance pruning and distillation sharded 2 x 2 give the single-process run."""
    args = tiny(tiny_pair, "stages=[correct,prune,distill]", "correct.train.steps=3", "distill.train.steps=4")
    run_recipe(tmp_path / "single", *args)
    run_recipe(tmp_path / "tp2pp2", *args, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", nproc=4)
    for stage, name in (("correct", "sft"), ("distill", "distill")):
        a, b = (losses(tmp_path / r / stage / f"{name}_log.jsonl") for r in ("single", "tp2pp2"))
        # the KD losses are ~2e-3 here (a student pruned from its teacher): fp32 sums over a 49152-token
        # vocabulary in another order differ by ~2e-7, which is 1e-4 of such a loss (this CPU: 1.3e-4)
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-4, abs=1e-6), stage
    _, a, _ = load_full_state(tmp_path / "single" / "prune" / "student")
    _, b, _ = load_full_state(tmp_path / "tp2pp2" / "prune" / "student")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # same units pruned from the same corrected teacher


# --- SIGKILL during distillation, then the same command -------------------------------------


def test_sigkill_during_distillation_then_rerun_resumes_to_the_same_result(tiny_pair, tmp_path):
    args = tiny(tiny_pair, "stages=[correct,prune,distill]", "distill.train.steps=30")
    full = tmp_path / "full"
    run_recipe(full, *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(recipe_cmd(killed, *args), cwd=REPO, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "distill" / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (latest.is_file() and json.loads(latest.read_text())["step"] >= 6):
        time.sleep(0.05)
    kill_tree(proc)
    assert latest.is_file(), "distillation never wrote a checkpoint"
    assert not (killed / "distill" / "metrics.json").exists(), "distillation finished before it could be killed"
    killed_at = json.loads(latest.read_text())["step"]
    earlier = {s: (killed / s / "metrics.json").stat().st_mtime_ns for s in ("correct", "prune")}

    proc = run_recipe(killed, *args)
    assert "correct: already finished" in proc.stderr + proc.stdout
    assert {s: (killed / s / "metrics.json").stat().st_mtime_ns for s in earlier} == earlier  # not redone
    resumed = read_json(killed / "distill" / "metrics.json")
    assert resumed["resumed_from"] == killed_at
    assert losses(killed / "distill" / "distill_log.jsonl") == losses(full / "distill" / "distill_log.jsonl")
    _, a, _ = load_full_state(full / "distill" / "student")
    _, b, _ = load_full_state(killed / "distill" / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- teacher correction in parallel with distillation ------------------------------------------


def test_teacher_corrected_in_parallel_while_student_distills(tiny_pair, tmp_path):
    run_dir = tmp_path / "par"
    run_recipe(run_dir, *tiny(tiny_pair, "stages=[correct,prune,distill,evaluate]", "correct.in_parallel=true",
                              "correct.train.lr=1e-3", "correct.train.min_lr=1e-4"))
    assert read_json(run_dir / "correct" / "metrics.json")["mode"] == "in_parallel"
    assert read_json(run_dir / "prune" / "metrics.json")["source"] == str(tiny_pair / "teacher")  # uncorrected
    log = [json.loads(line) for line in (run_dir / "distill" / "distill_log.jsonl").read_text().splitlines()]
    # the teacher learned its LM loss meanwhile: its training loss falls (each step sees other rows, so
    # the first and last thirds are compared, not two single batches) and so does its held-out loss below
    third = len(log) // 3
    mean = lambda rows: sum(r["teacher_loss"] for r in rows) / len(rows)  # noqa: E731
    assert mean(log[-third:]) < mean(log[:third])
    models = read_json(run_dir / "evaluate" / "metrics.json")["models"]
    assert models["teacher corrected in parallel"]["loss"] < models["teacher"]["loss"]
    assert models["distilled student"]["loss"] < models["pruned student"]["loss"]
    # the KD term sees the teacher as it is at that step: step 1 equals plain KD from the same start
    plain = tmp_path / "plain"
    run_recipe(plain, *tiny(tiny_pair, "stages=[distill]", f"distill.student={run_dir / 'prune' / 'student'}",
                            "distill.train.steps=2"))
    first = losses(plain / "distill" / "distill_log.jsonl")
    assert log[0]["loss"] == pytest.approx(first[1], rel=1e-6)
    _, original, _ = load_full_state(tiny_pair / "teacher")
    _, corrected, _ = load_full_state(read_json(run_dir / "distill" / "metrics.json")["teacher_checkpoint"])
    assert not torch.equal(original["embedding.word_embeddings.weight"], corrected["embedding.word_embeddings.weight"])


# --- bad input: one clear line, exit 2, nothing lost -----------------------------------------


def test_unknown_stage_is_refused_by_name(tmp_path):
    proc = run_recipe(tmp_path / "r", "stages=[prune,distil]", fails=True)
    assert "unknown stage(s) ['distil']" in user_error(proc)
    assert not (tmp_path / "r" / "run.json").exists()


def test_unknown_preset_lists_the_available_ones(tmp_path):
    proc = run_recipe(tmp_path / "r", "preset=minitron_llama_8b", fails=True)
    assert "Could not find 'preset/minitron_llama_8b'" in proc.stderr and "smollm2_cpu" in proc.stderr


def test_world_size_not_divisible_by_tp_times_pp(tmp_path):
    proc = run_recipe(tmp_path / "r", "parallel.tensor_parallel=2", "stages=[evaluate]", nproc=3, fails=True)
    assert "world size 3 is not divisible by tensor_parallel x pipeline_parallel = 2 x 1" in user_error(proc)


def test_run_dir_of_another_run_is_refused_unless_resumed(tiny_pair, tmp_path):
    run_dir = tmp_path / "r"
    run_recipe(run_dir, *tiny(tiny_pair, "stages=[prune]"))
    pruned = (run_dir / "prune" / "metrics.json").read_bytes()
    proc = run_recipe(run_dir, *tiny(tiny_pair, "stages=[prune]", "prune.target.ffn_hidden_size=48"), fails=True)
    assert "holds the results of another run" in user_error(proc) and "resume=true" in user_error(proc)
    assert (run_dir / "prune" / "metrics.json").read_bytes() == pruned  # nothing lost
    run_recipe(run_dir, *tiny(tiny_pair, "stages=[prune]", "prune.target.ffn_hidden_size=48", "resume=true"))
    run_recipe(run_dir, *tiny(tiny_pair, "stages=[prune]"), "resume=true")  # and back: finished stages stay


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "is not UTF-8 text: byte 0 (0x89)"),
    (b"", "hold no non-empty documents"),
    (b"Too short.", "fewer than one sample"),
])
def test_bad_text_file_is_one_line_naming_it(tiny_pair, tmp_path, content, needle):
    """A binary, an empty and a too-short text file: one `error:` line naming the file, no traceback
    (they used to end in a UnicodeDecodeError, or inside Hydra's stack trace)."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    proc = run_recipe(tmp_path / "r", *tiny(tiny_pair, "stages=[correct]"), f"data.text_files=[{bad}]", fails=True)
    line = user_error(proc)
    assert needle in line and str(bad) in line, line
    assert not (tmp_path / "r" / "correct" / "metrics.json").exists()
