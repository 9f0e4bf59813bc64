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

Gradient compression (parallel.grad_compression, dp_mode=ddp):
- 'bf16': the same policy with reduce_dtype=bfloat16: each gradient is cast to bf16,
  all-reduced (summed) in bf16, and cast back to fp32 for the optimizer. It is what
  torch's bf16_compress_hook does for DDP, but it keeps `replicate`, so it composes with
  tp, pp and every schedule as the uncompressed mode does.
- 'powersgd': `replicate` has no communication hooks, so the stage modules are wrapped in
  torch's `DistributedDataParallel` instead, with torch's PowerSGD hook (error feedback
  and warm start on): each gradient matrix M (n x m) goes over the wire as two rank-r
  factors, P (n x r) and Q (m x r), vectors and small matrices uncompressed. DDP cannot
  hold DTensor parameters (tp = 1 only), and torch's pipeline schedules driving a DDP
  stage over several micro-batches trip an assertion in DDP's bucket rebuild (torch
  2.13), so pp = 1 too (both refused in raypar/validation.py). DDP averages (divides by
  dp), so each rank's loss is then not divided by dp (RankTrainer.grad_dp).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
# _should_compress: torch's own rule for which matrices PowerSGD compresses, so that the
# saved factors are split exactly as the hook laid them out (PowerSGDMemory).
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (PowerSGDState,
                                                                       _should_compress,
                                                                       powerSGD_hook)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from raypar.parallel.mesh import ParallelMesh

MODES = ("ddp", "fsdp", "hsdp")


def mixed_precision(dtype: str, compression: str = "none") -> Optional[MixedPrecisionPolicy]:
    """The MixedPrecisionPolicy for train.dtype and parallel.grad_compression ('fp32' and
    no bf16 compression: None, full precision)."""
    reduce = torch.bfloat16 if compression == "bf16" else torch.float32
    if dtype == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    if compression == "bf16":
        return MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)
    return None


# PowerSGD starts compressing at this DDP iteration (torch needs > 1 with error feedback:
# the first iteration, when DDP still rebuilds its buckets, is a plain all-reduce).
POWERSGD_START_ITER = 2


class PowerSGDMemory:
    """torch's PowerSGDState plus what a checkpoint needs to restore it into another DDP.

    PowerSGD keeps its error feedback and warm-start factors per DDP bucket, as flat
    buffers in the bucket's parameter order. A new DDP (a resumed run) groups the
    parameters into its first buckets in another order than the rebuilt ones of the saved
    run (DDP rebuilds them after its first iteration, in the order gradients got ready),
    so the buffers are saved per parameter (`tensors`) and put together again in each
    bucket's own order the first time the hook sees it after a load, and again whenever
    DDP's rebuild changed a bucket's order."""

    def __init__(self, state: PowerSGDState, names: dict[int, str]):
        self.state = state
        self.names = names  # id(parameter) -> its name in the stage module
        self.layouts: dict[int, list[tuple[str, tuple[int, ...]]]] = {}  # bucket -> params
        self.pending: Optional[dict[str, dict[str, torch.Tensor]]] = None
        self.last: Optional[torch.futures.Future] = None  # the latest bucket's hook

    def _compressed(self, layout: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, int, int]]:
        """(name, n * rank, m * rank) of the bucket's compressed matrices, in the order the
        hook lays out their P and Q factors: grouped by (n, m), first seen first."""
        groups: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        for name, shape in layout:
            n = shape[0]
            m = math.prod(shape[1:])
            r = min(n, m, self.state.matrix_approximation_rank)
            if _should_compress(n, m, r, self.state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((name, n * r, m * r))
        return [entry for group in groups.values() for entry in group]

    def _split(self, idx: int, layout: list[tuple[str, tuple[int, ...]]]
               ) -> dict[str, dict[str, torch.Tensor]]:
        """Bucket idx's memories, laid out as `layout`, per parameter name."""
        st, out = self.state, {"error": {}, "p": {}, "q": {}}
        if idx in st.error_dict:
            sizes = [math.prod(shape) for _, shape in layout]
            out["error"] = {name: part for (name, _), part
                            in zip(layout, st.error_dict[idx].split(sizes))}
        compressed = self._compressed(layout)
        for key, memory, which in (("p", st.p_memory_dict, 1), ("q", st.q_memory_dict, 2)):
            if idx in memory:
                parts = memory[idx].split([c[which] for c in compressed])
                out[key] = {c[0]: part for c, part in zip(compressed, parts)}
        return out

    def _install(self, idx: int, layout: list[tuple[str, tuple[int, ...]]],
                 parts: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
        """Lay per-parameter memories out as bucket idx's flat buffers (taking them from
        parts): the ones whose every parameter is there."""
        st = self.state
        names = [name for name, _ in layout]
        if names and all(n in parts["error"] for n in names):
            st.error_dict[idx] = torch.cat([parts["error"].pop(n).flatten()
                                            for n in names]).to(device)
        compressed = [c[0] for c in self._compressed(layout)]
        for key, memory in (("p", st.p_memory_dict), ("q", st.q_memory_dict)):
            if compressed and all(n in parts[key] for n in compressed):
                memory[idx] = torch.cat([parts[key].pop(n).flatten()
                                         for n in compressed]).to(device)

    def see(self, idx: int, layout: list[tuple[str, tuple[int, ...]]],
            device: torch.device) -> None:
        """Before the hook runs on bucket idx, now holding `layout`: fill its memories from
        a loaded checkpoint, or re-lay them out if DDP rebuilt the bucket in another
        order since the hook last saw it."""
        before = self.layouts.get(idx)
        self.layouts[idx] = layout
        if before is not None and before != layout:
            parts = self._split(idx, before)
            for memory in (self.state.error_dict, self.state.p_memory_dict,
                           self.state.q_memory_dict):
                memory.pop(idx, None)
            self._install(idx, layout, parts, device)
        if self.pending is not None:
            self._install(idx, layout, self.pending, device)
            if not any(self.pending.values()):
                self.pending = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as plain tensors (a checkpoint loads them with weights_only): the
        iteration, the numpy generator of the random projections, and per parameter its
        error feedback and warm-start P and Q."""
        st = self.state
        _, keys, pos, has_gauss, gauss = st.rng.get_state()
        out = {"iter": torch.tensor(st.iter), "rng_keys": torch.from_numpy(keys.astype("int64")),
               "rng_pos": torch.tensor(pos), "rng_has_gauss": torch.tensor(has_gauss),
               "rng_gauss": torch.tensor(gauss, dtype=torch.float64)}
        for idx, layout in self.layouts.items():
            for key, parts in self._split(idx, layout).items():
                out.update({f"{key}.{name}": t.detach().cpu().clone()
                            for name, t in parts.items()})
        return out

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore what tensors() returned; the per-parameter memories are put into the
        buckets as the hook meets them."""
        st = self.state
        st.iter = int(saved["iter"])
        st.rng.set_state(("MT19937", saved["rng_keys"].numpy().astype("uint32"),
                          int(saved["rng_pos"]), int(saved["rng_has_gauss"]),
                          float(saved["rng_gauss"])))
        for memory in (st.error_dict, st.p_memory_dict, st.q_memory_dict):
            memory.clear()
        self.layouts.clear()
        self.pending = {key: {k.split(".", 1)[1]: t for k, t in saved.items()
                              if k.startswith(f"{key}.")} for key in ("error", "p", "q")}


def _powersgd_hook(memory, bucket):
    """torch's powerSGD_hook on memory.state, after noting the bucket's parameters (and
    filling its memories from a loaded checkpoint, the first time). (No annotations: DDP
    checks them against the real classes, and this module's annotations are strings.)"""
    layout = [(memory.names[id(p)], tuple(p.shape)) for p in bucket.parameters()]
    memory.see(bucket.index(), layout, bucket.buffer().device)
    # torch's hook issues a bucket's P and Q all-reduces from its futures' callbacks, on
    # whichever thread completes the one before: with two or more buckets, the next
    # bucket's first all-reduce (from the autograd thread) can go out before or after
    # them, in another order on each replica, and gloo matches collectives by their order
    # (it aborted with "5120 vs 768 ... collective mismatch" on the bench's model). So a
    # bucket starts only when the one before has finished: the same collectives in the
    # same order everywhere, the same arithmetic, less overlap.
    if memory.last is not None:
        memory.last.wait()
    memory.last = powerSGD_hook(memory.state, bucket)
    return memory.last


def powersgd_memory(module: nn.Module) -> Optional[PowerSGDMemory]:
    """The PowerSGD state of a module wrap_powersgd wrapped (None: not wrapped)."""
    if isinstance(module, DistributedDataParallel):
        return getattr(module, "_raypar_powersgd", None)
    return None


def wrap_powersgd(module: nn.Module, pm: ParallelMesh, rank: int) -> nn.Module:
    """`module` (materialized, not tensor-parallel) in torch's DDP over the dp group, its
    gradients all-reduced by the PowerSGD hook of rank `rank`. dp == 1: module as is."""
    if pm.dp == 1:
        return module
    group = pm.dp_mesh.get_group()
    # init_sync off: every replica initialized the same weights (keyed by name and seed),
    # buffers (rotary tables) are computed alike: nothing to broadcast.
    ddp = DistributedDataParallel(module, process_group=group, broadcast_buffers=False,
                                  init_sync=False)
    state = PowerSGDState(process_group=group, matrix_approximation_rank=rank,
                          start_powerSGD_iter=POWERSGD_START_ITER, use_error_feedback=True,
                          warm_start=True, random_seed=0)
    memory = PowerSGDMemory(state, {id(p): n for n, p in module.named_parameters()})
    ddp.register_comm_hook(memory, _powersgd_hook)
    ddp._raypar_powersgd = memory  # checkpoints save and restore it (raypar/train/trainer.py)
    return ddp


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
    if isinstance(model, DistributedDataParallel):
        with (contextlib.nullcontext() if enabled else model.no_sync()):
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
