"""Checkpoints: torch.distributed.checkpoint (DCP) shards, one writer per rank.

Each rank writes its shard into a local temporary directory; `ray.train.report`
uploads every rank's directory into one checkpoint folder in the run's storage
(Ray merges them), named `step_<N>`. Rank 0 adds `meta.json` (model config,
tokenizer, run config) and `train_state.json` (step, tokens seen), so a
checkpoint is self-describing: `raypar generate` needs nothing else.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ray.train import Checkpoint
from torch.distributed.checkpoint.state_dict import get_state_dict

PREFIX = "step_"


def dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         train_state: dict[str, Any], meta: dict[str, Any]) -> Checkpoint:
    """Write this rank's shard of model + optimizer state; returns it for ray.train.report."""
    local = Path(tempfile.mkdtemp(prefix="raypar-ckpt-"))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(local))
    if not dist.is_initialized() or dist.get_rank() == 0:
        (local / "meta.json").write_text(json.dumps(meta))
        (local / "train_state.json").write_text(json.dumps(train_state))
    return Checkpoint.from_directory(str(local))


def latest(root: str | Path) -> Path | None:
    """The newest `step_*` checkpoint folder under root (searched recursively), or None."""
    found = sorted(Path(root).rglob(f"{PREFIX}*/meta.json"), key=lambda p: p.parent.name)
    return found[-1].parent if found else None


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def load_model_state(path: str | Path, model: torch.nn.Module) -> None:
    """Load the model part of a checkpoint into a plain (unsharded) module, in one process."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
