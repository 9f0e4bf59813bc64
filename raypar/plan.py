"""`raypar plan`: which rank holds which pipeline stage and tensor shard, on which node,
and how much memory each rank needs (raypar/parallel/footprint.py computes it).

    raypar plan --config jobs/configs/laptop.yaml --set parallel.tp=2
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

from raypar.config import RunSpec
from raypar.parallel.footprint import RankPlan

# A layout with more ranks than this shows dp replica 0's ranks (at most this many) and
# says what the rest hold, instead of a row per rank: every replica holds the same.
MAX_ROWS = 64


def place_on_nodes(plans: Sequence[RankPlan], nodes: list[dict[str, Any]],
                   resource: str, per_worker: int = 1) -> None:
    """Ray Train's PACK strategy fills nodes in order: mirror it to say where ranks land
    (Ray may choose another node order; the grouping of neighbours is what holds). Each
    worker takes `per_worker` of `resource` (train.threads CPUs on a CPU cluster)."""
    slots = []
    for node in nodes:
        if node.get("Alive"):
            fit = int(node["Resources"].get(resource, 0)) // max(per_worker, 1)
            slots += [node["NodeManagerAddress"]] * fit
    # By index: the cluster's slots bound the work, however large the world is.
    for rank, node in enumerate(slots[:len(plans)]):
        plans[rank].node = node


def tp_groups_across_nodes(ranks: Iterable[tuple[int, int, int, Optional[str]]]) -> list[str]:
    """One line per tensor-parallel group whose ranks Ray placed on more than one node:
    their all-reduces (every layer, forward and backward) then cross the network. ranks:
    (rank, dp, pp, node) of every rank; a group is the ranks of one (dp, pp)."""
    groups: dict[tuple[int, int], list[tuple[int, Optional[str]]]] = {}
    for rank, dp, pp, node in ranks:
        groups.setdefault((dp, pp), []).append((rank, node))
    lines = []
    for members in groups.values():
        nodes = sorted({node for _, node in members if node})
        if len(nodes) > 1:
            ids = sorted(rank for rank, _ in members)
            lines.append(f"tensor-parallel group of ranks {ids[0]}-{ids[-1]} spans nodes "
                         f"{', '.join(nodes)}: its all-reduces cross the network; give each "
                         f"node a multiple of parallel.tp workers")
    return lines


def _placed(plans: Sequence[RankPlan], world: int) -> Iterator[tuple[int, int, int, str]]:
    """(rank, dp, pp, node) of the ranks place_on_nodes placed: a prefix of the ranks, as
    long as the cluster's slots (so a huge world is not walked rank by rank)."""
    for i in range(world):
        r = plans[i]
        if not r.node:
            return
        yield r.rank, r.dp, r.pp, r.node


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
    if p.tp > 1:
        lines += ["warning: " + w for w in tp_groups_across_nodes(_placed(plans, world))]
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
