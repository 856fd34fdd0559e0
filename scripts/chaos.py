"""Chaos at random moments (not in CI): SIGKILL the recipe's torchrun job at random times, rerun the same
command until it finishes, compare with an uninterrupted run.

    PYTHONPATH=. python scripts/chaos.py --kills 20 --seed 0 [--work DIR] [--nproc 1] [--one-rank]

Builds the tiny random teacher on SmolLM2's tokenizer (as tests/conftest.py `tiny_pair`; needs the
embedded SmolLM2 and ../shared/data), runs the recipe once through (every stage, the test's tiny
settings) and times it, then runs it again in a fresh run directory, killing the torchrun agent and
all its workers (SIGKILL) after a random delay drawn from [0, that time], over and over, rerunning the
same command, until one launch finishes. It prints where each kill landed (stage, checkpoint and
logged step, inside a save or not: read off the run directory) and compares every record with the
uninterrupted run (tests/chaos_support.py). A run that finished before its kills were used up starts
another round in a new run directory, until --kills kills have landed. Exit status 1 on any difference.
--one-rank (with --nproc >= 2) kills one worker only, drawn at random, instead of the whole job: the
job must then end by itself (torchrun's agent stops the other ranks) within --hang-timeout seconds,
else it counts as a hang (killed, reported, exit status 1).
The seeded kill points of tests/recipes/test_chaos.py are the deterministic counterpart.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "recipes")]

from chaos_support import differences, landing, records  # noqa: E402
from conftest import SHARED_DATA, kill_tree, make_hf_model  # noqa: E402
from test_recipe import env, recipe_cmd, tiny  # noqa: E402

from nemo_neo.chaos import children  # noqa: E402


def tiny_pair(work: Path) -> Path:
    from nemo_neo.checkpoint.convert import convert_hf_to_neo
    from nemo_neo.recipes.default_teacher import default_teacher_checkpoint

    pair = work / "pair"
    if not (pair / "teacher").is_dir():
        smol = default_teacher_checkpoint()
        convert_hf_to_neo(make_hf_model("tiny_teacher_smol_vocab", work / "hf_teacher"), pair / "teacher")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smol / f, pair / "teacher" / f)
        (pair / "corpus.txt").write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[:60000])
    return pair


def launch(run_dir: Path, args: list[str], nproc: int, kill_after: float | None, one_rank: random.Random | None = None,
           hang_timeout: float = 120.0) -> tuple[bool, str]:
    """One launch of the recipe; (finished: exit 0 before any kill, what was killed)."""
    proc = subprocess.Popen(recipe_cmd(run_dir, *args, nproc=nproc), cwd=REPO, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        ranks = children(proc.pid) if one_rank is not None else []
        if not ranks:  # the whole job (or the workers are not up yet: then the agent and all below it)
            kill_tree(proc)
            proc.communicate()
            return False, "whole job"
        victim = one_rank.choice(sorted(ranks))
        os.kill(victim, signal.SIGKILL)
        try:
            proc.communicate(timeout=hang_timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.communicate()
            return False, f"one worker (pid {victim}): HANG, the job did not end within {hang_timeout:.0f} s"
        if proc.returncode == 0:  # the worker had already finished its part
            return True, "one worker, after it was done"
        return False, f"one worker (pid {victim}); the job ended with exit {proc.returncode}"
    if proc.returncode != 0:
        sys.exit(f"the recipe failed (exit {proc.returncode}) in {run_dir}:\n{err[-4000:]}")
    return True, ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one, removed)")
    p.add_argument("--one-rank", action="store_true", help="kill one worker at a time, not the whole job")
    p.add_argument("--hang-timeout", type=float, default=120.0)
    p.add_argument("--delays", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="draw kill delays from [LO, HI] s (default [0, the uninterrupted run's time]); on a loaded "
                        "machine startup alone can outlast that, and every kill then lands before training")
    a = p.parse_args()
    if a.one_rank and a.nproc < 2:
        p.error("--one-rank needs --nproc >= 2")
    rng = random.Random(a.seed)
    victims = random.Random(a.seed + 1) if a.one_rank else None
    work = a.work or Path(tempfile.mkdtemp(prefix="nemo_neo_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    args = tiny(tiny_pair(work))
    t0 = time.perf_counter()
    launch(work / "full", args, a.nproc, None)
    span = time.perf_counter() - t0
    lo, hi = a.delays or (0.0, span)
    print(f"uninterrupted run: {span:.1f} s; kills drawn from [{lo:.1f}, {hi:.1f}] s after each launch (seed {a.seed})")
    reference = records(work / "full")
    kills, failed, hangs, rnd = 0, 0, 0, 0
    while kills < a.kills:
        rnd += 1
        run_dir = work / f"chaos_{rnd}"
        launches = 0
        while True:
            launches += 1
            # no kill once every stage is recorded (the process was only exiting)
            done = landing(run_dir) == "after the last stage" if run_dir.is_dir() else False
            delay = rng.uniform(lo, hi) if kills < a.kills and not done else None
            finished, what = launch(run_dir, args, a.nproc, delay, victims, a.hang_timeout)
            if finished:
                break
            kills += 1
            hangs += "HANG" in what
            print(f"kill {kills:3d} (round {rnd}, launch {launches}, after {delay:5.1f} s, {what}): {landing(run_dir)}",
                  flush=True)
        diff = differences(reference, records(run_dir))
        failed += bool(diff)
        print(f"round {rnd}: finished after {launches} launch(es); "
              + (f"DIFFERS from the uninterrupted run: {diff}" if diff else "same records as the uninterrupted run"),
              flush=True)
    print(f"{kills} kills in {rnd} round(s): {'all rounds equal' if not failed else f'{failed} round(s) differ'}"
          + (f"; {hangs} hang(s)" if hangs else ""))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed or hangs else 0


if __name__ == "__main__":
    sys.exit(main())
