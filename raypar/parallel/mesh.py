"""The one place that knows how ranks map onto the (dp, pp, tp) grid.

Ray Train starts dp*pp*tp workers and initialises the default process group;
`build_mesh` lays a DeviceMesh over it with tp innermost, so tensor-parallel
peers have adjacent ranks (and, under Ray's PACK placement, share a node),
then pipeline stages, then data-parallel replicas outermost. The dp axis is
itself two: shard groups of `dp_shard` adjacent replicas (hsdp shards within
one, so it stays on a node) inside `dp // dp_shard` replica groups; a rank's
replica index (coords.dp) is its place in the two, shard group innermost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("dp_rep", "dp_shard", "pp", "tp")


@dataclass(frozen=True)
class Coords:
    """Where one rank sits in the grid."""
    dp: int
    pp: int
    tp: int


def coords_of(rank: int, dp: int, pp: int, tp: int) -> Coords:
    """Rank -> (dp, pp, tp) coordinates, tp varying fastest."""
    if not 0 <= rank < dp * pp * tp:
        raise ValueError(f"rank {rank} outside a world of {dp * pp * tp}")
    return Coords(dp=rank // (pp * tp), pp=(rank // tp) % pp, tp=rank % tp)


def rank_of(c: Coords, dp: int, pp: int, tp: int) -> int:
    """Inverse of coords_of."""
    return (c.dp * pp + c.pp) * tp + c.tp


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ParallelMesh:
    """The DeviceMesh plus this rank's coordinates and the sizes of each axis."""
    mesh: DeviceMesh
    coords: Coords
    dp: int
    pp: int
    tp: int
    dp_shard: int = 1

    @property
    def dp_mesh(self) -> DeviceMesh:
        """Every replica, as a 1-D mesh: what fsdp shards over and ddp replicates over (hsdp,
        whose replicas span both dp axes, uses hsdp_mesh)."""
        if self.dp_shard == 1:
            return self.mesh["dp_rep"]
        if self.dp_shard == self.dp:
            return self.mesh["dp_shard"]
        raise ValueError("replicas span two mesh axes under hsdp: use hsdp_mesh")

    @property
    def hsdp_mesh(self) -> DeviceMesh:
        """(replica groups, shard group) as a 2-D mesh: hsdp's."""
        return self.mesh["dp_rep", "dp_shard"]

    @property
    def dp_groups(self) -> list[dist.ProcessGroup]:
        """The process groups of the dp axes that have more than one replica."""
        return [self.mesh.get_group(dim) for dim in ("dp_shard", "dp_rep")
                if self.mesh.size(DIMS.index(dim)) > 1]

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over every replica, in place (over both dp axes; a flattened "dp" axis
        would need a slice of the mesh, which ranks sitting out cannot take)."""
        for group in self.dp_groups:
            dist.all_reduce(t, group=group)
        return t

    def mean_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        """The replicas' mean of the 1-D tensor `t`, elementwise, the same bits on every
        replica whatever t's length: the values are gathered (over both dp axes) and summed
        in replica order here, where a reduction's summation order could depend on how the
        collective splits the tensor. So a row's mean does not depend on how many rows
        were agreed together (raypar/train/trainer.py RankTrainer.agree)."""
        parts = [t]  # in replica order (the shard axis innermost, as coords.dp counts)
        for group in self.dp_groups:  # dp_shard first, then dp_rep
            size = dist.get_world_size(group)
            mine = torch.cat(parts)  # what this rank has so far, one gather for all of it
            out = [torch.empty_like(mine) for _ in range(size)]
            dist.all_gather(out, mine, group=group)
            parts = [piece for o in out for piece in o.split(t.numel())]
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total / len(parts)

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self.mesh["pp"]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.pp - 1


def build_mesh(dp: int, pp: int, tp: int, dp_shard: int = 1) -> Optional[ParallelMesh]:
    """Lay the (dp_rep, dp_shard, pp, tp) mesh over the already-initialised default process
    group.

    The world may be larger than the layout (an elastic run whose workers do not make a
    whole number of usable replicas): the mesh then covers the first dp*pp*tp ranks, every
    rank still takes part in creating its process groups (a collective), and the ranks
    beyond it get None: they sit out."""
    world, n = dist.get_world_size(), dp * pp * tp
    if world < n:
        raise ValueError(f"world size {world} < dp*pp*tp = {dp}*{pp}*{tp}")
    if dp % dp_shard:
        raise ValueError(f"dp_shard {dp_shard} does not divide dp {dp}")
    shape = (dp // dp_shard, dp_shard, pp, tp)
    if world == n:
        mesh = init_device_mesh(device_type(), shape, mesh_dim_names=DIMS)
    else:
        mesh = DeviceMesh(device_type(), torch.arange(n).view(shape), mesh_dim_names=DIMS)
    rank = dist.get_rank()
    if rank >= n:
        return None
    return ParallelMesh(mesh=mesh, coords=coords_of(rank, dp, pp, tp), dp=dp, pp=pp, tp=tp,
                        dp_shard=dp_shard)
