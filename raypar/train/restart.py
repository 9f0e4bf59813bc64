"""What `--resume` does to a run's records before training goes on, when the run cannot
simply continue where it stopped.

- `--resume RUN --restart` starts over at step 0 in the same directory (every checkpoint
  corrupt, or a fresh start wanted): the old run's records and its checkpoints (with Ray
  Train's bookkeeping of them) move into RUN/restarted-<time>/, nothing is deleted.
- `--resume RUN --set train.steps=N` (or another learning-rate or optimizer field) trains
  the steps after the checkpoint again on another trajectory: their recorded rows no longer
  describe the run, so they move to RUN/metrics.superseded.jsonl, and metrics.jsonl keeps
  one row per step of the run as it now trains.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from raypar.config import RunSpec
from raypar.train import storage
from raypar.train.rundir import CHECKPOINTS, RunDir
from raypar.train.trainer import lr_at

log = logging.getLogger("raypar")

# A run's records that describe one trajectory (config.yaml, the tokenizer, run.log and
# the MLflow store stay: the restarted run keeps them, and a new MLflow run starts).
_RECORDS = ("metrics", "summary", "status", "ranks", "timeline", "timeline_png", "loss_png",
            "mlflow_record")
# The fields that change what a step computes, besides the learning-rate schedule.
_TRAJECTORY = ("lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
               "seed", "dtype", "global_batch")
SUPERSEDED = "metrics.superseded.jsonl"


def move_aside(rd: RunDir, checkpoint_root: str) -> Path:
    """--restart: the old run's records into RUN/restarted-<time>/, its checkpoints with
    them (a checkpoint folder elsewhere is renamed `<folder>.restarted-<time>` in place).
    Returns the folder the records went to."""
    stamp, k = time.strftime("%Y%m%d-%H%M%S"), 1
    while (rd.path / f"restarted-{stamp}").exists():  # restarted twice within a second
        k += 1
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{k}"
    aside = rd.path / f"restarted-{stamp}"
    aside.mkdir()
    for path in [getattr(rd, name) for name in _RECORDS] + [rd.path / SUPERSEDED]:
        if path.exists():
            os.replace(path, aside / path.name)
    if storage.list_dir(checkpoint_root) is not None:
        local = not storage.is_uri(checkpoint_root)
        if local and storage.local_path(checkpoint_root).resolve() == rd.checkpoints.resolve():
            storage.move(checkpoint_root, aside / CHECKPOINTS)
        else:
            storage.move(checkpoint_root, f"{checkpoint_root.rstrip('/')}.restarted-{stamp}")
    log.warning("--restart: the earlier run's records and checkpoints moved to %s; training "
                "starts at step 0", aside)
    return aside


def changed_course(old: RunSpec, new: RunSpec, from_step: int, last_step: int) -> list[str]:
    """The fields whose change makes steps from_step+1..last_step compute something else
    than they did: optimizer settings, and train.steps where it moves the learning rate
    of those steps (the cosine decay ends at the last step)."""
    changed = [f"train.{f}" for f in _TRAJECTORY
               if getattr(old.train, f) != getattr(new.train, f)]
    # The row of step s was trained with lr_at(s - 1).
    if old.train.steps != new.train.steps and any(
            lr_at(s, old) != lr_at(s, new) for s in range(from_step, last_step)):
        changed.append("train.steps")
    return changed


def supersede(rd: RunDir, from_step: int, fields: list[str]) -> int:
    """Move every record after from_step out of metrics.jsonl into metrics.superseded.jsonl
    (appended, after a line saying why). Returns how many step rows moved."""
    keep, moved, rows = [], [], 0
    for line in rd.metrics.read_bytes().splitlines(keepends=True):
        if not line.strip():
            continue
        data = json.loads(line)
        if data.get("step", 0) > from_step:
            moved.append(line)
            rows += "event" not in data
        else:
            keep.append(line)
    if not moved:
        return 0
    header = json.dumps({"superseded_at": time.time(), "from_step": from_step,
                         "changed": fields}) + "\n"
    with open(rd.path / SUPERSEDED, "ab") as f:
        f.write(header.encode() + b"".join(moved))
        f.flush()
        os.fsync(f.fileno())
    tmp = rd.metrics.with_suffix(".jsonl.tmp")
    tmp.write_bytes(b"".join(keep))
    os.replace(tmp, rd.metrics)
    log.warning("--resume: %s changed what steps %d.. compute; their %d recorded rows moved "
                "to %s and the steps train again", ", ".join(fields), from_step + 1, rows,
                rd.path / SUPERSEDED)
    return rows
