"""`raypar plan`: which rank holds which pipeline stage and tensor shard, on which node,
and how much memory each rank needs (raypar/parallel/footprint.py computes it).

    raypar plan --config jobs/configs/laptop.yaml --set parallel.tp=2
"""
from __future__ import annotations

from typing import Any, Sequence

from raypar.config import RunSpec
from raypar.parallel.footprint import RankPlan

# A layout with more ranks than this shows dp replica 0's ranks (at most this many) and
# says what the rest hold, instead of a row per rank: every replica holds the same.
MAX_ROWS = 64


def place_on_nodes(plans: Sequence[RankPlan], nodes: list[dict[str, Any]],
                   resource: str) -> None:
    """Ray Train's PACK strategy fills nodes in order: mirror it to say where ranks land
    (Ray may choose another node order; the grouping of neighbours is what holds)."""
    slots = []
    for node in nodes:
        if node.get("Alive"):
            slots += [node["NodeManagerAddress"]] * int(node["Resources"].get(resource, 0))
    # By index: the cluster's slots bound the work, however large the world is.
    for rank, node in enumerate(slots[:len(plans)]):
        plans[rank].node = node


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f}"


def format_plan(spec: RunSpec, plans: Sequence[RankPlan], vocab_size: int) -> str:
    e = spec.parallel.elastic
    elastic = ([f"elastic: {e.min_replicas}..{e.max_replicas} replicas of "
                f"{spec.replica_size} workers; shown at {e.max_replicas}"] if e.enabled else [])
    spec = spec.with_dp(spec.max_dp)
    p = spec.parallel
    lines = elastic + [f"layout: dp={p.dp} x pp={p.pp} x tp={p.tp} = {spec.world_size} workers"
             f"  (dp_mode={p.dp_mode}"
             + (f", shard groups of {p.dp_shard}" if p.dp_mode == "hsdp" else "")
             + (f", schedule={p.schedule}, virtual_stages={p.virtual_stages}" if p.pp > 1 else "")
             + (", sequence_parallel" if p.sequence_parallel and p.tp > 1 else "") + ")",
             f"batch: global {spec.train.global_batch} = dp {p.dp} x {spec.grad_accum} "
             f"micro-batches x {spec.train.micro_batch} sequences; vocab {vocab_size}",
             "",
             f"{'rank':>4} {'dp':>3} {'pp':>3} {'tp':>3}  {'stages':<10} {'layers':<18} "
             f"{'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total MiB':>9}  node"]
    world, replica = len(plans), spec.replica_size
    shown = world if world <= MAX_ROWS else min(replica, MAX_ROWS)
    lines += [_row(plans[rank]) for rank in range(shown)]
    if shown < world:
        lines += _summary(plans, shown, replica, p.dp)
    return "\n".join(lines)


def _row(r: RankPlan) -> str:
    layers = ";".join(f"{l[0]}-{l[-1]}" if len(l) > 1 else str(l[0]) for l in r.layers)
    return (f"{r.rank:>4} {r.dp:>3} {r.pp:>3} {r.tp:>3}  {','.join(map(str, r.stages)):<10} "
            f"{layers:<18} {_mib(r.param_bytes)} {_mib(r.grad_bytes)} {_mib(r.optim_bytes)} "
            f"{_mib(r.activation_bytes)} {_mib(r.total_bytes):>9}  {r.node or '-'}")


def _summary(plans: Sequence[RankPlan], shown: int, replica: int, dp: int) -> list[str]:
    """What the rows left out of a large layout say, and the whole layout's memory."""
    lines = []
    if shown < replica:
        lines.append(f"... ranks {shown}..{replica - 1} of replica 0 not shown")
    if dp > 1:
        lines.append(f"... dp replicas 1..{dp - 1} (ranks {replica}..{dp * replica - 1}) hold "
                     f"the same as replica 0: rank r + k*{replica} as rank r")
    total = (plans.total_bytes() if hasattr(plans, "total_bytes")
             else sum(r.total_bytes for r in plans))
    lines.append(f"all {len(plans)} ranks: {total / 2**30:.1f} GiB of parameters, "
                 f"gradients, optimizer state and activations")
    return lines
