"""Data parallelism over the mesh's dp axes, with torch's composable FSDP2 family.

    shard_data_parallel(module, pm, "ddp" | "fsdp" | "hsdp", mixed_precision)  # meta or not
    with gradient_sync(module, enabled=last_micro_batch):
        (loss / (micro_batches * dp)).backward()          # gradients are summed over dp

- 'ddp'  : `replicate` (torch.distributed._composable.replicate_with_fsdp) over the dp
           mesh, one unit per block plus the root: every replica holds the whole stage,
           and each block's gradients are all-reduced as soon as its backward is done,
           overlapping the rest of the backward pass.
- 'fsdp' : `fully_shard` over the dp mesh, one unit per block plus the root:
           parameters, gradients and optimizer state sharded over every replica (ZeRO-3).
- 'hsdp' : `fully_shard` over the 2-D (replica groups, shard group) mesh: sharded within
           groups of dp_shard replicas, replicated across groups (torchtitan's
           replicate x shard), so the all-gathers stay in a group and only the gradient
           all-reduce crosses groups.

All three are one mechanism (FSDP2's parameter groups and hooks), so they compose alike
with the rest: tensor-parallel DTensor parameters become 2-D (3-D for hsdp) DTensors;
torch's pipeline stages drive them (gradient sync only after a step's last micro-batch,
and an explicit reduction after the zero-bubble schedules' split backward, which writes
`.grad` outside autograd's accumulation hooks and so could not work with torch's
`DistributedDataParallel`); DCP saves and reshards them by their global names; the model
may still be on the meta device (raypar/parallel/parallelize.py materializes it after).
An earlier raypar used torch's DDP with dp only, and all-reduced the gradients itself in
one flat buffer after the step's last backward with tp or pp (DDP's reducer cannot follow
a DTensor parameter or a pipeline schedule's extra backward): no overlap, and no
zero-bubble schedule with dp > 1.

Mixed precision: with train.dtype=bf16 the modules compute with bf16 copies of the fp32
parameters and reduce gradients in fp32 (FSDP2's MixedPrecisionPolicy); the optimizer
updates the fp32 master weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from raypar.parallel.mesh import ParallelMesh

MODES = ("ddp", "fsdp", "hsdp")


def mixed_precision(dtype: str) -> Optional[MixedPrecisionPolicy]:
    """The MixedPrecisionPolicy for train.dtype ('fp32': None, full precision)."""
    if dtype == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_data_parallel(model: nn.Module, pm: ParallelMesh, mode: str = "ddp",
                        mp_policy: Optional[MixedPrecisionPolicy] = None) -> nn.Module:
    """Make `model` (a GPT or a pipeline stage of one) data parallel over dp, in place.

    With dp == 1 the model is returned as is: a data-parallel wrapper over one rank would
    only add copies (bf16 then runs under autocast, see RankTrainer).
    """
    if mode not in MODES:
        raise ValueError(f"unknown dp_mode {mode!r}")
    if pm.dp == 1:
        return model
    root = {"mp_policy": mp_policy} if mp_policy is not None else {}
    # A block's inputs are left as they come: the hidden states are bf16 already (the root
    # cast them, or the embedding made them), and the rotary tables must stay fp32, as
    # apply_rope computes in fp32 (FSDP would otherwise round them to bf16).
    block = {"mp_policy": dataclasses.replace(mp_policy, cast_forward_inputs=False)
             } if mp_policy is not None else {}
    blocks = list(getattr(model, "layers", {}).values())
    if mode == "ddp":
        for unit in blocks:
            replicate(unit, mesh=pm.dp_mesh, **block)
        replicate(model, mesh=pm.dp_mesh, **root)
    else:
        mesh = pm.hsdp_mesh if mode == "hsdp" else pm.dp_mesh
        # Inside a pipeline each micro-batch runs forward separately; keeping the gathered
        # parameters between forward and backward avoids one all-gather per micro-batch
        # (at the cost of holding one stage's full parameters).
        reshard = pm.pp == 1
        for unit in blocks:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, **block)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, **root)
    # The reduction sums, and divides by nothing: each rank's loss is already scaled by
    # 1 / (every micro-batch of the step, over all replicas) (RankTrainer, Pipeline), so
    # its gradients are its terms of the global mean, each the very term one process
    # adds. FSDP's default averages instead (sum, then / dp), which rounds differently
    # from one process wherever dp is not a power of 2 (dp=3 drifted past 1e-5 in 80 steps).
    for unit in (*blocks, model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient reduction inside (accumulation micro-batches), or not."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield
