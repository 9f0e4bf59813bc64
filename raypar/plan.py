"""`raypar plan`: which rank holds which pipeline stage and tensor shard, on which node,
and how much memory each rank needs (raypar/parallel/footprint.py computes it).

    raypar plan --config jobs/configs/laptop.yaml --set parallel.tp=2
"""
from __future__ import annotations

from typing import Any

from raypar.config import RunSpec
from raypar.parallel.footprint import RankPlan


def place_on_nodes(plans: list[RankPlan], nodes: list[dict[str, Any]], resource: str) -> None:
    """Ray Train's PACK strategy fills nodes in order: mirror it to say where ranks land
    (Ray may choose another node order; the grouping of neighbours is what holds)."""
    slots = []
    for node in nodes:
        if node.get("Alive"):
            slots += [node["NodeManagerAddress"]] * int(node["Resources"].get(resource, 0))
    for p, node in zip(plans, slots):
        p.node = node


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def format_plan(spec: RunSpec, plans: list[RankPlan], vocab_size: int) -> str:
    e = spec.parallel.elastic
    elastic = ([f"elastic: {e.min_replicas}..{e.max_replicas} replicas of "
                f"{spec.replica_size} workers; shown at {e.max_replicas}"] if e.enabled else [])
    spec = spec.with_dp(spec.max_dp)
    p = spec.parallel
    lines = elastic + [f"layout: dp={p.dp} x pp={p.pp} x tp={p.tp} = {spec.world_size} workers"
             f"  (dp_mode={p.dp_mode}"
             + (f", schedule={p.schedule}, virtual_stages={p.virtual_stages}" if p.pp > 1 else "")
             + (", sequence_parallel" if p.sequence_parallel and p.tp > 1 else "") + ")",
             f"batch: global {spec.train.global_batch} = dp {p.dp} x {spec.grad_accum} "
             f"micro-batches x {spec.train.micro_batch} sequences; vocab {vocab_size}",
             "",
             f"{'rank':>4} {'dp':>3} {'pp':>3} {'tp':>3}  {'stages':<10} {'layers':<18} "
             f"{'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total MiB':>9}  node"]
    for r in plans:
        layers = ";".join(f"{l[0]}-{l[-1]}" if len(l) > 1 else str(l[0]) for l in r.layers)
        lines.append(
            f"{r.rank:>4} {r.dp:>3} {r.pp:>3} {r.tp:>3}  {','.join(map(str, r.stages)):<10} "
            f"{layers:<18} {_mib(r.param_bytes)} {_mib(r.grad_bytes)} {_mib(r.optim_bytes)} "
            f"{_mib(r.activation_bytes)} {_mib(r.total_bytes):>9}  {r.node or '-'}")
    return "\n".join(lines)
