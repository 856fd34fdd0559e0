"""The run directory: one per recipe run, so a rerun of the same command knows what is done.

    <run_dir>/run.json            fingerprint of the config that produced the results here
    <run_dir>/config.yaml         the resolved config of the latest invocation
    <run_dir>/<stage>/metrics.json  written last (atomically): its presence means the stage is done
    <run_dir>/<stage>/...         the stage's checkpoints, logs, TensorBoard events, plots
    <run_dir>/<stage>/checkpoints/  a training stage's resume state (step checkpoints: weights +
                                  optimizer state); released once the stage is finished unless
                                  keep_training_state=true (its output model is kept either way)

A stage whose metrics.json exists is skipped on rerun; an interrupted training stage resumes from
its latest checkpoint. A directory holding results of a different config is refused (it would mix
two runs' results) unless the user asks to resume it with `resume=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_neo.errors import RunStateError
from nemo_neo.train.retention import directory_bytes, remove_checkpoint_dir

# Keys that choose what to run now or check it, not what the results are: changing them keeps the run the same.
NOT_FINGERPRINTED = ("stages", "resume", "run_dir", "hydra", "evaluate", "export", "keep_training_state", "plan")


class RunDirectoryError(RunStateError):
    pass


def fingerprint(cfg: DictConfig) -> str:
    values = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_FINGERPRINTED:
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class RunDirectory:
    def __init__(self, root, is_main: bool):
        self.root = Path(root)
        self.is_main = is_main

    def check(self, cfg: DictConfig) -> str:
        """May this directory hold this run? Returns 'new' or 'resumed'; raises RunDirectoryError."""
        record = self.root / "run.json"
        mine = fingerprint(cfg)
        state = "new"
        if record.is_file():
            theirs = json.loads(record.read_text())["fingerprint"]
            if theirs != mine and not cfg.resume:
                raise RunDirectoryError(
                    f"run_dir {self.root} holds the results of another run (config fingerprint {theirs}, this "
                    f"config {mine}). Choose a new run_dir=..., or pass resume=true to continue that run with "
                    "this config (finished stages are kept)."
                )
            state = "resumed"
        elif self.root.is_dir() and any(p.name != "hydra" and not p.name.endswith(".log") for p in self.root.iterdir()):
            raise RunDirectoryError(
                f"run_dir {self.root} is not empty and is not a nemo_neo run directory; choose another run_dir=..."
            )
        return state

    def record(self, cfg: DictConfig) -> None:
        """Mark the directory as this run's and keep the resolved config (main rank)."""
        if self.is_main:
            write_json(self.root / "run.json", {"fingerprint": fingerprint(cfg)})
            (self.root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def metrics_file(self, stage: str) -> Path:
        return self.stage_dir(stage) / "metrics.json"

    def done(self, stage: str) -> dict | None:
        path = self.metrics_file(stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def training_checkpoints(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def finish(self, stage: str, metrics: dict, keep_training_state: bool = True) -> None:
        """Record the stage as done, with its disk use (bytes of the stage directory as it stays), then
        release its training checkpoints unless asked to keep them: after the record, so that a kill in
        between costs only disk (the next run releases them) and never a finished stage's results."""
        if not self.is_main:
            return
        total = directory_bytes(self.stage_dir(stage))
        released = 0 if keep_training_state else directory_bytes(self.training_checkpoints(stage))
        metrics["disk"] = {"stage_bytes": total - released, "training_checkpoints_released_bytes": released}
        write_json(self.metrics_file(stage), metrics)
        if not keep_training_state:
            self.release_training_state(stage)

    def release_training_state(self, stage: str) -> None:
        """Remove a finished stage's training checkpoints (idempotent; main rank)."""
        ckpts = self.training_checkpoints(stage)
        if self.is_main and ckpts.is_dir():
            remove_checkpoint_dir(ckpts)
