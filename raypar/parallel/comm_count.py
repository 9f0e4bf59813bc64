"""Counting the bytes a rank hands to the data-parallel collectives, per step.

    counter = CommCounter([dp group, ...])
    with counter.counting():
        ... forward, backward, optimizer step, local SGD's sync ...
    row.comm_bytes = counter.take()

What is counted: the payload of every collective call on one of the given groups (the
dp axes): all_reduce its tensor, reduce_scatter its input, all_gather its input (this
rank's own shard), each tensor's numel * element_size in the dtype that goes over the
wire (bf16 compression: 2 bytes). The bytes a ring algorithm then puts on the wire are a
fixed multiple of it (all-reduce 2(n-1)/n, reduce-scatter (n-1)/n, all-gather n-1 for n
replicas), the same for every strategy that uses the same collective.

Why a wrapper: torch has no per-call hook on its collectives. The profiler and
CommDebugMode see them, but trace every operator of the step (seconds, not microseconds),
and torch's DDP comm hooks see only DDP's buckets, not `replicate` (FSDP2) or local SGD.
Every data-parallel path in raypar calls the collectives through `torch.distributed`'s
module attributes (FSDP2's `foreach_reduce` / all-gather, torch's PowerSGD hook,
ParallelMesh.all_reduce_dp), so wrapping those attributes once per process sees them all.
The wrappers cost one dictionary lookup per collective call; outside `counting()` they
count nothing.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Optional

import torch
import torch.distributed as dist

# Collective -> (position, keyword) of the tensor whose bytes are the payload.
_PAYLOAD = {
    "all_reduce": (0, "tensor"),
    "reduce_scatter_tensor": (1, "input"),
    "reduce_scatter_single": (1, "input"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "all_gather_single": (1, "input_tensor"),
}

_lock = threading.Lock()
_active: list["CommCounter"] = []  # counters inside counting()
_installed = False


def _group_name(group: Optional[dist.ProcessGroup]) -> Optional[str]:
    if group is None:
        return None
    try:
        return group.group_name
    except (AttributeError, RuntimeError):
        return None


def _wrap(name: str):
    original = getattr(dist, name)
    position, keyword = _PAYLOAD[name]

    def counted(*args, **kwargs):
        if _active:
            tensor = args[position] if len(args) > position else kwargs.get(keyword)
            group = kwargs.get("group")
            if isinstance(tensor, torch.Tensor):
                gname = _group_name(group)
                for counter in list(_active):
                    if gname in counter.groups:
                        counter.add(tensor.numel() * tensor.element_size())
        return original(*args, **kwargs)

    counted.__wrapped__ = original
    counted.__name__ = name
    counted.__doc__ = original.__doc__
    return counted


def install() -> None:
    """Wrap torch.distributed's collectives (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        for name in _PAYLOAD:
            setattr(dist, name, _wrap(name))
        _installed = True


class CommCounter:
    """Bytes this rank hands to collectives over `groups` inside counting()."""

    def __init__(self, groups: Iterable[dist.ProcessGroup]):
        install()
        self.groups = {_group_name(g) for g in groups} - {None}
        self.bytes = 0

    def add(self, n: int) -> None:
        with _lock:
            self.bytes += n

    @contextlib.contextmanager
    def counting(self):
        with _lock:
            _active.append(self)
        try:
            yield self
        finally:
            with _lock:
                _active.remove(self)

    def take(self) -> int:
        """The bytes counted since the last take()."""
        with _lock:
            n, self.bytes = self.bytes, 0
        return n
