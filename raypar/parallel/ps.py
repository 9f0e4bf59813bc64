"""A parameter server on Ray actors: parallel.dp_mode=ps.

    plan = plan_shards(spec, vocab_size)             # the driver: who owns which rows
    shards = start_shards(spec, plan)                # N actors, handed to every worker
    client = PSClient(shards, plan, staleness, named_params)   # each worker, its stages
    client.start(generation, step, rank, ...)        # every worker-group start: reset them
    client.sync(step)                                # ... and pull what step computes on
    norm = client.step(t, lr)                        # push step t's gradients, pull params
    stop_shards(shards)                              # the driver, however the run ends

RankTrainer (raypar/train/trainer.py) holds the client: `start_ps`, its optimizer step and
its checkpoint state are the hooks.

Why our own code: torch.distributed has no parameter server (its RPC framework, which
once had one in its examples, is deprecated), and Ray ships none either; Ray gives us the
actors, their restarts and the object store the gradients travel through.

The model's parameters are split into pieces (whole tensors, or row slices of the tensors
larger than a shard's fair share), and the pieces dealt to `parallel.ps.shards` actors by
bytes, largest first, each to the least loaded one (`plan_shards`: deterministic, the
same on the driver and every worker). Each shard holds its pieces' fp32 values and a
torch AdamW over them, with the run's weight-decay groups and learning-rate schedule.

A step t, seen from a worker (every rank of every replica, each with its stage's
parameters): forward and backward on its local copy, with its loss scaled by
1 / (micro-batches * dp) as under ddp, so that the replicas' gradients sum to the global
one; then one `push` per shard (the gradients of the pieces that shard owns, put into the
object store with `ray.put`, so only a reference passes through the call), and a `pull` of
the parameters the next step computes on. A shard applies update t once it holds every
rank's push of step t: it sums the pushes in rank order, sends its squared norm to shard
0, which adds all shards' in shard order and returns the global gradient norm (the norm
ddp clips by: every parameter once, the tied embedding once), clips by it, and steps AdamW
with the learning rate of step t (the trainer's schedule, sent with the pushes). Updates
are applied strictly in step order.

With tensor parallelism a rank holds a shard of each tp-sharded parameter: it pushes and
pulls only its own block of each piece, and the shard adds the blocks where they lie (see
PSClient), so the update is the same as without tp.

Staleness (`parallel.ps.staleness` = s): the gradient of step t is computed on version
v(t) = max(0, t - s) of the parameters (version k: after k updates). With s = 0 that is
the synchronous server, whose math is ddp's. With s > 0 a replica that has pushed step t
pulls version max(0, t + 1 - s) and goes on, without waiting for the updates after it; the
version every gradient used and the order of the updates are fixed by the step alone, so a
run is reproducible and resumes exactly. Each shard keeps the last s versions of its
pieces to serve them. Rows record each step's `staleness` (t - v(t)) and, for s > 0, the
norm of the newest update the replica has seen (update t - s), not of its own (applied
later).

Compression (`parallel.grad_compression`): what a rank pushes for a piece, encoded by its
`PushCodec` and decoded by the shard before the sum, in fp32:
- 'bf16': the gradient cast to bfloat16 (half the bytes); the shard upcasts it.
- 'powersgd': a piece viewed as a matrix M (its rows x the rest) travels as two rank-r
  factors (r = parallel.powersgd_rank), PowerSGD's single power iteration with error
  feedback and warm start (Vogels et al. 2019; the arithmetic of torch's powerSGD_hook,
  on one rank's gradient alone): M = gradient + this rank's error, P = M Q, P
  orthonormalised, Q = M^T P, error = M - P Q^T, and the shard adds P Q^T in rank order.
  Q starts from a generator keyed by train.seed and the piece, then carries over (warm
  start). Vectors and matrices that would not shrink by torch's min_compression_rate go
  uncompressed, as in the hook. The error and Q are the rank's own state: a checkpoint
  saves them per rank (RankTrainer.extra_files), and a resume with the same layout
  restores them, so a compressed run resumes exactly too.

Fault tolerance: every worker-group start (a fresh run, a resume, a restart after any
failure) resets the shards from the workers' state (replica 0's ranks send their pieces:
the initial weights, or the checkpoint they loaded), under a new generation id; a call of
an older generation, or to a shard that Ray restarted (max_restarts) and that no group has
reset, fails, which fails the worker group, which Ray Train restarts from the last
checkpoint. Checkpoints are the ordinary DCP checkpoints (raypar/train/checkpoint.py, its
manifests and hashes): at a save every worker pulls its stage's parameters and AdamW state
(and, with staleness, the last s versions, saved as `ps_history.<lag>.<name>`), so a ps
checkpoint also loads under ddp or fsdp, and `raypar generate` / `export` read it.
"""
from __future__ import annotations

import asyncio
import math
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

Key = tuple[str, int, int]  # (parameter name, first row, end row)
# Which part of a piece a rank holds, in the piece's coordinates: () the whole piece, else
# one slice per dim up to the one tensor parallelism shards (see PSClient).
Block = tuple[slice, ...]


# -- the plan: which shard owns which rows ------------------------------------------------

@dataclass(frozen=True)
class Piece:
    name: str
    r0: int
    r1: int
    decay: bool  # in AdamW's weight-decay group
    numel: int
    shape: tuple[int, ...] = ()  # the piece's own: (r1 - r0, *the tensor's other dims)

    @property
    def key(self) -> Key:
        return (self.name, self.r0, self.r1)


def plan_pieces(params: list[tuple[str, tuple[int, ...], bool]], n: int) -> list[list[Piece]]:
    """Deal the parameters [(name, shape, decay)] to n shards, balanced by size: a tensor
    larger than a shard's fair share (total / n) is cut into row slices of about that
    size, then the pieces go largest first to the least loaded shard (ties: the lower
    shard; pieces of equal size in model order). Each shard's pieces are in model order."""
    if n < 1:
        raise ValueError(f"parameter server shards: need at least 1, got {n}")
    total = sum(math.prod(shape) for _, shape, _ in params)
    fair = max(1, -(-total // n))
    pieces: list[Piece] = []
    for name, shape, decay in params:
        rows = shape[0] if shape else 1
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        cuts = min(rows, max(1, -(-rows * per_row // fair)))
        step = -(-rows // cuts)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            pieces.append(Piece(name, r0, r1, decay, (r1 - r0) * per_row,
                                (r1 - r0, *shape[1:]) if shape else ()))
    if len(pieces) < n:
        raise ValueError(f"parameter server: {n} shards for {len(pieces)} pieces")
    order = {p.key: i for i, p in enumerate(pieces)}
    loads = [0] * n
    owned: list[list[Piece]] = [[] for _ in range(n)]
    for piece in sorted(pieces, key=lambda p: (-p.numel, order[p.key])):
        k = min(range(n), key=lambda i: (loads[i], i))
        loads[k] += piece.numel
        owned[k].append(piece)
    return [sorted(o, key=lambda p: order[p.key]) for o in owned]


def model_params(model: nn.Module, weight_decay: float) -> list[tuple[str, tuple[int, ...], bool]]:
    """[(name, shape, decay)] of a whole GPT (on the meta device is enough), each tensor
    once, in model order, decay as raypar/model.py's param_groups decides it."""
    from raypar.model import param_groups
    decayed = {id(p) for p in param_groups(model, weight_decay)[0]["params"]}
    return [(name, tuple(p.shape), id(p) in decayed) for name, p in model.named_parameters()]


def plan_shards(spec: Any, vocab_size: int) -> list[list[Piece]]:
    """The plan of a run (RunSpec, padded vocabulary size): parallel.ps.shards lists."""
    from raypar.config import model_config
    from raypar.model import GPT
    with torch.device("meta"):
        whole = GPT(model_config(spec, vocab_size))
    return plan_pieces(model_params(whole, spec.train.weight_decay), spec.parallel.ps.shards)


def staleness_of(step: int, staleness: int) -> int:
    """How many updates behind the newest possible parameters step `step`'s gradient is
    computed: step - v(step), v(step) = max(0, step - staleness)."""
    return step - max(0, step - staleness)


# -- what travels: compression of the pushes ------------------------------------------------

# torch's PowerSGDState default: a matrix is compressed only where its two factors take
# less than half its bytes (its private _should_compress applies the same rule).
MIN_COMPRESSION_RATE = 2


def powersgd_rank_of(shape: tuple[int, ...], rank: int) -> int:
    """The rank r of the factors a piece of `shape` travels as under powersgd, or 0 when
    it travels whole (a vector, or a matrix its factors would not shrink enough)."""
    if len(shape) < 2:
        return 0
    n, m = shape[0], math.prod(shape[1:])
    r = min(n, m, rank)
    return r if (n + m) * r * MIN_COMPRESSION_RATE < n * m else 0


class PushCodec:
    """One rank's encoding of its gradient pieces (parallel.grad_compression: 'none',
    'bf16' or 'powersgd' of rank `rank`), and the PowerSGD state it keeps per piece:
    the error feedback and the warm-start Q (see the module's docstring)."""

    def __init__(self, mode: str = "none", rank: int = 4, seed: int = 0):
        self.mode, self.rank, self.seed = mode, rank, seed
        self.error: dict[str, torch.Tensor] = {}  # by block_id
        self.q: dict[str, torch.Tensor] = {}

    def _initial_q(self, key: str, m: int, r: int) -> torch.Tensor:
        # Keyed by the seed and the piece (a stable hash, not Python's salted one), so a
        # run and its resume draw the same Q whatever the process.
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{key}".encode()))
        return torch.randn(m, r, generator=gen, dtype=torch.float32)

    def encode(self, key: str, g: torch.Tensor) -> tuple[Any, int]:
        """(what is pushed for the fp32 gradient g of the block `key` (block_id), its
        bytes)."""
        if self.mode == "bf16":
            out = g.to(torch.bfloat16)
            return out, out.nbytes
        r = powersgd_rank_of(tuple(g.shape), self.rank) if self.mode == "powersgd" else 0
        if not r:
            return g, g.nbytes
        mat = g.reshape(g.shape[0], -1)
        if key in self.error:
            mat = mat + self.error[key]
        q = self.q.get(key)
        if q is None:
            q = self._initial_q(key, mat.shape[1], r)
        # torch.linalg.qr for the orthonormal basis: torch's own helper (the hook's
        # _orthogonalize, Gram-Schmidt for r <= 2) is private; a reduced QR gives the same
        # span, and P Q^T does not depend on the basis chosen for it.
        p = torch.linalg.qr(mat @ q).Q
        q = mat.T @ p
        self.error[key] = mat - p @ q.T
        self.q[key] = q
        return (p, q.clone()), p.nbytes + q.nbytes

    def state(self) -> dict[str, torch.Tensor]:
        """The PowerSGD state as plain tensors ('error/<block_id>', 'q/<block_id>'), for a
        checkpoint (torch.load with weights_only reads it)."""
        return {f"{kind}/{k}": v.clone()
                for kind, d in (("error", self.error), ("q", self.q)) for k, v in d.items()}

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        self.error, self.q = {}, {}
        for name, v in saved.items():
            kind, key = name.split("/", 1)
            (self.error if kind == "error" else self.q)[key] = v.clone()


def block_id(key: Key, block: Block) -> str:
    """A rank's block of a piece as a string: 'name/r0/r1' (and '/a:b,...' for a block)."""
    text = f"{key[0]}/{key[1]}/{key[2]}"
    if block:
        text += "/" + ",".join(f"{s.start or 0}:{'' if s.stop is None else s.stop}"
                               for s in block)
    return text


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's own tensor of a DTensor (its tp shard, or its replica), the tensor
    itself otherwise; writable in place (DTensor.to_local aliases it without autograd)."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _assemble_state(out: dict[str, torch.Tensor], name: str, block: Block, v: torch.Tensor,
                    shape: tuple[int, ...]) -> None:
    """_assemble for one piece's AdamW state entry `name` (its step count: a scalar)."""
    if not block or not v.dim():
        out.setdefault(name, v)
    else:
        out.setdefault(name, torch.empty(shape, dtype=v.dtype))[block] = v


def _assemble(out: dict[Key, torch.Tensor], key: Key, block: Block, v: torch.Tensor,
              shape: tuple[int, ...]) -> None:
    """Put one rank's block v of piece `key` into out[key] (a whole piece: replicated on
    every tp rank, so equal copies; the first one stays)."""
    if not block or not v.dim():
        out.setdefault(key, v)
    else:
        out.setdefault(key, torch.empty(shape, dtype=v.dtype))[block] = v


def decode(payload: Any, like: torch.Tensor) -> torch.Tensor:
    """A pushed piece back as an fp32 gradient shaped like its parameter `like`: PowerSGD's
    factors multiplied out, bf16 upcast, fp32 as is."""
    if isinstance(payload, tuple):
        p, q = payload
        return (p @ q.T).view_as(like)
    return payload.float()


# -- the server ------------------------------------------------------------------------------

class StaleGeneration(RuntimeError):
    """A call from a worker group the shard was not reset by (or to a restarted shard)."""


class ParamShard:
    """One parameter-server shard (a Ray async actor: calls wait on asyncio conditions,
    so pushes, pulls and the norm exchange interleave without threads).

    pieces: its plan entries; spec: RunSpec.to_dict() (the optimizer's settings; each
    step's learning rate comes with the pushes); senders: ranks that push every step
    (every worker, dp * pp * tp)."""

    def __init__(self, index: int, n_shards: int, pieces: list[Piece], spec: dict[str, Any],
                 senders: int):
        from raypar.config import from_dict
        from raypar.train.memory import return_large_frees
        torch.set_num_threads(1)
        # Every step's sums, clones and versions are freed again: back to the system, as
        # on the training ranks (raypar/train/memory.py).
        return_large_frees()
        self.index, self.n_shards = index, n_shards
        self.pieces = pieces
        self.shapes = {p.key: p.shape for p in pieces}
        self.spec = from_dict(spec)
        self.senders = senders
        self.staleness = self.spec.parallel.ps.staleness
        self.generation: Optional[str] = None
        self.ready = asyncio.Event()
        self.changed = asyncio.Condition()
        self.apply_lock = asyncio.Lock()
        self._reset_parts: dict[int, tuple] = {}
        self._clear()

    def _clear(self) -> None:
        self.params: dict[Key, nn.Parameter] = {}
        self.optimizer: Optional[torch.optim.AdamW] = None
        self.version = 0
        self.history: dict[int, dict[Key, torch.Tensor]] = {}  # older versions, s > 0
        self.pending: dict[int, dict[int, dict[Key, torch.Tensor]]] = {}  # step: rank: grads
        self.norms: dict[int, float] = {}  # update: its global gradient norm
        self.lrs: dict[int, float] = {}  # step: its learning rate
        self.partials: dict[int, dict[int, float]] = {}  # shard 0: step: shard: squared norm
        self.partial_events: dict[int, asyncio.Event] = {}
        self.partial_done: dict[int, int] = {}
        self.peers: list[Any] = []

    def _check(self, generation: str) -> None:
        if generation != self.generation:
            raise StaleGeneration(
                f"parameter-server shard {self.index}: called by worker group {generation}, "
                f"but reset by {self.generation or 'none (the actor was restarted)'}; the "
                f"workers restart from the last checkpoint")

    async def reset(self, generation: str, peers: list[Any], rank: int, n_sources: int,
                    version: int, params: list[tuple[Key, Block, torch.Tensor]],
                    optim: list[tuple[Key, Block, dict[str, torch.Tensor]]],
                    history: dict[int, list[tuple[Key, Block, torch.Tensor]]],
                    norms: dict[int, float]) -> None:
        """One of the n_sources ranks (replica 0's) hands its blocks of this shard's
        pieces (whole pieces, or with tp its shard of them): the parameters at `version`,
        their AdamW state (empty before the first update) and, with staleness, older
        versions {lag: blocks} and the norms of the last updates (the next pulls report
        them). The first call of a new generation drops everything the shard held; the
        last one makes it ready."""
        if generation != self.generation:
            self.generation = generation
            # Every waiter of the old generation wakes and fails its check: an update that
            # waited for a norm (holding the old lock), a push that waited to be ready.
            self.ready.set()
            for event in self.partial_events.values():
                event.set()
            self.ready = asyncio.Event()
            self.apply_lock = asyncio.Lock()
            self._reset_parts = {}
            self._clear()
            async with self.changed:
                self.changed.notify_all()  # waiters of the old generation give up
        self.peers = peers
        self.norms.update(norms)
        self._reset_parts[rank] = (version, params, optim, history)
        if len(self._reset_parts) < n_sources:
            return
        parts = [self._reset_parts[r] for r in sorted(self._reset_parts)]
        self._reset_parts = {}
        versions = {v for v, _, _, _ in parts}
        if len(versions) != 1:
            raise RuntimeError(f"parameter-server shard {self.index}: reset at versions "
                               f"{sorted(versions)}")
        self.version = versions.pop()
        values: dict[Key, torch.Tensor] = {}
        states: dict[Key, dict[str, torch.Tensor]] = {}
        # A tied embedding comes from two stages, a replicated parameter from every tp
        # rank: equal copies, one is taken.
        for _, p, o, h in parts:
            for k, block, v in p:
                _assemble(values, k, block, v, self.shapes[k])
            for k, block, state in o:
                for name, v in state.items():  # (states: {piece: {name: tensor}})
                    _assemble_state(states.setdefault(k, {}), name, block, v,
                                    self.shapes[k])
            for lag, blocks in h.items():
                older = self.history.setdefault(self.version - lag, {})
                for k, block, v in blocks:
                    _assemble(older, k, block, v, self.shapes[k])
        missing = [p.key for p in self.pieces if p.key not in values]
        if missing:
            raise RuntimeError(f"parameter-server shard {self.index}: no values for {missing}")
        self.params = {p.key: nn.Parameter(values[p.key].detach().clone().float(),
                                           requires_grad=False) for p in self.pieces}
        t = self.spec.train
        groups = [{"params": [self.params[p.key] for p in self.pieces if p.decay],
                   "weight_decay": t.weight_decay},
                  {"params": [self.params[p.key] for p in self.pieces if not p.decay],
                   "weight_decay": 0.0}]
        # The trainer's optimizer, settings and all (foreach=False: the same per-tensor
        # arithmetic, which AdamW does elementwise, so a row slice updates as its tensor).
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr,
                                           betas=(t.beta1, t.beta2), foreach=False)
        for key, state in states.items():
            self.optimizer.state[self.params[key]] = {
                name: v.detach().clone() for name, v in state.items()}
        self.ready.set()

    async def _wait_ready(self, generation: str) -> None:
        self._check(generation)
        await self.ready.wait()
        self._check(generation)

    async def push(self, generation: str, step: int, rank: int, lr: float,
                   grads: list[tuple[Key, Block, Any]]) -> None:
        """Rank `rank`'s gradients of step `step` for this shard's pieces, (piece, block,
        encoded gradient) (it may own none of them: every rank pushes every step, so a
        shard knows when a step is complete), and the step's learning rate (the trainer's
        schedule, the same from every rank)."""
        await self._wait_ready(generation)
        if step < self.version:
            raise RuntimeError(f"parameter-server shard {self.index}: a push of step {step} "
                               f"after update {self.version - 1}")
        self.pending.setdefault(step, {})[rank] = grads
        self.lrs[step] = lr
        async with self.apply_lock:  # updates in step order, one at a time
            while len(self.pending.get(self.version, {})) == self.senders:
                await self._apply(generation, self.version)

    async def _apply(self, generation: str, step: int) -> None:
        pushes = self.pending.pop(step)
        summed: dict[Key, torch.Tensor] = {}
        for rank in sorted(pushes):  # a fixed order, whatever order they arrived in
            for key, block, payload in pushes[rank]:
                if not block:
                    g = decode(payload, self.params[key])
                    summed[key] = summed[key] + g if key in summed else g.clone()
                else:  # a tp rank's shard of the piece, added where it lies
                    part = summed.setdefault(key, torch.zeros(self.shapes[key]))[block]
                    part += decode(payload, part)
        sq = sum((float(g.double().square().sum()) for g in summed.values()), 0.0)
        if self.index == 0:
            norm = await self.norm(generation, step, 0, sq)
        else:
            norm = await self.peers[0].norm.remote(generation, step, self.index, sq)
        self._check(generation)  # a reset came while we waited: this update is void
        clip = self.spec.train.grad_clip
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        lr = self.lrs.pop(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.staleness:
            self.history[self.version] = {k: p.detach().clone() for k, p in self.params.items()}
        for key, p in self.params.items():
            g = summed.get(key)
            p.grad = None if g is None else g.mul_(coef) if coef != 1.0 else g
        self.optimizer.step()
        for p in self.params.values():
            p.grad = None
        self.norms[step] = norm
        self.version = step + 1
        for v in [v for v in self.history if v < self.version - self.staleness]:
            del self.history[v]
        for u in [u for u in self.norms if u < self.version - self.staleness - 2]:
            del self.norms[u]
        async with self.changed:
            self.changed.notify_all()

    async def norm(self, generation: str, step: int, shard: int, sq: float) -> float:
        """On shard 0: shard `shard`'s squared gradient norm of update `step`; returns the
        global norm once every shard has sent its part (added in shard order, so every
        shard gets the same float)."""
        self._check(generation)
        parts = self.partials.setdefault(step, {})
        event = self.partial_events.setdefault(step, asyncio.Event())
        parts[shard] = sq
        if len(parts) == self.n_shards:
            event.set()
        await event.wait()
        self._check(generation)
        total = math.sqrt(sum(parts[k] for k in range(self.n_shards)))
        self.partial_done[step] = self.partial_done.get(step, 0) + 1
        if self.partial_done[step] == self.n_shards:
            for d in (self.partials, self.partial_events, self.partial_done):
                d.pop(step, None)
        return total

    async def _wait_version(self, generation: str, version: int) -> None:
        await self._wait_ready(generation)
        async with self.changed:
            await self.changed.wait_for(
                lambda: self.version >= version or generation != self.generation)
        self._check(generation)

    def _at(self, version: int) -> dict[Key, torch.Tensor]:
        if version == self.version:  # (the callers copy what they send: _cut)
            return {k: p.detach() for k, p in self.params.items()}
        if version in self.history:
            return self.history[version]
        raise RuntimeError(f"parameter-server shard {self.index}: version {version} is gone "
                           f"(now {self.version}, keeping {self.staleness} older)")

    async def pull(self, generation: str, version: int, wanted: list[tuple[Key, Block]]
                   ) -> tuple[Optional[float], list[torch.Tensor]]:
        """The parameters' blocks `wanted` at `version`, once applied, and the gradient
        norm of the update that made that version (None for version 0)."""
        await self._wait_version(generation, version)
        values = self._at(version)
        return self.norms.get(version - 1), [_cut(values[k], b) for k, b in wanted]

    async def recent_norms(self, generation: str, version: int) -> dict[int, float]:
        """The gradient norms of the updates the pulls after `version` still report (the
        last `staleness` ones), once `version` is applied: a checkpoint keeps them."""
        await self._wait_version(generation, version)
        return {u: n for u, n in self.norms.items()
                if version - self.staleness <= u < version}

    async def state(self, generation: str, version: int, wanted: list[tuple[Key, Block]],
                    lags: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]],
                                        dict[int, list[torch.Tensor]]]:
        """For a checkpoint at `version` (every update before it applied), per block of
        `wanted`: the values, the AdamW state ({} before the first update), and the older
        versions {lag: blocks} for lags 1..lags."""
        await self._wait_version(generation, version)
        if self.version != version:
            raise RuntimeError(f"parameter-server shard {self.index}: checkpoint of version "
                               f"{version}, but update {self.version - 1} is applied")
        values = self._at(version)
        optim = [{name: _cut(v, b) if v.dim() else v.detach().clone() for name, v in
                  self.optimizer.state.get(self.params[k], {}).items()} for k, b in wanted]
        history = {lag: [_cut(self._at(version - lag)[k], b) for k, b in wanted]
                   for lag in range(1, lags + 1)}
        return [_cut(values[k], b) for k, b in wanted], optim, history


def _cut(v: torch.Tensor, block: Block) -> torch.Tensor:
    """A block of a piece, as its own tensor (a view would travel with all its storage)."""
    return v.detach()[block].clone() if block else v.detach().clone()


def start_shards(spec: Any, plan: list[list[Piece]]) -> list[Any]:
    """The run's shard actors (owned by the caller, the driver: they end with it). Ray
    restarts a shard that dies (max_restarts); the workers then fail on it, and their
    restart from the last checkpoint resets it (see ParamShard.reset)."""
    import ray
    # num_cpus=0: a shard's work per step (a sum and an AdamW step over its share) is small
    # next to a worker's, and the workers' reservation is what the cluster is sized by.
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)(ParamShard)
    senders = spec.parallel.dp * spec.parallel.pp * spec.parallel.tp
    return [actor.options(name=f"raypar-ps-{uuid.uuid4().hex[:12]}-{k}").remote(
        k, len(plan), pieces, spec.to_dict(), senders) for k, pieces in enumerate(plan)]


def stop_shards(shards: list[Any]) -> None:
    import ray
    for shard in shards:
        try:
            ray.kill(shard, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or Ray shut down: nothing to stop
            pass


# -- the worker's side -----------------------------------------------------------------------

class PSClient:
    """One worker's link to the shards: its stage modules' parameters, under their
    checkpoint names (a last stage's copy of the tied embedding is `tok_emb.weight`), split
    into the plan's pieces.

    With tensor parallelism a parameter is a DTensor and the rank holds one shard of it
    (raypar/parallel/tensor.py): a slice of dim 0 (rows: column-parallel weights, the
    vocabulary-parallel table) or of dim 1 (row-parallel weights), or the whole of it
    (replicated: norms, biases of row-parallel layers, pos_emb). The plan's pieces are row
    slices of the full tensor, so the rank holds a block of each piece it meets: the rows
    its shard and the piece share, or the piece's rows x its own columns. It pushes the
    gradient of exactly that block, pulls exactly that block back, and the shard adds the
    blocks where they lie. A replicated parameter's gradient is the same on every tp rank
    (torch's tp plan reduces it, tensor.py's _grad_like_param), so tp rank 0 pushes it,
    as ddp's clipping counts it once, and every tp rank pulls it."""

    def __init__(self, shards: list[Any], plan: list[list[Piece]], staleness: int,
                 named: list[tuple[str, nn.Parameter]], codec: Optional[PushCodec] = None,
                 tp_rank: int = 0):
        self.shards, self.plan, self.staleness = shards, plan, staleness
        self.codec = codec or PushCodec()  # parallel.grad_compression of the pushes
        self.tp_rank = tp_rank
        self.local: dict[str, list[nn.Parameter]] = {}
        for name, p in named:
            self.local.setdefault(name, []).append(p)
        # Per shard: (piece, block of it, where the block lies in this rank's own tensor,
        # whether this rank pushes it) of the pieces of this rank's parameters it owns.
        self.mine: list[list[tuple[Piece, Block, tuple[slice, ...], bool]]] = [
            [entry for entry in (self._entry(p) for p in pieces if p.name in self.local)
             if entry is not None] for pieces in plan]
        self.generation: Optional[str] = None
        self.rank = -1
        self.version = 0  # the version of the parameters in the local modules
        self.acks: list[Any] = []
        self.bytes = 0  # pushed and pulled by this rank in the current step

    def _entry(self, piece: Piece) -> Optional[tuple[Piece, Block, tuple[slice, ...], bool]]:
        """This rank's block of `piece` (None: its tp shard holds none of it)."""
        from torch.distributed.tensor import DTensor
        p = self.local[piece.name][0]
        rows = (slice(piece.r0, piece.r1),)
        shard = [pl for pl in p.placements if pl.is_shard()] if isinstance(p, DTensor) else []
        if not shard:  # whole on every tp rank
            return piece, (), rows, self.tp_rank == 0
        # ps runs no FSDP: a DTensor parameter lives on the 1-D tp mesh alone. Its shard's
        # offset as torch.chunk places it (torch's own helper for it is private).
        [placement] = shard
        dim = placement.dim % p.dim()
        chunk = -(-p.shape[dim] // p.device_mesh.size())
        lo = min(p.shape[dim], p.device_mesh.get_local_rank() * chunk)
        hi = lo + local_tensor(p).shape[dim]
        if dim == 0:
            a, b = max(lo, piece.r0), min(hi, piece.r1)
            if a >= b:
                return None
            return piece, (slice(a - piece.r0, b - piece.r0),), (slice(a - lo, b - lo),), True
        return piece, (slice(None),) * dim + (slice(lo, hi),), rows, True

    def _grad(self, name: str, where: tuple[slice, ...]) -> Optional[torch.Tensor]:
        grads = [local_tensor(p.grad) for p in self.local[name] if p.grad is not None]
        if not grads:
            return None
        g = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)  # tied copies: a + b
        return g[where].detach().to("cpu", torch.float32).clone()

    def _set(self, entries: list[tuple[Piece, Block, tuple[slice, ...], bool]],
             values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for (piece, _, where, _), v in zip(entries, values):
                for p in self.local[piece.name]:
                    mine = local_tensor(p)
                    mine[where].copy_(v.to(mine.device, mine.dtype))

    def start(self, generation: str, step: int, rank: int, n_sources: Optional[int],
              optimizers: list[torch.optim.Optimizer],
              history: dict[int, dict[str, torch.Tensor]], norms: dict[int, float]) -> None:
        """Reset the shards from this rank's state at `step`: its parameters, AdamW state,
        older versions {lag: {name: tensor}} and the last updates' norms (`recent_norms`),
        when n_sources is not None (it is a rank of replica 0, one of n_sources whose pieces
        seed the shards). Every rank of the group calls it, then a barrier, then `sync`."""
        import ray
        self.generation, self.rank = generation, rank
        if n_sources is None:
            return
        states = {id(p): s for opt in optimizers for p, s in opt.state.items()}

        def block(v: torch.Tensor, where: tuple[slice, ...]) -> torch.Tensor:
            return local_tensor(v).detach()[where].to("cpu").clone()

        refs = []
        for k, shard in enumerate(self.shards):
            params, optim, hist = [], [], {}
            for piece, part, where, sends in self.mine[k]:
                if not sends:  # a replicated parameter: tp rank 0's copy
                    continue
                p = self.local[piece.name][0]
                params.append((piece.key, part, block(p, where)))
                state = states.get(id(p))
                if state:
                    optim.append((piece.key, part, {
                        n: block(v, where) if v.dim() else v.detach().to("cpu").clone()
                        for n, v in state.items()}))
                for lag, values in history.items():
                    hist.setdefault(lag, []).append(
                        (piece.key, part, block(values[piece.name], where)))
            refs.append(shard.reset.remote(generation, self.shards, rank, n_sources, step,
                                           ray.put(params), ray.put(optim), ray.put(hist),
                                           norms))
        ray.get(refs)

    def sync(self, step: int) -> None:
        """Set the local parameters to the version step `step` computes on."""
        self.version = -1
        self.pull(max(0, step - self.staleness))

    def push(self, step: int, lr: float) -> None:
        """Step `step`'s gradients to their shards (by reference, through the object store),
        with the step's learning rate."""
        import ray
        for k, shard in enumerate(self.shards):
            grads = []
            for piece, part, where, sends in self.mine[k]:
                g = self._grad(piece.name, where) if sends else None
                if g is not None:
                    payload, sent = self.codec.encode(block_id(piece.key, part), g)
                    grads.append((piece.key, part, payload))
                    self.bytes += sent
            self.acks.append(shard.push.remote(self.generation, step, self.rank, lr,
                                               ray.put(grads)))

    def pull(self, version: int) -> Optional[float]:
        """The parameters at `version` into the local modules (no call when they are that
        version already); the gradient norm of the update that made it, when pulled."""
        import ray
        pending, self.acks = self.acks, []
        # A failed push (a shard that died, or was restarted and not reset) fails the step
        # here; the others' pushes may wait on it for ever (shard 0 waits for every shard's
        # part of the norm), so each ack is taken as it comes, not in a fixed order.
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        if version == self.version:
            return None
        calls = [(k, shard.pull.remote(self.generation, version,
                                       [(e[0].key, e[1]) for e in self.mine[k]]))
                 for k, shard in enumerate(self.shards) if self.mine[k]]
        norm = None
        for k, ref in calls:
            n, values = ray.get(ref)
            norm = n if norm is None else norm
            self.bytes += sum(v.nbytes for v in values)
            self._set(self.mine[k], values)
        self.version = version
        return norm

    def step(self, step: int, lr: float) -> Optional[float]:
        """Push step `step`'s gradients, pull the parameters step + 1 computes on; returns
        the gradient norm of the update that made them (None: no update pulled)."""
        self.push(step, lr)
        return self.pull(max(0, step + 1 - self.staleness))

    def recent_norms(self, step: int) -> dict[int, float]:
        """The norms of the updates before `step` that the next steps' rows report."""
        import ray
        return ray.get(self.shards[0].recent_norms.remote(self.generation, step))

    def state(self, step: int) -> tuple[dict[str, torch.Tensor],
                                        dict[str, dict[str, torch.Tensor]],
                                        dict[int, dict[str, torch.Tensor]]]:
        """This rank's parameters at version `step` as its own tensors by name (its tp
        shards, or whole tensors), their AdamW state, and the older versions {lag: {name:
        tensor}} the next steps compute on."""
        import ray
        lags = min(self.staleness, step)
        values: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        history: dict[int, dict[str, torch.Tensor]] = {lag: {} for lag in range(1, lags + 1)}
        shapes = {name: local_tensor(ps[0]).shape for name, ps in self.local.items()}

        def put(out: dict[str, torch.Tensor], key: str, name: str, where: tuple[slice, ...],
                v: torch.Tensor) -> None:
            if key not in out:
                out[key] = torch.empty(shapes[name], dtype=v.dtype)
            out[key][where] = v

        calls = [(k, shard.state.remote(self.generation, step,
                                        [(e[0].key, e[1]) for e in self.mine[k]], lags))
                 for k, shard in enumerate(self.shards) if self.mine[k]]
        for k, ref in calls:
            vals, opts, hist = ray.get(ref)
            for i, (piece, _, where, _) in enumerate(self.mine[k]):
                put(values, piece.name, piece.name, where, vals[i])
                entry = optim.setdefault(piece.name, {}) if opts[i] else {}
                for n, v in opts[i].items():
                    if v.dim():
                        put(entry, n, piece.name, where, v)
                    else:  # AdamW's step count: one scalar, the same for every piece
                        entry[n] = v
                for lag, blocks in hist.items():
                    put(history[lag], piece.name, piece.name, where, blocks[i])
        return values, optim, history


def new_generation() -> str:
    return uuid.uuid4().hex
