"""Each rank's footprint: which pipeline stages and layers it holds, and how much memory
its parameters, gradients, optimizer state and activations need, computed before any
worker starts (`raypar plan` shows it; the driver refuses a layout that cannot fit).

The parameter shapes come from the real model built on the meta device (no memory,
no weights) and cut into stages by the same function the workers use; a tensor-
parallel shard divides the matrices the tensor plan shards, FSDP divides by dp.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from raypar.config import RunSpec, model_config
from raypar.model import GPT
from raypar.parallel import schedules
from raypar.parallel.mesh import coords_of
from raypar.parallel.stages import build_stage_modules
from raypar.parallel.tensor import tp_shard_dim


@dataclass
class RankPlan:
    rank: int
    dp: int
    pp: int
    tp: int
    stages: list[int]
    layers: list[list[int]]
    param_bytes: int = 0
    block_param_bytes: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    activation_bytes: int = 0
    node: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.activation_bytes


def _stage_modules(spec: RunSpec, vocab_size: int, pp_rank: int):
    p = spec.parallel
    virtual = schedules.stages_per_rank(p.pp, p.virtual_stages)
    with torch.device("meta"):
        full = GPT(model_config(spec, vocab_size))
    return (schedules.stage_ids(pp_rank, p.pp, virtual, p.schedule),
            build_stage_modules(full, pp_rank, p.pp, virtual, p.schedule))


def activation_bytes(spec: RunSpec, n_layers: int, vocab_size: int, last: bool,
                     in_flight: int) -> int:
    """Rough bytes autograd keeps for one rank: per micro-batch in flight, each layer
    saves ~16 d_model-wide fp32 activations per token plus the attention probabilities
    (none with a fused attention kernel; counted anyway as an upper bound)."""
    m, p = spec.model, spec.parallel
    tokens = spec.train.micro_batch * spec.data.seq_len
    per_layer = 4 * tokens * (16 * m.d_model // p.tp + 2 * m.d_model)
    logits = 4 * 3 * tokens * vocab_size // p.tp if last else 0
    return in_flight * (n_layers * per_layer + logits)


def _in_flight(spec: RunSpec) -> int:
    """Micro-batches whose activations a rank holds at once: one without a pipeline, all
    of them when the schedule runs every forward first (gpipe), else up to one per stage
    in flight (the 1F1B family)."""
    p = spec.parallel
    if p.pp == 1:
        return 1
    if schedules.get(p.schedule).all_forwards_first:
        return spec.grad_accum
    return min(spec.grad_accum, schedules.n_stages(p.pp, p.virtual_stages))


def plan(spec: RunSpec, vocab_size: int) -> list[RankPlan]:
    """Every rank's stages, layers and memory; an elastic run's at its largest layout."""
    spec = spec.with_dp(spec.max_dp)
    p = spec.parallel
    stages_of = {r: _stage_modules(spec, vocab_size, r) for r in range(p.pp)}
    out = []
    for rank in range(spec.world_size):
        c = coords_of(rank, p.dp, p.pp, p.tp)
        ids, modules = stages_of[c.pp]
        params = block = 0
        seen = set()
        for m in modules:
            for name, prm in m.named_parameters():
                if id(prm) in seen:
                    continue
                seen.add(id(prm))
                n = prm.numel()
                if p.tp > 1 and tp_shard_dim(name) is not None:
                    n //= p.tp
                if p.dp_mode == "fsdp":
                    n = -(-n // p.dp)
                params += 4 * n
                if name.startswith("layers."):
                    block += 4 * n
        n_layers = sum(len(m.layers) for m in modules)
        last = any(m.lm_head is not None for m in modules)
        in_flight = _in_flight(spec)
        # With activation checkpointing only one block's activations are held at a time.
        saved_layers = 1 if spec.train.activation_checkpointing else n_layers
        in_flight_bytes = activation_bytes(spec, saved_layers, vocab_size, last, in_flight)
        out.append(RankPlan(
            rank=rank, dp=c.dp, pp=c.pp, tp=c.tp, stages=ids,
            layers=[sorted(int(k) for k in m.layers.keys()) for m in modules],
            param_bytes=params, block_param_bytes=block, grad_bytes=params,
            optim_bytes=2 * params, activation_bytes=in_flight_bytes))
    return out
