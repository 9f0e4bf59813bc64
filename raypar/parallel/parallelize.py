"""Compose one rank's model, in one fixed order, without ever holding the whole model:

    GPT on the meta device -> stage split -> tensor parallel -> activation checkpointing
        -> data parallel (replicate / FSDP2 / HSDP) -> materialize this rank's share

    rank_model = parallelize(model_cfg, seed, pm, spec.parallel, device, ac, dtype)

The order matters and is the same everywhere (as in torchtitan's parallelize functions):
a pipeline stage is cut from the whole model first, so every later step sees only the
blocks it keeps; tensor parallelism replaces the stage's weights with DTensor shards
before anything records them; activation checkpointing wraps the sharded blocks; the
data-parallel units come last, over the already sharded parameters. Until then nothing
is allocated (the meta device); `to_empty` then allocates only this rank's shards and
`GPT.init_weights(seed)` fills them with the values the single-process model has at
those indices (keyed per parameter, raypar/model.py), so every layout starts from the
same weights and a rank's memory follows its share from the start. (With model.init_from
the shards are read from a Hugging Face checkpoint instead, raypar/hf_import.py.)
Each step is one parallel module's job; this file only says in which order they run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint as activation_checkpoint

from raypar.config import ParallelConfig
from raypar.hf_import import load_shards
from raypar.model import GPT, GPTConfig
from raypar.parallel.data import mixed_precision, shard_data_parallel, wrap_powersgd
from raypar.parallel.mesh import ParallelMesh
from raypar.parallel.schedules import stage_ids
from raypar.parallel.stages import build_stage_modules, is_tied_copy
from raypar.parallel.tensor import apply_tensor_parallel, keep_grad_layouts


@dataclass
class RankModel:
    """What one rank trains: its stage modules (in stage order; data parallelism adds hooks,
    not wrappers, so optimizers, checkpoints and clipping see these same modules), and
    which of the n_stages pipeline stages they are."""
    modules: list[nn.Module]
    stage_indices: list[int]
    n_stages: int
    forward_modules: list[nn.Module] | None = None
    """What runs forward and backward: the modules, or (grad_compression=powersgd) torch's
    DDP wrappers of them; None: the modules."""

    def tied_copies(self) -> list[bool]:
        """Per stage module: whether it holds the last stage's own copy of a tied embedding."""
        return [any(is_tied_copy(name, m) for name, _ in m.named_parameters())
                for m in self.modules]


def parallelize(cfg: GPTConfig, seed: int, pm: ParallelMesh, p: ParallelConfig,
                device: torch.device, activation_checkpointing: bool = False,
                dtype: str = "fp32", init_from: str = "") -> RankModel:
    """This rank's share of the GPT of `cfg` initialized from `seed`, parallelized; with
    `init_from` (a Hugging Face directory, raypar/hf_import.py) its weights are read from
    there instead, each rank reading only its shards' slices."""
    virtual = p.virtual_stages if p.pp > 1 else 1
    coord = pm.coords.pp
    with torch.device("meta"):
        whole = GPT(cfg)
    stages = build_stage_modules(whole, coord, p.pp, virtual, p.schedule)
    del whole
    policy = mixed_precision(dtype, p.grad_compression)
    # (A parameter server's ranks compress their own pushes: no DDP, raypar/parallel/ps.py.)
    powersgd = p.grad_compression == "powersgd" and p.dp_mode != "ps"
    for stage in stages:
        apply_tensor_parallel(stage, pm.tp_mesh, p.sequence_parallel)
        if activation_checkpointing:
            for block in stage.layers.values():
                activation_checkpoint(block)
        if p.dp_mode != "ps" and p.sync_every == 1 and not powersgd:
            # A parameter server's replicas are plain (raypar/parallel/ps.py); so are local
            # SGD's (sync_every > 1): no gradient reduction in the backward, the replicas
            # exchange parameter deltas every sync_every steps instead
            # (raypar/parallel/local_sgd.py).
            shard_data_parallel(stage, pm, p.dp_mode, policy)
        stage.to_empty(device=device)
        keep_grad_layouts(stage)
        if init_from:
            load_shards(stage, init_from)
        else:
            stage.init_weights(seed)
    # PowerSGD: torch's DDP with its comm hook, around the materialized modules (DDP
    # registers its hooks on the real parameters, which to_empty would replace).
    return RankModel(modules=stages,
                     stage_indices=stage_ids(coord, p.pp, virtual, p.schedule),
                     n_stages=p.pp * virtual,
                     forward_modules=[wrap_powersgd(s, pm, p.powersgd_rank) for s in stages]
                     if powersgd else None)
