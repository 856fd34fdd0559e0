"""Chaos: the recipe (every stage, tiny pair) SIGKILLed at seeded points across its stages, the same
command rerun after each kill until it finishes, leaves exactly the records of a run that was never
interrupted: the final models bit for bit, every stage's metrics.json, the Trainer logs, the
TensorBoard scalars, run.json (timings, paths and `resumed_from` aside).

The kills come from the program itself (nemo_neo/chaos.py, NEMO_NEO_CHAOS_KILL=<stage>:<event>:<n>),
so each lands at the same point on every machine; scripts/chaos.py kills at random moments instead.
"""

from __future__ import annotations

import subprocess

from chaos_support import differences, landing, records
from conftest import REPO
from test_recipe import env, recipe_cmd, run_recipe, tiny

from nemo_neo.chaos import ENV

# (kill spec, where the run directory must show it landed), in the order a run meets them
KILLS = (
    ("correct:checkpoint_saved:1", "correct, checkpoint step 2, logged step 2, not inside a save"),
    # the issue: training and the final checkpoint done, metrics.json not yet written
    ("correct:before_metrics:1", "correct, checkpoint step 4, logged step 4, not inside a save"),
    ("prune:publish:1", "prune, inside a save (prune/.student.tmp)"),
    ("distill:publish:2", "distill, checkpoint step 3, logged step 6, inside a save (distill/checkpoints/.step_0000006.tmp)"),
    ("distill:trained:1", "distill, checkpoint step 12, logged step 12, not inside a save"),
    ("export:publish:1", "export, inside a save (export/.hf.tmp)"),
)


def test_sigkilled_at_seeded_points_then_rerun_leaves_the_records_of_an_uninterrupted_run(tiny_pair, tmp_path):
    args = tiny(tiny_pair)  # every stage
    full = tmp_path / "full"
    run_recipe(full, *args)

    chaos = tmp_path / "chaos"
    for spec, expected in KILLS:
        proc = subprocess.run(recipe_cmd(chaos, *args), cwd=REPO, env={**env(), ENV: spec}, start_new_session=True,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, f"{spec}: exited {proc.returncode}, not killed\n{proc.stderr[-3000:]}"
        assert landing(chaos) == expected, spec
    run_recipe(chaos, *args)

    a, b = records(full), records(chaos)
    assert not differences(a, b), differences(a, b)
    correct = b["correct/metrics.json"]
    assert [r["step"] for r in correct["history"]] == [1, 2, 3, 4] and "val_loss" in correct["final"]


def test_dp2_killed_whole_and_one_rank_only_then_rerun_leaves_the_records_of_an_uninterrupted_run(tiny_pair, tmp_path):
    """DP=2: the whole job SIGKILLed (both ranks and the agent) inside a distill save, then only rank 1
    killed after a later checkpoint while rank 0 runs on into its next collective: that job must end
    by itself (torchrun's agent stops rank 0; no hang, no exit 0), and the rerun finishes with the
    records of an uninterrupted DP=2 run."""
    args = tiny(tiny_pair, "stages=[prune,distill]")
    full = tmp_path / "full"
    run_recipe(full, *args, nproc=2)

    chaos = tmp_path / "chaos"
    whole = subprocess.run(recipe_cmd(chaos, *args, nproc=2), cwd=REPO, env={**env(), ENV: "distill:publish:2"},
                           start_new_session=True, capture_output=True, text=True, timeout=600)
    assert whole.returncode == -9, whole.stderr[-3000:]
    assert landing(chaos).startswith("distill, checkpoint step 3") and "inside a save" in landing(chaos)
    one = subprocess.run(recipe_cmd(chaos, *args, nproc=2), cwd=REPO, env={**env(), ENV: "distill:checkpoint_saved:2:rank1"},
                         start_new_session=True, capture_output=True, text=True, timeout=600)
    # the agent reports the lost worker and exits non-zero (not -9: nobody killed the agent)
    assert one.returncode not in (0, -9), one.returncode
    assert "exitcode  : -9" in one.stderr or "Signal 9" in one.stderr, one.stderr[-3000:]
    assert "not inside a save" in landing(chaos)
    run_recipe(chaos, *args, nproc=2)

    a, b = records(full), records(chaos)
    assert not differences(a, b), differences(a, b)
