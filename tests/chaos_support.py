"""What a recipe run leaves behind, in a form two runs can be compared by (tests/recipes/test_chaos.py,
scripts/chaos.py): a run killed and rerun until done must leave the same records as one that ran
through, except for timings, its own paths and how often it resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

# fields that measure time or memory, or say where a run resumed: legitimately differ
# (and bytes on disk: a killed run's last save may have no record, and its checkpoints and logs differ by a
# few hundred bytes of recorded metrics and paths; which steps are kept is still compared)
VARYING = {"seconds", "tokens_per_s", "peak_memory_gb", "resumed_from", "train_time_s", "disk", "checkpoints_bytes",
           "checkpoint_save_seconds", "checkpoint_gb"}
STAGES = ("correct", "prune", "distill", "evaluate", "export")
# the models a run produces (metrics.json "checkpoint" of each stage), compared file by file
FINAL_MODELS = ("correct/teacher", "prune/student", "distill/student", "export/hf")


def _normal(value, root: str):
    if isinstance(value, dict):
        return {k: _normal(v, root) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_normal(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<run>")
    return value


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows it (events of a purged range dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in sorted(acc.Tags()["scalars"])
            if tag.rsplit("/", 1)[-1] not in VARYING}


def records(run: Path) -> dict:
    """Every record the run left: metrics.json of each stage, run.json, config.yaml, the Trainer logs
    (one record per step, in order), the TensorBoard scalars, and the bytes of the final models."""
    run, root = Path(run), str(Path(run))
    out: dict = {"run.json": json.loads((run / "run.json").read_text()),
                 "config.yaml": (run / "config.yaml").read_text().replace(root, "<run>")}
    for stage in STAGES:
        if (run / stage / "metrics.json").is_file():
            out[f"{stage}/metrics.json"] = _normal(json.loads((run / stage / "metrics.json").read_text()), root)
        for log in sorted((run / stage).glob("*_log.jsonl")):
            rows = [_normal(json.loads(line), root) for line in log.read_text().splitlines()]
            out[str(log.relative_to(run))] = rows
            steps = [r["step"] for r in rows]
            assert steps == list(range(1, len(steps) + 1)), f"{log}: steps {steps}"
        if (run / stage / "tensorboard").is_dir():
            scalars = tensorboard_scalars(run / stage / "tensorboard")
            for tag, points in scalars.items():
                steps = [s for s, _ in points]
                assert steps == sorted(set(steps)), f"{run / stage / 'tensorboard'} {tag}: steps {steps}"
            out[f"{stage}/tensorboard"] = scalars
    for model in FINAL_MODELS:
        if (run / model).is_dir():
            for f in sorted(p for p in (run / model).rglob("*") if p.is_file()):
                data = f.read_bytes()
                if f.suffix in (".json", ".yaml", ".txt"):
                    data = data.decode().replace(root, "<run>")
                out[str(f.relative_to(run))] = data
    return out


def differences(a: dict, b: dict) -> list[str]:
    """The keys whose records differ (a short list for an assertion message)."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)]


def landing(run: Path) -> str:
    """Where a kill landed, read off the run directory: the stage that was running, its last
    checkpoint and logged step, and whether an atomic write (checkpoint, pruned model, export) was
    under way (its temporary directory is left)."""
    run = Path(run)
    stages = STAGES
    if (run / "config.yaml").is_file():  # the stages this run was asked for (stages=[...])
        from omegaconf import OmegaConf

        asked = OmegaConf.load(run / "config.yaml").get("stages")
        stages = [s for s in STAGES if asked is None or s in asked]
    for stage in stages:
        if (run / stage / "metrics.json").is_file():
            continue
        where = [stage]
        latest = run / stage / "checkpoints" / "latest.json"
        if latest.is_file():
            where.append(f"checkpoint step {json.loads(latest.read_text())['step']}")
        logs = list((run / stage).glob("*_log.jsonl"))
        for log in logs:
            lines = log.read_text().splitlines()
            where.append(f"logged step {json.loads(lines[-1])['step'] if lines else 0}")
        if stage in ("correct", "distill") and not logs:
            where.append("no step logged")
        saving = sorted(str(p.relative_to(run)) for p in (run / stage).rglob(".*.tmp") if p.is_dir())
        where.append(f"inside a save ({', '.join(saving)})" if saving else "not inside a save")
        return ", ".join(where)
    return "after the last stage"
