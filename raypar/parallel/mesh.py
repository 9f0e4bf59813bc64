"""The one place that knows how ranks map onto the (dp, pp, tp) grid.

Ray Train starts dp*pp*tp workers and initialises the default process group;
`build_mesh` lays a DeviceMesh over it with tp innermost, so tensor-parallel
peers have adjacent ranks (and, under Ray's PACK placement, share a node),
then pipeline stages, then data-parallel replicas outermost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("dp", "pp", "tp")


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

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

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
    def dp_tp_mesh(self) -> DeviceMesh:
        """The 2-D (dp, tp) sub-mesh FSDP shards over when tensor parallelism is on."""
        return self.mesh["dp", "tp"]

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.pp - 1


def build_mesh(dp: int, pp: int, tp: int) -> Optional[ParallelMesh]:
    """Lay the (dp, pp, tp) mesh over the already-initialised default process group.

    The world may be larger than the layout (an elastic run whose workers do not make a
    whole number of usable replicas): the mesh then covers the first dp*pp*tp ranks, every
    rank still takes part in creating its process groups (a collective), and the ranks
    beyond it get None: they sit out."""
    world, n = dist.get_world_size(), dp * pp * tp
    if world < n:
        raise ValueError(f"world size {world} < dp*pp*tp = {dp}*{pp}*{tp}")
    if world == n:
        mesh = init_device_mesh(device_type(), (dp, pp, tp), mesh_dim_names=DIMS)
    else:
        mesh = DeviceMesh(device_type(), torch.arange(n).view(dp, pp, tp), mesh_dim_names=DIMS)
    rank = dist.get_rank()
    if rank >= n:
        return None
    return ParallelMesh(mesh=mesh, coords=coords_of(rank, dp, pp, tp), dp=dp, pp=pp, tp=tp)
