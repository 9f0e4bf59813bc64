"""Local SGD / DiLoCo over the dp axis: replicas train apart for H steps, then agree.

    local = LocalSGD(stage_modules, pm, outer_lr=0.7, outer_momentum=0.9)
    ... H inner optimizer steps on this replica's own data, no gradient all-reduce ...
    sent = local.sync()        # every replica ends with the same parameters

Each replica runs its own inner optimizer (raypar's AdamW) on its own gradients. At a
sync, the pseudo-gradient of replica r is (anchor - params_r), where the anchor is the
parameters every replica held after the previous sync; the replicas average it over dp
(one all-reduce of every delta in one flat buffer) and an outer optimizer, torch's SGD
with Nesterov momentum (DiLoCo, Douillard et al. 2023), steps the anchor with it. The new
anchor is copied into the parameters, so every replica leaves the sync with identical
parameters; the inner optimizer's state stays each replica's own.

Why not torch's data-parallel wrappers: `replicate` / DDP reduce gradients in every
backward, and their only switch (set_requires_gradient_sync / no_sync) is meant for
accumulation micro-batches, and would still keep the wrapper's hooks and buffers
around for nothing. Local SGD needs no per-step communication at all, so its stage
modules are left unwrapped (raypar/parallel/parallelize.py) and the one collective it
needs, the average of the deltas, is made here over the dp axes (ParallelMesh.all_reduce_dp).

Tensor and pipeline parallelism compose without anything special: a rank's modules hold
its stages' parameters (DTensor shards under tp), and each rank averages its own shard
with the ranks at the same (pp, tp) place in the other replicas. A pipeline's last stage's
copy of a tied embedding gets the same averaged delta as the first stage's embedding, as
both received the same inner updates.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from raypar.parallel.mesh import ParallelMesh


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (DTensor) parameter, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


class LocalSGD:
    """The anchor (parameters at the last sync) and the outer optimizer of a rank's stage
    modules. Its state is part of every checkpoint (state / load_state)."""

    def __init__(self, modules: list[nn.Module], pm: ParallelMesh, outer_lr: float,
                 outer_momentum: float):
        self.modules, self.pm = modules, pm
        # Names as named_parameters gives them (a tied head shares its embedding's entry).
        self.params = [dict(m.named_parameters()) for m in modules]
        with torch.no_grad():
            self.anchors = [{n: _local(p).detach().clone() for n, p in params.items()}
                            for params in self.params]
        self.outer = [torch.optim.SGD(list(anchors.values()), lr=outer_lr,
                                      momentum=outer_momentum, nesterov=outer_momentum > 0,
                                      foreach=False)
                      for anchors in self.anchors]
        # The momentum buffers exist from the start, so that a checkpoint always holds them
        # and a load fills them: torch's first step with a zero buffer gives the very buffer
        # its lazy clone(grad) would (0 * momentum + grad, dampening 0).
        for opt in self.outer:
            for t in opt.param_groups[0]["params"]:
                opt.state[t]["momentum_buffer"] = torch.zeros_like(t)

    @torch.no_grad()
    def sync(self) -> int:
        """Average the replicas' deltas since the last sync, step the outer optimizer, and
        set every replica's parameters to the new anchor. Collective over dp. Returns the
        bytes this rank handed to the all-reduce."""
        pairs = [(_local(params[n]), anchors[n])
                 for params, anchors in zip(self.params, self.anchors) for n in anchors]
        deltas = [a - p for p, a in pairs]
        flat = _flatten_dense_tensors(deltas)
        self.pm.all_reduce_dp(flat)
        # Summed over the replicas, then divided: the same bytes on every replica (the
        # all-reduce hands each rank the same result), so the outer steps agree too.
        flat.div_(self.pm.dp)
        for (p, a), d in zip(pairs, _unflatten_dense_tensors(flat, deltas)):
            a.grad = d
        for opt in self.outer:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p, a in pairs:
            p.copy_(a)
        return flat.numel() * flat.element_size()

    def nbytes(self) -> int:
        """Bytes of the anchor and the outer momentum (two more copies of the parameters)."""
        return sum(a.numel() * a.element_size() * 2 for anchors in self.anchors
                   for a in anchors.values())

    # -- checkpoints -----------------------------------------------------------------
    def _wrap(self, i: int, name: str, t: torch.Tensor) -> torch.Tensor:
        """t (a local tensor) with the placement of module i's parameter `name`: DCP then
        saves and reshards it like the parameter."""
        p = self.params[i][name]
        if isinstance(p, DTensor):
            return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())
        return t

    def state(self, i: int) -> dict[str, dict[str, Any]]:
        """Module i's {'anchor': {name: tensor}, 'outer': {name: momentum buffer}} (each
        the same on every replica), in the parameters' placements."""
        anchors, opt = self.anchors[i], self.outer[i]
        return {"anchor": {n: self._wrap(i, n, a) for n, a in anchors.items()},
                "outer": {n: self._wrap(i, n, opt.state[a]["momentum_buffer"])
                          for n, a in anchors.items()}}

    @torch.no_grad()
    def load_state(self, i: int, state: dict[str, dict[str, Any]]) -> None:
        """Module i's anchor and momentum from a loaded state(i) (copied: DCP may have
        loaded into other storage)."""
        anchors, opt = self.anchors[i], self.outer[i]
        for n, a in anchors.items():
            if n in state["anchor"]:
                a.copy_(_local(state["anchor"][n]))
                opt.state[a]["momentum_buffer"].copy_(_local(state["outer"][n]))
