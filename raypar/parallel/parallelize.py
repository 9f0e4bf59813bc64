"""Compose one rank's model from the plain GPT, in one fixed order:

    stage split -> device -> tensor parallel -> activation checkpointing -> data parallel

    rank_model = parallelize(GPT(cfg), pm, spec.parallel, device, activation_checkpointing)

The order matters and is the same everywhere (as in torchtitan's parallelize functions):
a pipeline stage is cut from the whole model first, so every later step sees only the
blocks it keeps; tensor parallelism replaces the stage's weights with DTensor shards
before anything records them; activation checkpointing wraps the sharded blocks; the
data-parallel wrapper (DDP or FSDP2) comes last, over the already sharded parameters.
Each step is one parallel module's job; this file only says in which order they run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint as activation_checkpoint

from raypar.config import ParallelConfig
from raypar.model import GPT
from raypar.parallel.data import apply_data_parallel, unwrap
from raypar.parallel.mesh import ParallelMesh
from raypar.parallel.schedules import stage_ids
from raypar.parallel.stages import build_stage_modules, is_tied_copy
from raypar.parallel.tensor import apply_tensor_parallel


@dataclass
class RankModel:
    """What one rank trains: its stage modules (parallel-wrapped, in stage order), the same
    modules unwrapped (what optimizers, checkpoints and clipping see), and which of the
    n_stages pipeline stages they are."""
    modules: list[nn.Module]
    plain: list[nn.Module]
    stage_indices: list[int]
    n_stages: int

    def tied_copies(self) -> list[bool]:
        """Per stage module: whether it holds the last stage's own copy of a tied embedding."""
        return [any(is_tied_copy(name, m) for name, _ in m.named_parameters())
                for m in self.plain]


def parallelize(model: GPT, pm: ParallelMesh, p: ParallelConfig, device: torch.device,
                activation_checkpointing: bool = False) -> RankModel:
    """This rank's share of `model` (the whole plain GPT, which it consumes), parallelized."""
    virtual = p.virtual_stages if p.pp > 1 else 1
    coord = pm.coords.pp
    stages = build_stage_modules(model, coord, p.pp, virtual, p.schedule)
    modules = []
    for stage in stages:
        stage.to(device)
        apply_tensor_parallel(stage, pm.tp_mesh, p.sequence_parallel)
        if activation_checkpointing:
            for block in stage.layers.values():
                activation_checkpoint(block)
        modules.append(apply_data_parallel(stage, pm, p.dp_mode))
    return RankModel(modules=modules, plain=[unwrap(m) for m in modules],
                     stage_indices=stage_ids(coord, p.pp, virtual, p.schedule),
                     n_stages=p.pp * virtual)
