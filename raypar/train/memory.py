"""Per-rank memory accounting: what this rank really holds, and its peak activations.

`state_bytes` counts the local shard of every parameter, gradient and optimizer
tensor (a DTensor counts only its local piece; a tied tensor counts once).
`ActivationMeter` measures the peak bytes of tensors autograd saves for the
backward pass, live at the same time, through saved-tensor hooks. On CUDA
torch.cuda.max_memory_allocated gives the allocator's view as well; on CPU there
is no allocator statistic, which is why the hooks exist.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def state_bytes(modules: Iterable[torch.nn.Module],
                optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and optimizer state."""
    params: dict[int, torch.Tensor] = {}
    for m in modules:
        for p in m.parameters():
            params[id(p)] = p
    grads = sum(_nbytes(p.grad) for p in params.values() if p.grad is not None)
    optim = 0
    for opt in optimizers:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    optim += _nbytes(v)
    return {"param_bytes": sum(_nbytes(p) for p in params.values()), "grad_bytes": grads,
            "optim_bytes": optim}


class _Saved:
    """What the pack hook hands autograd: the tensor, plus a finalizer that counts it out."""
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMeter:
    """Peak bytes of saved activations over the `with` block (storages counted once)."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}   # storage ptr -> [bytes, refcount]
        self.current = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        holder = _Saved(t)
        local = _local(t)
        try:
            key, size = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return holder
        if isinstance(t, torch.nn.Parameter) or size == 0:
            return holder  # parameters are counted as parameters, not activations
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [size, 1]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    @staticmethod
    def _unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False
