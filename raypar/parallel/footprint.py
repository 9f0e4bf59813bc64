"""Each rank's footprint: which pipeline stages and layers it holds, and how much memory
its parameters, gradients, optimizer state and activations need, computed before any
worker starts (`raypar plan` shows it; the driver refuses a layout that cannot fit).

Everything is arithmetic on the config, so any size is answered at once: the parameter
shapes are those raypar/model.py builds (listed by name in `_shapes`), the blocks are
cut into stages by the same `stage_sizes` the workers use, a tensor-parallel shard
divides the parameters `tp_shard_dim` names, and FSDP divides by dp. Every rank of a
pipeline coordinate holds the same, so a layout of any world size is computed once per
pp rank (`LayoutPlan`), never once per rank.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from raypar.config import RunSpec, model_config
from raypar.parallel import schedules
from raypar.parallel.mesh import coords_of
from raypar.parallel.stages import stage_costs, stage_sizes
from raypar.parallel.tensor import tp_shard_dim

FP32 = 4  # bytes per parameter, gradient and Adam moment: training state stays fp32


@dataclass
class RankPlan:
    rank: int
    dp: int
    pp: int
    tp: int
    stages: list[int]
    layers: list[list[int]]
    param_bytes: int = 0
    block_param_bytes: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    activation_bytes: int = 0
    node: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.activation_bytes


def _linear(name: str, n_in: int, n_out: int, bias: bool) -> list[tuple[str, int]]:
    return [(f"{name}.weight", n_out * n_in)] + ([(f"{name}.bias", n_out)] if bias else [])


def _norm(name: str, d: int, bias: bool) -> list[tuple[str, int]]:
    return [(f"{name}.weight", d)] + ([(f"{name}.bias", d)] if bias else [])


def _shapes(cfg) -> dict[str, list[tuple[str, int]]]:
    """(parameter name, element count) of the first stage's extras, of one block (named
    as block 0: the tensor plan treats every block alike) and of the last stage's, as
    raypar/model.py's GPT registers them (LayerNorm and Linear carry a bias with
    cfg.bias; the LM head never does)."""
    d, f, V, b = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.bias
    first = [("tok_emb.weight", V * d)]
    if cfg.pos_encoding == "learned":
        first.append(("pos_emb.weight", cfg.seq_len * d))
    block = [*_norm("layers.0.attn_norm", d, b),
             *(p for w in ("wq", "wk", "wv", "wo") for p in _linear(f"layers.0.attn.{w}", d, d, b)),
             *_norm("layers.0.mlp_norm", d, b),
             *_linear("layers.0.mlp.fc", d, f, b), *_linear("layers.0.mlp.proj", f, d, b)]
    last = [*_norm("norm", d, b), ("lm_head.weight", V * d)]
    return {"first": first, "block": block, "last": last}


def _bytes(params: list[tuple[str, int]], spec: RunSpec) -> int:
    """fp32 bytes of one rank's share: a tp shard floors the sharded dim's 1/tp (the
    sizes divide), FSDP gives each rank of a shard group (every replica with fsdp,
    dp_shard of them with hsdp) at most ceil(n / group) of every parameter."""
    p, total = spec.parallel, 0
    for name, n in params:
        if p.tp > 1 and tp_shard_dim(name) is not None:
            n //= p.tp
        if p.shard_size > 1:
            n = -(-n // p.shard_size)
        total += FP32 * n
    return total


def activation_bytes(spec: RunSpec, n_layers: int, vocab_size: int, last: bool,
                     in_flight: int) -> int:
    """Rough bytes autograd keeps for one rank: per micro-batch in flight, each layer
    saves ~16 d_model-wide fp32 activations per token plus the attention probabilities
    (none with a fused attention kernel; counted anyway as an upper bound)."""
    m, p = spec.model, spec.parallel
    tokens = spec.train.micro_batch * spec.data.seq_len
    per_layer = 4 * tokens * (16 * m.d_model // p.tp + 2 * m.d_model)
    logits = 4 * 3 * tokens * vocab_size // p.tp if last else 0
    return in_flight * (n_layers * per_layer + logits)


def _in_flight(spec: RunSpec) -> int:
    """Micro-batches whose activations a rank holds at once: one without a pipeline, all
    of them when the schedule runs every forward first (gpipe), else up to one per stage
    in flight (the 1F1B family)."""
    p = spec.parallel
    if p.pp == 1:
        return 1
    if schedules.get(p.schedule).all_forwards_first:
        return spec.grad_accum
    return min(spec.grad_accum, schedules.n_stages(p.pp, p.virtual_stages))


def _stage_sizes(spec: RunSpec, cfg) -> list[int]:
    """Blocks of every global stage: the workers' split (raypar/parallel/stages.py
    build_stage_modules), one stage holding all without a pipeline."""
    p = spec.parallel
    if p.pp == 1:
        return [cfg.n_layer]
    embed_cost, head_cost = stage_costs(cfg)
    return stage_sizes(cfg.n_layer, schedules.n_stages(p.pp, p.virtual_stages),
                       head_cost=head_cost, embed_cost=embed_cost)


class LayoutPlan(Sequence):
    """Every rank's RankPlan in rank order, each made on first access.

    `len()` is the world size and `plans[rank]` one rank's plan (the same object on every
    access, so a node set on it stays); `total_bytes()` answers for the whole world with
    work per pipeline rank, never per rank. Iterating makes every rank's plan: fine for
    a layout that fits a table, not for a million workers.
    """

    def __init__(self, spec: RunSpec, vocab_size: int):
        spec = spec.with_dp(spec.max_dp)  # an elastic run at its largest layout
        p = spec.parallel
        self.spec, self.vocab_size = spec, vocab_size
        self.dp, self.pp, self.tp = p.dp, p.pp, p.tp
        cfg = model_config(spec, vocab_size)
        self._parts = {part: _bytes(params, spec) for part, params in _shapes(cfg).items()}
        if cfg.tie_embeddings and p.pp == 1:
            # One module holds the whole model, where a tied LM head is the embedding's
            # own Parameter (counted once); a pipeline's last stage holds a copy of it.
            self._parts["last"] -= _bytes([("lm_head.weight", cfg.vocab_size * cfg.d_model)],
                                          spec)
        self._sizes = _stage_sizes(spec, cfg)
        self._starts = [0]  # first layer of every stage
        for k in self._sizes[:-1]:
            self._starts.append(self._starts[-1] + k)
        self._in_flight = _in_flight(spec)
        self._made: dict[int, RankPlan] = {}

    def __len__(self) -> int:
        return self.dp * self.pp * self.tp

    def __getitem__(self, rank):
        if isinstance(rank, slice):
            return [self[i] for i in range(*rank.indices(len(self)))]
        rank = int(rank) + (len(self) if rank < 0 else 0)
        if not 0 <= rank < len(self):
            raise IndexError(f"rank {rank} outside a world of {len(self)}")
        if rank not in self._made:
            self._made[rank] = self._rank_plan(rank)
        return self._made[rank]

    def _rank_plan(self, rank: int) -> RankPlan:
        p = self.spec.parallel
        c = coords_of(rank, self.dp, self.pp, self.tp)
        ids = schedules.stage_ids(c.pp, p.pp, schedules.stages_per_rank(p.pp, p.virtual_stages),
                                  p.schedule)
        layers = [list(range(self._starts[s], self._starts[s] + self._sizes[s])) for s in ids]
        params, block, activ = self._footprint(sum(len(ls) for ls in layers), 0 in ids,
                                               len(self._sizes) - 1 in ids)
        return RankPlan(rank=rank, dp=c.dp, pp=c.pp, tp=c.tp, stages=ids, layers=layers,
                        param_bytes=params, block_param_bytes=block, grad_bytes=params,
                        optim_bytes=self._optim_copies * params, activation_bytes=activ)

    @property
    def _optim_copies(self) -> int:
        """Optimizer state in copies of the parameters: AdamW's two moments, and with local
        SGD (sync_every > 1) the anchor and the outer momentum too."""
        return 4 if self.spec.parallel.sync_every > 1 else 2

    def _footprint(self, n_layers: int, first: bool, last: bool) -> tuple[int, int, int]:
        """(parameter, block parameter, activation) bytes of a rank holding n_layers
        blocks and the first / last stage's extras."""
        parts = self._parts
        block = n_layers * parts["block"]
        params = block + (parts["first"] if first else 0) + (parts["last"] if last else 0)
        # With activation checkpointing only one block's activations are held at a time.
        saved = 1 if self.spec.train.activation_checkpointing else n_layers
        return params, block, activation_bytes(self.spec, saved, self.vocab_size, last,
                                               self._in_flight)

    def total_bytes(self, per_worker: int = 0) -> int:
        """Bytes of all ranks together, each counted with `per_worker` more. The dp * tp
        ranks of a pipeline rank hold the same, and pipeline ranks with the same blocks
        and edges too, so each distinct rank is computed once."""
        p, n_stages = self.spec.parallel, len(self._sizes)
        blocks = [0] * self.pp
        for s, k in enumerate(self._sizes):
            blocks[schedules.stage_rank(s, self.pp, n_stages, p.schedule)] += k
        first, last = (schedules.stage_rank(s, self.pp, n_stages, p.schedule)
                       for s in (0, n_stages - 1))
        kinds = Counter((n, r == first, r == last) for r, n in enumerate(blocks))
        total = 0
        for (n, has_first, has_last), count in kinds.items():
            params, _, activ = self._footprint(n, has_first, has_last)
            # params, grads, optimizer state
            total += count * (per_worker + (2 + self._optim_copies) * params + activ)
        return self.dp * self.tp * total


def plan(spec: RunSpec, vocab_size: int) -> LayoutPlan:
    """Every rank's stages, layers and memory; an elastic run's at its largest layout."""
    return LayoutPlan(spec, vocab_size)
