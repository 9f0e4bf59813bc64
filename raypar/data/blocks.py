"""Where a rank's blocks come from: a source it reads by global block index, and the
background prefetch that keeps its next reads local.

A source is either packed blocks in memory (ArrayBlocks: the bench, the tests' single
process references) or one split of a prepared token dataset (DatasetBlocks over a
shards.TokenDataset: what training workers read). Both answer the same three questions:
how many blocks, the blocks at these indices, and "these indices come next" (prefetch).

    train, val = open_splits("/data/corpus-tok", seq_len=128, cache_dir="/local/cache")
    feed = Prefetcher(train)
    feed.plan([p0, p1], lambda p: order.rank_blocks(o, p, 512, dp_rank, dp))
    batch = feed.read(p0, order.rank_blocks(o, p0, 512, dp_rank, dp))   # (64, 129)

A rank reads only its own blocks: Prefetcher.plan names its next few reads, a background
thread fetches and maps the shards that hold them (verified copies in the node-local
cache) and unmaps every other shard, so the step's read finds its data mapped already and
a rank holds a few steps' shards, never a whole split. We write this thread ourselves:
Ray Data's iterators prefetch batches of a dataset they stream in their own order, while
training reads the blocks of a seeded order that resumes and resizes exactly
(raypar/data/order.py), from shards that ranks of one node share.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from raypar.data.order import BlockOrder, MixtureOrder
from raypar.data.shards import TokenDataset, read_manifest

log = logging.getLogger("raypar")

# Steps of this rank's blocks kept fetched ahead: after each step, the next PREFETCH_STEPS
# steps' shards are fetched in the background, so each step's data was asked for while the
# steps before it trained.
PREFETCH_STEPS = 2


class BlockSource:
    """Blocks of seq_len + 1 tokens by global index. fetches: whether reading may have to
    fetch data (then prefetching is worth a thread)."""
    seq_len: int
    n_blocks: int
    fetches = False

    def __len__(self) -> int:
        return self.n_blocks

    def blocks(self, indices) -> np.ndarray:
        """The blocks at these global indices, in this order: (len(indices), seq_len + 1)."""
        raise NotImplementedError

    def prefetch(self, indices) -> None:
        """Make reading these blocks need no fetch (no-op for data in memory)."""

    def retain(self, indices) -> None:
        """Let go of whatever reading these blocks does not need (no-op in memory)."""

    def order(self, seed: int):
        """The seeded order a run reads this source's blocks in (raypar/data/order.py)."""
        return BlockOrder(self.n_blocks, seed)

    def source_counts(self, indices) -> Optional[dict[str, int]]:
        """How many of these blocks come from each source of a mixture (None: one source)."""
        return None


class ArrayBlocks(BlockSource):
    """Packed blocks in memory: an array (n_blocks, seq_len + 1)."""

    def __init__(self, array: np.ndarray):
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] < 2:
            raise ValueError(f"blocks: an array (n_blocks, seq_len + 1) with seq_len >= 1 is "
                             f"needed, got shape {array.shape}")
        self.array = array
        self.seq_len, self.n_blocks = array.shape[1] - 1, array.shape[0]

    def __repr__(self) -> str:
        return f"ArrayBlocks(n_blocks={self.n_blocks}, seq_len={self.seq_len})"

    def blocks(self, indices) -> np.ndarray:
        return self.array[np.asarray(indices, dtype=np.int64).reshape(-1)]


class DatasetBlocks(BlockSource):
    """One split of a prepared dataset, cut into blocks of seq_len + 1 tokens."""
    fetches = True

    def __init__(self, dataset: TokenDataset, seq_len: int):
        self.dataset, self.seq_len = dataset, int(seq_len)
        self.n_blocks = dataset.n_blocks(self.seq_len)

    def __repr__(self) -> str:
        return (f"DatasetBlocks({self.dataset.path}, split={self.dataset.split!r}, "
                f"n_blocks={self.n_blocks}, seq_len={self.seq_len})")

    def blocks(self, indices) -> np.ndarray:
        return self.dataset.blocks(indices, self.seq_len)

    def shards(self, indices) -> list[int]:
        """The shards these blocks read."""
        return self.dataset.shards_for(indices, self.seq_len)

    def prefetch(self, indices) -> None:
        self.dataset.prefetch(self.shards(indices))

    def retain(self, indices) -> None:
        self.dataset.release(keep=self.shards(indices))


class MixtureBlocks(BlockSource):
    """Several sources as one index space: global index i is block i - offset_s of source s,
    offset_s the blocks of the sources before it. Training reads it in a MixtureOrder (each
    position's source drawn by weight); names and weights say which source is which."""

    def __init__(self, parts: Sequence[BlockSource], names: Sequence[str],
                 weights: Sequence[float]):
        if not parts or len({p.seq_len for p in parts}) != 1:
            raise ValueError(f"mixture: sources of one seq_len are needed, got {list(parts)}")
        self.parts, self.names, self.weights = list(parts), list(names), list(weights)
        self.seq_len = parts[0].seq_len
        self.sizes = [p.n_blocks for p in parts]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).astype(np.int64)
        self.n_blocks = sum(self.sizes)
        self.fetches = any(p.fetches for p in parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.parts))})"

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(source, index within it) of each global index."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        src = np.searchsorted(self.offsets, idx, side="right") - 1
        return src, idx - self.offsets[src]

    def _by_source(self, indices) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(source, mask into indices, its local indices) for every source."""
        src, local = self._locate(indices)
        for s in range(len(self.parts)):
            mine = src == s
            yield s, mine, local[mine]

    def blocks(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = None
        for s, mine, local in self._by_source(idx):
            if local.size:
                got = self.parts[s].blocks(local)
                if out is None:
                    out = np.empty((idx.size, self.seq_len + 1), dtype=got.dtype)
                out[mine] = got
        return out if out is not None else np.zeros((0, self.seq_len + 1), dtype=np.int64)

    def prefetch(self, indices) -> None:
        for s, _, local in self._by_source(indices):
            if local.size:
                self.parts[s].prefetch(local)

    def retain(self, indices) -> None:
        for s, _, local in self._by_source(indices):
            self.parts[s].retain(local)

    def order(self, seed: int) -> MixtureOrder:
        return MixtureOrder(self.sizes, self.weights, seed)

    def source_counts(self, indices) -> dict[str, int]:
        src, _ = self._locate(indices)
        counts = np.bincount(src, minlength=len(self.parts))
        return {name: int(c) for name, c in zip(self.names, counts)}


class InterleavedBlocks(MixtureBlocks):
    """Validation over several sources: index i is block (i // k) % n_s of source s = i % k
    (k sources), so the first k * b indices hold b blocks of every source and a mixture's
    val_loss weighs each source alike. n_blocks is k times the largest source's."""

    def __init__(self, parts: Sequence[BlockSource], names: Sequence[str]):
        kept = [(p, n) for p, n in zip(parts, names) if p.n_blocks]
        super().__init__([p for p, _ in kept] or list(parts[:1]), [n for _, n in kept],
                         [1.0] * max(len(kept), 1))
        self.n_blocks = len(kept) * max(self.sizes) if kept else 0

    def _locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        k = len(self.parts)
        src = idx % k
        return src, (idx // k) % np.asarray(self.sizes, dtype=np.int64)[src]


def as_source(data: Union[BlockSource, np.ndarray], seq_len: Optional[int] = None) -> BlockSource:
    """data as a BlockSource (an array is wrapped); checks its blocks are seq_len + 1 long."""
    source = data if isinstance(data, BlockSource) else ArrayBlocks(data)
    if seq_len is not None and source.seq_len != seq_len:
        raise ValueError(f"blocks: {source!r} holds blocks of seq_len {source.seq_len}, "
                         f"the run's data.seq_len is {seq_len}")
    return source


def open_splits(path: str, seq_len: int, cache_dir: Optional[str] = None,
                cache_bytes: Optional[int] = None) -> tuple[DatasetBlocks, BlockSource]:
    """The train and val splits of the prepared dataset at path (local or a pyarrow URI),
    read through the node-local cache at cache_dir (None: in place when local, else
    shards._DEFAULT_CACHE). A dataset without a val split has an empty one. Reads the
    manifest and lists the shards; no shard data."""
    manifest = read_manifest(path)

    def split(name: str) -> DatasetBlocks:
        return DatasetBlocks(TokenDataset.open(path, cache_dir, split=name,
                                               cache_bytes=cache_bytes, manifest=manifest),
                             seq_len)
    train = split("train")
    if "val" not in manifest["splits"]:
        return train, ArrayBlocks(np.zeros((0, seq_len + 1), dtype=train.dataset.dtype))
    return train, split("val")


def open_mixture(sources: Sequence[dict], seq_len: int, cache_dir: Optional[str] = None,
                 cache_bytes: Optional[int] = None) -> tuple[MixtureBlocks, InterleavedBlocks]:
    """The train and val blocks of a mixture: sources [{"path", "weight", "name", and
    optionally "cache_dir"}], each a prepared dataset opened as open_splits does, through
    its own cache_dir (else the one given here) and its own cache bound."""
    splits = [open_splits(str(s["path"]), seq_len, s.get("cache_dir", cache_dir), cache_bytes)
              for s in sources]
    names = [str(s["name"]) for s in sources]
    return (MixtureBlocks([t for t, _ in splits], names, [float(s["weight"]) for s in sources]),
            InterleavedBlocks([v for _, v in splits], names))


class Prefetcher:
    """One source's upcoming reads, fetched on a background thread in the order they come.

    plan(keys, indices_of) names the next reads (a key per read, e.g. the step's stream
    position; soonest first); the thread releases every shard those reads do not need,
    then fetches theirs, read by read. read(key, indices) waits while its read is still
    queued or being fetched, then reads (finding its shards mapped). A source in memory
    needs none of it: no thread starts, and read is the source's own.

    A prefetch that fails (a damaged shard, a network error) is left to the read, which
    fetches again on the caller's thread and raises there, with the shard's name.
    """

    def __init__(self, source: BlockSource, name: str = "raypar-prefetch"):
        self.source, self.name = source, name
        self._cond = threading.Condition()
        self._keys: list[int] = []  # the current plan's reads, soonest first
        self._queue: list[tuple[int, np.ndarray]] = []  # planned reads not fetched yet
        self._done: set[int] = set()  # planned reads fetched (or failed: left to the read)
        self._busy: Optional[int] = None  # the read being fetched now
        self._keep: Optional[np.ndarray] = None  # blocks of a new plan: release the rest
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def plan(self, keys: Sequence[int], indices_of: Callable[[int], np.ndarray]) -> None:
        """The next reads are keys, soonest first; indices_of(key) gives a read's blocks
        (asked only when the plan changes). Returns at once."""
        keys = [int(k) for k in keys]
        if not self.source.fetches or self._closed:
            return
        with self._cond:
            if keys == self._keys:
                return
        reads = [(k, np.asarray(indices_of(k), dtype=np.int64)) for k in keys]
        with self._cond:
            self._keys = keys
            self._done &= set(keys)
            self._queue = [(k, idx) for k, idx in reads if k not in self._done
                           and k != self._busy]
            self._keep = (np.concatenate([idx for _, idx in reads]) if reads
                          else np.zeros(0, dtype=np.int64))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def read(self, key: int, indices) -> np.ndarray:
        """The blocks at indices, read `key` of the plan (or any read, if not planned)."""
        key = int(key)
        with self._cond:
            while not self._closed and (self._busy == key
                                        or any(k == key for k, _ in self._queue)):
                self._cond.wait()
        return self.source.blocks(indices)

    def idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until the plan is fetched (or the prefetcher closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or (not self._queue and self._busy is None
                                         and self._keep is None), timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread: it ends after the fetch in progress, if any (waited for up to
        timeout seconds; a daemon thread never holds up the process's exit)."""
        with self._cond:
            self._closed = True
            self._queue, self._keep = [], None
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._queue
                                        or self._keep is not None)
                    if self._closed:
                        return
                    keep, self._keep = self._keep, None
                    key, indices = self._queue.pop(0) if self._queue else (None, None)
                    self._busy = key
                try:
                    if keep is not None:
                        self.source.retain(keep)
                    if key is not None:
                        self.source.prefetch(indices)
                except Exception:  # noqa: BLE001 - the read fetches again, and raises
                    log.debug("%s: prefetching read %s failed; the read retries it",
                              self.name, key, exc_info=True)
                finally:
                    with self._cond:
                        self._busy = None
                        if key is not None and key in self._keys:
                            self._done.add(key)
                        self._cond.notify_all()
        finally:  # never leave a reader waiting on a thread that is gone
            with self._cond:
                self._closed = True
                self._queue, self._keep, self._busy = [], None, None
                self._cond.notify_all()
