"""The seeded order in which a run consumes blocks, in O(1) memory.

Stream position p belongs to epoch p // n and reads block perm_e(p % n), where perm_e is
a keyed bijection on [0, n): each epoch covers every block exactly once, in its own order,
and no rank ever holds an array of n block indices (n is about 10**8 at 10B tokens).

    order = BlockOrder(n_blocks=80_000_000, seed=1337)
    order.blocks(start=7 * 512, count=512)     # step 7's global batch of 512 blocks

The bijection is a Feistel network over the k-bit integers, 2**k the smallest power of
two >= n, made a permutation of [0, n) by cycle walking: a value that lands outside
[0, n) is permuted again until it lands inside. Since 2**k < 2n, a walk takes under two
passes on average. numpy has no keyed permutation that needs no O(n) table (its
Generator.permutation materialises one), hence this module.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np

ROUNDS = 8  # even: the high and the low half are each rewritten 4 times
MAX_BLOCKS = 1 << 62  # positions stay below 2**63, the int64 output's range
_VERSION = b"raypar block order v1"  # bump when the permutation changes
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U64 = np.uint64


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (a fresh array; wraps modulo 2**64): a
    bijection in which every input bit flips about half of the output bits."""
    z = z ^ (z >> _U64(30))
    z *= _M1
    z ^= z >> _U64(27)
    z *= _M2
    z ^= z >> _U64(31)
    return z


def _round_keys(seed: int, n_blocks: int) -> list[int]:
    """ROUNDS 64-bit keys from (seed, n_blocks): the same on every machine and numpy version."""
    digest = hashlib.blake2b(_VERSION + f" {int(seed)} {int(n_blocks)}".encode(),
                             digest_size=8 * ROUNDS).digest()
    return [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(ROUNDS)]


class BlockOrder:
    """Global block indices at stream positions, fixed by (seed, n_blocks)."""

    def __init__(self, n_blocks: int, seed: int):
        n_blocks = int(n_blocks)
        if not 1 <= n_blocks <= MAX_BLOCKS:
            raise ValueError(f"n_blocks: {n_blocks} is outside [1, 2**62]; "
                             f"a corpus needs at least one block")
        self.n_blocks, self.seed = n_blocks, int(seed)
        bits = (n_blocks - 1).bit_length()  # 2**bits >= n_blocks > 2**(bits - 1)
        # Uneven halves keep the domain at 2**bits (< 2n): walks stay short for every n.
        self._lo_bits = bits // 2
        self._hi_bits = bits - self._lo_bits
        self._keys = _round_keys(self.seed, n_blocks)

    def __repr__(self) -> str:
        return f"BlockOrder(n_blocks={self.n_blocks}, seed={self.seed})"

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Block indices (int64) at stream positions [start, start + count)."""
        start, count = int(start), int(count)
        if start < 0 or count < 0 or start + count > 1 << 63:
            raise ValueError(f"positions [{start}, {start + count}) are outside [0, 2**63)")
        return self.at(np.arange(count, dtype=np.uint64) + _U64(start))

    def at(self, positions) -> np.ndarray:
        """Block indices (int64) at these stream positions (ascending, within a span of a
        few epochs: a step's, or a mixture source's share of one)."""
        pos = np.asarray(positions, dtype=np.uint64).reshape(-1)
        n = self.n_blocks
        if pos.size == 0 or n == 1:  # one block: every position reads it, no keys needed
            return np.zeros(pos.size, dtype=np.int64)
        first, last = int(pos[0]) // n, int(pos[-1]) // n
        if first == last:  # the common case: one epoch, one set of round keys
            offsets, which = pos - _U64(first * n), None
        else:  # their epochs are first..last, a small range
            epoch = pos // _U64(n)
            offsets = pos - epoch * _U64(n)
            which = (epoch - _U64(first)).astype(np.intp)
        keys = self._epoch_keys(first, last - first + 1)
        return self._permute(offsets, keys, which).astype(np.int64)

    def ident(self) -> dict:
        """What fixes the block at each position (checkpoints record it)."""
        return {"version": order_version(), "n_blocks": self.n_blocks}

    def epoch(self, epoch: int) -> np.ndarray:
        """All n block indices of one epoch, in order (O(n): for tests and small corpora)."""
        return self.blocks(int(epoch) * self.n_blocks, self.n_blocks)

    def _epoch_keys(self, first: int, count: int) -> list[np.ndarray]:
        """Per round, the keys of epochs first..first+count-1 (uint64, one per epoch)."""
        # mix is a bijection, so distinct epochs get distinct keys in every round.
        tag = _mix(np.arange(count, dtype=np.uint64) + _U64(first) + _GOLDEN)
        return [_mix(tag ^ _U64(k)) for k in self._keys]

    def _permute(self, x: np.ndarray, keys: list[np.ndarray], which) -> np.ndarray:
        """Cycle walking: apply the Feistel permutation until each value is below n. Every
        walk ends, because x's cycle in the permutation passes through x itself (< n)."""
        n = _U64(self.n_blocks)
        y = self._feistel(x, keys, which)
        pending = np.flatnonzero(y >= n)
        while pending.size:
            sub = None if which is None else which[pending]
            vals = self._feistel(y[pending], keys, sub)
            done = vals < n
            y[pending[done]] = vals[done]
            y[pending[~done]] = vals[~done]
            pending = pending[~done]
        return y

    def _feistel(self, x: np.ndarray, keys: list[np.ndarray], which) -> np.ndarray:
        """One keyed bijection of the (hi_bits + lo_bits)-bit integers: rounds alternately
        xor the high half with a hash of the low half and the low half with a hash of the
        high half; each round is undone by repeating it, so the whole is a bijection."""
        lo_bits, hi_bits = self._lo_bits, self._hi_bits
        lo = x & _U64((1 << lo_bits) - 1)
        hi = x >> _U64(lo_bits)
        for r, key in enumerate(keys):
            k = key[0] if which is None else key[which]
            # The top bits of the hash: splitmix64 mixes them best.
            if r % 2 == 0 and hi_bits:
                hi ^= _mix(lo ^ k) >> _U64(64 - hi_bits)
            elif r % 2 == 1 and lo_bits:
                lo ^= _mix(hi ^ k) >> _U64(64 - lo_bits)
        return (hi << _U64(lo_bits)) | lo


class MixtureOrder:
    """Global block indices at stream positions when blocks come from several sources.

    Position p draws its source from a keyed hash of (seed, p), with probability weight_s /
    sum(weights). The k-th position that draws source s reads the block at position k of
    s's own BlockOrder (keyed by the seed and s), offset by the blocks of the sources before
    it: each source is read in its own seeded order, every block once per pass over it,
    however rarely it is drawn. Both are functions of the position alone, so a mixture
    resumes and resizes exactly like one corpus.

    k needs the draws of s before p: counted from the nearest position whose draws are
    known (remembered: the last ones asked for, and the checkpoint's, which the trainer
    hands to remember() on load), so a step costs O(global batch); without any, from 0 in
    bounded memory (O(p) time: a resume from a checkpoint that did not record them).

        mix = MixtureOrder([80_000, 20_000], [0.3, 0.7], seed=1337)
        mix.blocks(7 * 512, 512)        # indices < 80_000 are source 0's, the rest source 1's
    """

    MEMO = 16  # positions whose draws are kept

    def __init__(self, sizes, weights, seed: int):
        sizes, weights = [int(n) for n in sizes], [float(w) for w in weights]
        if not sizes or len(sizes) != len(weights) or min(weights) <= 0:
            raise ValueError(f"a mixture needs one positive weight per source, got sizes "
                             f"{sizes} and weights {weights}")
        self.sizes, self.weights, self.seed = sizes, weights, int(seed)
        self.n_blocks = sum(sizes)
        self.offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        digest = hashlib.blake2b(_VERSION + f" mixture {self.seed}".encode(), digest_size=8)
        self._key = _U64(int.from_bytes(digest.digest(), "little"))
        # Source s owns the draws u in [cut_{s-1}, cut_s) of [0, 1).
        cum = np.cumsum(weights) / sum(weights)
        cum[-1] = 1.0
        self._cuts = cum
        self.orders = [BlockOrder(n, int.from_bytes(hashlib.blake2b(
            f"{self.seed} source {s}".encode(), digest_size=8).digest(), "little"))
            for s, n in enumerate(sizes)]
        # position -> draws of each source before it; a lock: a rank's prefetch thread asks
        # for its next steps' blocks beside the step's own thread.
        self._memo: OrderedDict[int, np.ndarray] = OrderedDict(
            {0: np.zeros(len(sizes), dtype=np.int64)})
        self._lock = threading.Lock()

    def remember(self, position: int, draws) -> None:
        """The draws of each source before `position` (a checkpoint's), so that a resume
        need not count them again."""
        draws = np.asarray(draws, dtype=np.int64).reshape(-1)
        if draws.size != len(self.sizes) or int(draws.sum()) != int(position):
            raise ValueError(f"draws {draws.tolist()} do not add up to position {position} "
                             f"over {len(self.sizes)} sources")
        with self._lock:
            self._keep(int(position), draws)

    def _keep(self, position: int, draws: np.ndarray) -> None:
        """Remember draws at position; the least recently used go first (never 0's)."""
        self._memo[position] = draws
        self._memo.move_to_end(position)
        while len(self._memo) > self.MEMO:
            old = next(p for p in self._memo if p != 0)
            del self._memo[old]

    def draws_before(self, position: int) -> np.ndarray:
        """How many positions before `position` drew each source (int64 per source)."""
        position = int(position)
        with self._lock:
            below = max(p for p in self._memo if p <= position)
            known = self._memo[below]
            self._memo.move_to_end(below)
        draws = known + self.counts(below, position - below)
        with self._lock:
            self._keep(position, draws)
        return draws

    def __repr__(self) -> str:
        return f"MixtureOrder(sizes={self.sizes}, weights={self.weights}, seed={self.seed})"

    def sources(self, start: int, count: int) -> np.ndarray:
        """The source (int64) each of positions [start, start + count) draws from."""
        pos = np.arange(int(count), dtype=np.uint64) + _U64(int(start))
        u = (_mix(pos ^ self._key) >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return np.minimum(np.searchsorted(self._cuts, u, side="right"),
                          len(self.sizes) - 1).astype(np.int64)

    def blocks(self, start: int, count: int) -> np.ndarray:
        start, count = int(start), int(count)
        if start < 0 or count < 0 or start + count > 1 << 63:
            raise ValueError(f"positions [{start}, {start + count}) are outside [0, 2**63)")
        src = self.sources(start, count)
        before = self.draws_before(start)
        out = np.empty(count, dtype=np.int64)
        for s, order in enumerate(self.orders):
            mine = src == s
            n = int(mine.sum())
            if n:  # source s's draws before[s], before[s] + 1, ...: its own order's positions
                k = np.arange(n, dtype=np.uint64) + _U64(int(before[s]))
                out[mine] = self.offsets[s] + order.at(k)
        with self._lock:
            self._keep(start + count, before + np.bincount(src, minlength=len(self.sizes)))
        return out

    def counts(self, start: int, count: int, chunk: int = 1 << 22) -> np.ndarray:
        """Positions of [start, start + count) that draw from each source (int64 per
        source); in chunks, so a resume at position 10**9 recounts in bounded memory."""
        total = np.zeros(len(self.sizes), dtype=np.int64)
        for lo in range(int(start), int(start) + int(count), chunk):
            n = min(chunk, int(start) + int(count) - lo)
            total += np.bincount(self.sources(lo, n), minlength=len(self.sizes))
        return total

    def ident(self) -> dict:
        # "draws": each source's k-th draw reads its own order's position k (earlier
        # mixture checkpoints read position p: another order, which this tells apart).
        return {"version": order_version(), "n_blocks": self.n_blocks, "draws": 1,
                "mixture": [[n, w] for n, w in zip(self.sizes, self.weights)]}


@lru_cache(maxsize=8)
def order_version() -> str:
    """Names this permutation: checkpoints record it, so a resume can tell when it changed."""
    return _VERSION.decode()


def block_order(n_blocks: int, seed: int) -> BlockOrder:
    """A shared BlockOrder per (n_blocks, seed): cheap to build, but steps ask often."""
    return BlockOrder(n_blocks, seed)


def stream_indices(start: int, count: int, n_blocks: int, seed: int) -> np.ndarray:
    """Block indices at global stream positions [start, start + count): the same
    signature as packing.stream_indices, with this module's O(1)-memory order."""
    return block_order(int(n_blocks), int(seed)).blocks(start, count)


def rank_blocks(order: BlockOrder, position: int, global_batch: int, dp_rank: int,
                dp_size: int) -> np.ndarray:
    """Replica dp_rank's block indices for the step that starts at stream position
    `position`: packing.rank_slice of that step's global batch, computed for the replica's
    own positions only (a rank looks ahead at its next steps without the others' blocks)."""
    if global_batch % dp_size or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp rank {dp_rank} of {dp_size} cannot take an equal slice of a "
                         f"global batch of {global_batch}")
    per = global_batch // dp_size
    return order.blocks(int(position) + dp_rank * per, per)
