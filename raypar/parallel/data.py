"""Data parallelism over the mesh's dp axis: takes a plain module, returns a parallel one."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from raypar.parallel.mesh import ParallelMesh


def apply_data_parallel(model: nn.Module, pm: ParallelMesh, mode: str = "ddp") -> nn.Module:
    """Wrap `model` so gradients are averaged over the dp replicas.

    With dp == 1 the model is returned as is: DDP over one rank would only add a copy.
    """
    if pm.dp == 1:
        return model
    if mode != "ddp":
        raise ValueError(f"unknown dp_mode {mode!r}")
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    # broadcast_buffers off: the model has no buffers that training changes.
    return DDP(model, device_ids=device_ids, process_group=pm.dp_group,
               broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside whatever apply_data_parallel returned."""
    return model.module if isinstance(model, DDP) else model
