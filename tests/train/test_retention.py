"""Checkpoint retention: the last N step checkpoints + the final one (+ the best by a validation
metric) stay, older ones go only after a newer one is whole, and a SIGKILL inside a save or inside a
removal leaves only valid checkpoints and a `latest.json` that points to one; the rerun finishes
with the uninterrupted run's curve."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, free_port, torchrun

from nemo_neo.checkpoint.native import INDEX, load_full_state
from nemo_neo.errors import ConfigError
from nemo_neo.train import retention
from nemo_neo.train.retention import RetentionPolicy, apply_retention, steps_to_keep

WORKER = "tests/workers/train_worker.py"


def fake_checkpoint(root, name, metrics=None):
    path = root / name
    path.mkdir(parents=True)
    (path / INDEX).write_text(json.dumps({"metadata": {"metrics": metrics or {}}}))
    (path / "model.safetensors").write_bytes(b"x" * 100)
    return path


def test_keeps_the_last_n_the_final_and_the_best(tmp_path):
    val = {2: 3.0, 4: 1.5, 6: 2.0, 8: 2.5}  # validation ran at even steps only; best at step 4
    for step in range(1, 11):
        fake_checkpoint(tmp_path, f"step_{step:07d}", {"loss": 1.0, **({"val_loss": val[step]} if step in val else {})})
    fake_checkpoint(tmp_path, "teacher_step_0000003")  # a companion goes with its step
    fake_checkpoint(tmp_path, "teacher_step_0000009")
    policy = RetentionPolicy(keep_last=2, best_metric="val_loss")
    assert steps_to_keep(tmp_path, policy, latest_step=10, final_step=10) == {8, 9, 10, 4}
    assert steps_to_keep(tmp_path, RetentionPolicy(keep_last=2), latest_step=9, final_step=20) == {9, 10}
    assert steps_to_keep(tmp_path, RetentionPolicy(keep_last=0), latest_step=10) == set(range(1, 11))
    removed = apply_retention(tmp_path, policy, latest_step=10, final_step=10)
    assert sorted(p.name for p in removed) == sorted(
        [f"step_{s:07d}" for s in (1, 2, 3, 5, 6, 7)] + ["teacher_step_0000003"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000004", "step_0000008", "step_0000009", "step_0000010", "teacher_step_0000009"]
    report = retention.disk_report(tmp_path)
    assert report["checkpoints_kept"] == [4, 8, 9, 10]
    assert report["checkpoints_bytes"] == sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())


def test_an_interrupted_removal_is_finished_and_never_visible(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, f"step_{step:07d}")
    half = tmp_path / ".step_0000000.deleting"  # a removal a kill cut short
    (half / "sub").mkdir(parents=True)
    apply_retention(tmp_path, RetentionPolicy(keep_last=2), latest_step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_keep_last_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="save_keep_last"):
        RetentionPolicy(keep_last=bad)


def args(tiny_pair, run_dir, steps=10):
    return ["--student", tiny_pair / "student", "--teacher", tiny_pair / "teacher", "--run-dir", run_dir,
            "--data", tiny_pair / "corpus.txt", "--steps", steps, "--save-every", 1, "--keep-last", 2,
            "--seq", 16, "--gbs", 2, "--mbs", 1, "--max-valid", 4]


def killed_at(event: str, tiny_pair, run_dir):
    """Run the worker with the chaos hook armed; it must die by SIGKILL at `event`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
           str(REPO / WORKER), *map(str, args(tiny_pair, run_dir))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMO_NEO_CHAOS_KILL": event}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode != 0 and not (run_dir / "result.json").exists(), proc.stderr[-2000:]


def visible(ckpts):
    return sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))


def test_ten_saves_keep_two_plus_final_and_kills_lose_nothing(tiny_pair, tmp_path):
    full = tmp_path / "full"
    torchrun(WORKER, 1, *args(tiny_pair, full))
    result = json.loads((full / "result.json").read_text())
    ckpts = full / "checkpoints"
    assert visible(ckpts) == ["latest.json", "step_0000008", "step_0000009", "step_0000010"]
    assert result["checkpoints"]["checkpoints_kept"] == [8, 9, 10]
    saves = [json.loads(line) for line in (full / "distill_checkpoints.jsonl").read_text().splitlines()]
    assert [s["step"] for s in saves] == list(range(1, 11))
    assert all(s["save_seconds"] > 0 for s in saves)
    assert saves[-1]["saved_bytes"] == retention.directory_bytes(ckpts / "step_0000010")
    assert saves[-1]["checkpoints_kept"] == [8, 9, 10] and saves[2]["removed"] == ["step_0000001"]

    # killed inside the 5th save (its temp directory written, not yet published)
    run = tmp_path / "killed"
    killed_at(":publish:5", tiny_pair, run)
    ckpts = run / "checkpoints"
    assert visible(ckpts) == ["latest.json", "step_0000003", "step_0000004"]
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 4
    for name in ("step_0000003", "step_0000004"):
        load_full_state(ckpts / name)  # whole and readable
    # the rerun is killed inside a removal: step 3 renamed out of sight, not yet deleted
    killed_at(":retention:1", tiny_pair, run)
    assert visible(ckpts) == ["latest.json", "step_0000004", "step_0000005"]
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 5
    assert (ckpts / ".step_0000003.deleting").is_dir()
    # and the last rerun finishes: two + final kept, nothing hidden left, the whole curve as uninterrupted
    torchrun(WORKER, 1, *args(tiny_pair, run))
    resumed = json.loads((run / "result.json").read_text())
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "step_0000008", "step_0000009", "step_0000010"]
    assert resumed["resumed_from"] == 5
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in result["history"]]
