"""Packing documents into fixed blocks, and the replicas' shares of a global batch.

Every packed block has a global index; optimizer step s consumes stream positions
[s*G, (s+1)*G) of a seeded order of those indices (raypar/data/order.py: the order
training uses); data-parallel rank r of D takes the r-th contiguous slice of that batch
(rank_slice). All of it is arithmetic on (seed, step, G, D), so a resumed or resized run
that knows its next step consumes exactly the blocks an uninterrupted run would have.

    blocks = pack([[1, 2, 3], [4, 5]], eot_id=0, block_len=3)   # [[1,2,3],[0,4,5]]
    idx = order.BlockOrder(len(blocks), seed=1337).blocks(7 * 16, 16)   # step 7, G = 16
    mine = blocks[rank_slice(idx, dp_rank, dp_size)]

block_order, stream_indices and global_batch_indices below are the order training used
before order.py: a materialised PCG64 permutation per epoch (O(n_blocks) memory). No
training code reads them any more; they remain for raypar.data's exports and their tests.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves memory and transfer whenever the vocabulary fits in it."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def stream_length(docs: Iterable[Sequence[int]]) -> int:
    """Tokens in the packed stream before cutting: every document plus its eot."""
    return sum(len(d) + 1 for d in docs)


def pack(docs: Iterable[Sequence[int]], eot_id: int, block_len: int,
         vocab_size: Optional[int] = None) -> np.ndarray:
    """Concatenate docs in order, each followed by eot_id, and cut the stream into
    (n_blocks, block_len) consecutive blocks; the final partial block is dropped
    (stream_length(docs) - blocks.size tokens).

    Blocks cross document boundaries on purpose: no padding, no wasted compute,
    and the eot token tells the model where one document ends.
    """
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    arrays = [_as_ids(d) for d in docs]
    total = sum(a.size + 1 for a in arrays)
    top = max([eot_id] + [int(a.max()) for a in arrays if a.size])
    if min([eot_id] + [int(a.min()) for a in arrays if a.size]) < 0:
        raise ValueError("token ids must be >= 0")
    if vocab_size is not None and top >= vocab_size:
        raise ValueError(f"token id {top} does not fit vocab_size {vocab_size}")
    dtype = token_dtype(vocab_size if vocab_size is not None else top + 1)
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for a in arrays:
        stream[pos:pos + a.size] = a
        stream[pos + a.size] = eot_id
        pos += a.size + 1
    n_blocks = total // block_len
    # A copy, not a view: a view would keep the whole stream (tail included) alive.
    return stream[:n_blocks * block_len].reshape(n_blocks, block_len).copy()


def _as_ids(doc: Sequence[int]) -> np.ndarray:
    a = np.asarray(doc).reshape(-1)
    return a if a.dtype.kind in "iu" else a.astype(np.int64)  # [] reads as float64


@lru_cache(maxsize=4)
def _permutation(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    # PCG64 seeded by the (seed, epoch) pair: independent of numpy's global state,
    # and the same on every machine and numpy version that keeps PCG64's stream.
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n_blocks)
    perm.setflags(write=False)
    return perm


def block_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The block indices of epoch `epoch`, in the order they are consumed."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    return _permutation(int(n_blocks), int(seed), int(epoch)).copy()


def stream_indices(start: int, count: int, n_blocks: int, seed: int) -> np.ndarray:
    """Block indices at global stream positions [start, start + count).

    The positions are consecutive, so each epoch they touch is one slice of the output
    and of that epoch's permutation: memory is the output plus one permutation, and a
    batch spanning many epochs of a tiny corpus costs one pass per epoch, not one pass
    over the whole batch per epoch.
    """
    start, count, n_blocks = int(start), int(count), int(n_blocks)
    out = np.empty(count, dtype=np.int64)
    done = 0
    while done < count:  # one epoch's stretch per turn
        epoch, offset = divmod(start + done, n_blocks)
        take = min(count - done, n_blocks - offset)
        out[done:done + take] = _permutation(n_blocks, int(seed), epoch)[offset:offset + take]
        done += take
    return out


def global_batch_indices(step: int, global_batch: int, n_blocks: int, seed: int) -> np.ndarray:
    """Block indices of optimizer step `step` (0-based), over all dp ranks."""
    if step < 0 or global_batch < 1 or n_blocks < 1:
        raise ValueError(f"need step >= 0, global_batch >= 1, n_blocks >= 1; "
                         f"got {step}, {global_batch}, {n_blocks}")
    return stream_indices(step * global_batch, global_batch, n_blocks, seed)


def rank_slice(indices: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """Data-parallel rank dp_rank's contiguous share of a global batch's indices."""
    assert len(indices) % dp_size == 0, (
        f"global batch of {len(indices)} is not divisible by dp_size={dp_size}")
    assert 0 <= dp_rank < dp_size, f"dp_rank {dp_rank} outside [0, {dp_size})"
    per = len(indices) // dp_size
    return indices[dp_rank * per:(dp_rank + 1) * per]
