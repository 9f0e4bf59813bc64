"""Data parallelism over the mesh's dp axis: takes a plain module, returns a parallel one.

    module = apply_data_parallel(module, pm, "ddp" | "fsdp")
    with gradient_sync(module, enabled=last_micro_batch): loss.backward()
    finish_gradient_sync(modules, pm)          # after the last backward of a step

- 'ddp'  : torch DDP over the dp process group (replicated parameters, gradients
           all-reduced in buckets during the last backward of a step).
- 'fsdp' : FSDP2 `fully_shard` over the dp sub-mesh, one unit per block plus the
           root: parameters, gradients and optimizer state are sharded (ZeRO-3).
           Composes with tensor parallelism (the DTensor parameters become 2-D) and
           with pipeline stages (one root per stage module).

DDP inside a pipeline stage: the schedule's one-off shape-inference pass runs an
extra backward, after which DDP's reducer rebuilds its buckets from a doubled
parameter order and fails an internal assertion (torch 2.13, dp2 x pp2). So there
too the gradients are averaged by raypar after the schedule has run.

DDP with tensor parallelism: torch's DDP accepts DTensor parameters only by
swapping them for plain local tensors between forwards, which loses the DTensor
view that DCP (checkpoint resharding) and the global-norm clipping rely on. So
for 'ddp' with tp > 1 raypar all-reduces the gradients' local shards over the dp
group itself, in one flat buffer after the step's last backward (a dozen lines;
DDP would additionally overlap that with the backward pass).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from raypar.parallel.mesh import ParallelMesh

_MANUAL = "_raypar_manual_dp_group"


def apply_data_parallel(model: nn.Module, pm: ParallelMesh, mode: str = "ddp") -> nn.Module:
    """Wrap `model` so gradients are averaged over the dp replicas.

    With dp == 1 the model is returned as is: a data-parallel wrapper over one rank
    would only add copies.
    """
    if pm.dp == 1:
        return model
    if mode == "fsdp":
        mesh = pm.dp_mesh
        # Inside a pipeline each micro-batch runs forward separately; keeping the
        # gathered parameters between forward and backward avoids one all-gather per
        # micro-batch (at the cost of holding one stage's full parameters).
        reshard = pm.pp == 1
        layers = getattr(model, "layers", None)
        if layers is not None:
            for block in layers.values():
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model
    if mode != "ddp":
        raise ValueError(f"unknown dp_mode {mode!r}")
    if pm.tp > 1 or pm.pp > 1:
        setattr(model, _MANUAL, pm.dp_group)
        return model
    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    # broadcast_buffers off: the model has no buffers that training changes.
    return DDP(model, device_ids=device_ids, process_group=pm.dp_group,
               broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient reduction inside (accumulation micro-batches), or not."""
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def finish_gradient_sync(models: Iterable[nn.Module]) -> None:
    """Average gradients over dp for modules left to raypar (ddp with tp > 1 or pp > 1)."""
    for model in models:
        group = getattr(model, _MANUAL, None)
        if group is None:
            continue
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        if not local:
            continue
        flat = torch.cat([g.reshape(-1) for g in local])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        offset = 0
        for g in local:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside whatever apply_data_parallel returned."""
    return model.module if isinstance(model, DDP) else model
