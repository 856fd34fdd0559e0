"""Chaos at random moments (not in CI): SIGKILL the recipe's torchrun job at random times, rerun the same
command until it finishes, compare with an uninterrupted run.

    PYTHONPATH=. python scripts/chaos.py --kills 20 --seed 0 [--work DIR] [--nproc 1]

Builds the tiny random teacher on SmolLM2's tokenizer (as tests/conftest.py `tiny_pair`; needs the
embedded SmolLM2 and ../shared/data), runs the recipe once through (every stage, the test's tiny
settings) and times it, then runs it again in a fresh run directory, killing the torchrun agent and
all its workers (SIGKILL) after a random delay drawn from [0, that time], over and over, rerunning the
same command, until one launch finishes. It prints where each kill landed (stage, checkpoint and
logged step, inside a save or not: read off the run directory) and compares every record with the
uninterrupted run (tests/chaos_support.py). A run that finished before its kills were used up starts
another round in a new run directory, until --kills kills have landed. Exit status 1 on any difference.
The seeded kill points of tests/recipes/test_chaos.py are the deterministic counterpart.
"""

from __future__ import annotations

import argparse
import random
import shutil
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


def launch(run_dir: Path, args: list[str], nproc: int, kill_after: float | None) -> bool:
    """One launch of the recipe; True if it finished (exit 0) before being killed."""
    proc = subprocess.Popen(recipe_cmd(run_dir, *args, nproc=nproc), cwd=REPO, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        proc.communicate()
        return False
    if proc.returncode != 0:
        sys.exit(f"the recipe failed (exit {proc.returncode}) in {run_dir}:\n{err[-4000:]}")
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a new temporary one, removed)")
    a = p.parse_args()
    rng = random.Random(a.seed)
    work = a.work or Path(tempfile.mkdtemp(prefix="nemo_neo_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    args = tiny(tiny_pair(work))
    t0 = time.perf_counter()
    launch(work / "full", args, a.nproc, None)
    span = time.perf_counter() - t0
    print(f"uninterrupted run: {span:.1f} s; kills drawn from [0, {span:.1f}] s after each launch (seed {a.seed})")
    reference = records(work / "full")
    kills, failed, rnd = 0, 0, 0
    while kills < a.kills:
        rnd += 1
        run_dir = work / f"chaos_{rnd}"
        launches = 0
        while True:
            launches += 1
            # no kill once every stage is recorded (the process was only exiting)
            done = landing(run_dir) == "after the last stage" if run_dir.is_dir() else False
            delay = rng.uniform(0, span) if kills < a.kills and not done else None
            if launch(run_dir, args, a.nproc, delay):
                break
            kills += 1
            print(f"kill {kills:3d} (round {rnd}, launch {launches}, after {delay:5.1f} s): {landing(run_dir)}", flush=True)
        diff = differences(reference, records(run_dir))
        failed += bool(diff)
        print(f"round {rnd}: finished after {launches} launch(es); "
              + (f"DIFFERS from the uninterrupted run: {diff}" if diff else "same records as the uninterrupted run"),
              flush=True)
    print(f"{kills} kills in {rnd} round(s): {'all rounds equal' if not failed else f'{failed} round(s) differ'}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
