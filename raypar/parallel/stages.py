"""Pipeline stages: cut the GPT into per-stage modules and keep tied embeddings in step.

    modules = build_stage_modules(model, pp_rank, pp, virtual, schedule)
    ... tensor parallel, then replicate / FSDP2, on each module; run them with Pipeline ...
    sync_tied_grads(modules, pp_group)          # after Pipeline.step, before clipping

A stage is a copy of the whole model with the blocks it does not own deleted from
`layers` (the rest keep their global names, so checkpoints stay keyed by the
single-process FQNs), `tok_emb` / `pos_emb` set to None unless it is global stage 0
and `norm` / `lm_head` None unless it is the last one. `GPT.forward` copes with all
of these, so every stage runs the model file's own code.

This is the model surgery; the schedule runtime (Pipeline) is raypar/parallel/pipeline.py.
The only communication here is sync_tied_grads' point-to-point gradient swap.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from raypar.model import GPT, GPTConfig
from raypar.parallel.schedules import stage_ids, stage_rank

# Attribute stamped on every stage module by build_stage_modules: how the tied
# embedding's two copies are kept in step ('none', 'local' or 'peer'). Every rank
# of the pp group gets the same value, so all of them agree on whether
# sync_tied_grads communicates (a middle rank holds neither copy and cannot tell).
_TIE_ATTR = "_raypar_pp_tie"

# Cost of the embedding lookup (+ learned positions, dropout), in blocks. It does no
# matrix multiply: a gather forward and a scatter-add backward, memory-bound and a
# few percent of a block at any size. It mostly breaks ties, giving the first stage
# one block less when the split is otherwise even.
EMBED_COST = 0.05


# --------------------------------------------------------------------------- layout


def stage_costs(cfg: GPTConfig) -> tuple[float, float]:
    """(embed_cost, head_cost) of the first and last stage's extra work, in blocks.

    A block's forward costs, per token, 2 * (4 d^2 + 2 d f) FLOPs of matrix multiplies
    (q, k, v, o and the two MLP matrices) plus ~2 T d for causal attention scores and
    the weighted sum. The LM head costs 2 V d, and the final LayerNorm plus the fp32
    softmax cross-entropy about 5 V more (memory-bound, so counted generously). Backward
    is ~2x forward for both, so the ratio holds for a whole training step:

        head_cost = (2 V d + 5 V) / (8 d^2 + 4 d f + 2 T d)

    e.g. GPT-2 small (V 50257, d 768, T 1024): ~4.9 blocks; the tests' toy model
    (V 128, d 32, T 16): ~0.35.
    """
    d, f, V, T = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.seq_len
    block = 8 * d * d + 4 * d * f + 2 * T * d
    return EMBED_COST, (2 * V * d + 5 * V) / block


def stage_layout(n_layer: int, n_stages: int, head_cost: float = 0.0,
                 embed_cost: float = 0.0) -> list[list[int]]:
    """Layer ids of each global stage: contiguous, in order, every stage >= 1 layer.

    Cost model (block units): a stage costs its number of blocks, plus `embed_cost`
    on stage 0 and `head_cost` (final norm + LM head + loss, see `stage_costs`) on the
    last stage. The split minimises the most expensive stage (the pipeline's pace);
    among those, the most even one (least sum of squared costs); remaining ties give
    earlier stages more blocks (exactly balanced layers with no extra costs: the
    leftovers go to the first stages). The sizes come from `stage_sizes`.
    """
    layout, start = [], 0
    for k in stage_sizes(n_layer, n_stages, head_cost, embed_cost):
        layout.append(list(range(start, start + k)))
        start += k
    return layout


# The split was once a dynamic program over every split (O(stages * layers^2): minutes
# at 100k layers); these tolerances keep its answers. It admitted stages up to 1e-9
# over the bottleneck, and kept the larger first stage unless another split was better
# by 1e-9 in the sum of squares: moving one block changes that sum by twice the cost
# gap, so two cost levels within 5e-10 are one level here.
_EPS = 1e-9
_TIE = _EPS / 2


def stage_sizes(n_layer: int, n_stages: int, head_cost: float = 0.0,
                embed_cost: float = 0.0) -> list[int]:
    """Blocks per global stage under `stage_layout`'s rule, in O(log n_layer) steps.

    Only three kinds of stage exist: the first (+embed_cost), the middle ones (no
    extra) and the last (+head_cost); within a kind, stages are interchangeable, so
    the bottleneck is the least cost at which the kinds' capacities hold every block
    (a binary search), and the most even split fills the stages up cost level by cost
    level (the sum of squares is convex and separable), the last level's blocks going
    to the earliest stages.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layer < n_stages:
        raise ValueError(f"{n_layer} layers cannot fill {n_stages} pipeline stages "
                         f"(every stage needs at least one block)")
    if not (math.isfinite(head_cost) and math.isfinite(embed_cost)):
        raise ValueError(f"stage costs must be finite, got head {head_cost}, embed {embed_cost}")
    if n_stages == 1:
        return [n_layer]
    # (extra cost, how many stages) of the first, middle and last kinds, in stage order.
    kinds = [(embed_cost, 1), (0.0, n_stages - 2), (head_cost, 1)]
    bound = _least_bottleneck(n_layer, n_stages, kinds) + _EPS
    caps = [_count_upto(a, n_layer - n_stages + 1, bound, strict=False) for a, _ in kinds]
    return _even_fill(n_layer - n_stages, kinds, caps)


def _count_upto(extra: float, limit: int, level: float, strict: bool) -> int:
    """How many of k = 1..limit have cost k + extra <= level (< level when strict),
    compared in floating point exactly as the costs are added."""
    def ok(k: int) -> bool:
        return k + extra < level if strict else k + extra <= level
    k = min(max(math.floor(level - extra), 0), limit)  # an estimate, off by one at most
    while k < limit and ok(k + 1):
        k += 1
    while k > 0 and not ok(k):
        k -= 1
    return k


def _least_bottleneck(n_layer: int, n_stages: int, kinds: list[tuple[float, int]]) -> float:
    """The least cost B such that every stage can hold >= 1 block at cost <= B and all
    the stages together hold n_layer blocks; B is the cost of some kind's k blocks."""
    limit = n_layer - n_stages + 1

    def fits(level: float) -> bool:
        caps = [(_count_upto(a, limit, level, strict=False), n) for a, n in kinds if n]
        return all(c >= 1 for c, _ in caps) and sum(c * n for c, n in caps) >= n_layer

    best = math.inf
    for a, n in kinds:
        if not n or not fits(limit + a):
            continue
        lo, hi = 1, limit  # the least k whose cost fits, by bisection
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid + a) else (mid + 1, hi)
        best = min(best, lo + a)
    return best


def _even_fill(extra: int, kinds: list[tuple[float, int]], caps: list[int]) -> list[int]:
    """Stage sizes: every stage starts with one block; the `extra` others go one at a
    time to a stage of least cost (one more block on a stage of cost c adds 2c + 1 to
    the sum of squares), within each kind's cap. The lowest cost levels are all taken;
    of the last level's blocks, the earliest stages get theirs."""
    spans = [(a, n, cap - 1) for (a, n), cap in zip(kinds, caps)]  # a stage's extra slots

    def taken(level: float, strict: bool) -> int:
        return sum(n * _count_upto(a, room, level, strict) for a, n, room in spans)

    last = math.inf  # the cost level from which the extra-th block is drawn
    for a, n, room in spans:
        if extra and n and room and taken(room + a, strict=False) >= extra:
            lo, hi = 1, room
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if taken(mid + a, strict=False) >= extra else (mid + 1, hi)
            last = min(last, lo + a)
    sizes, left = [], extra - (taken(last - _TIE, strict=True) if extra else 0)
    for a, n, room in spans:
        k = 1 + (_count_upto(a, room, last - _TIE, strict=True) if extra else 0)
        tie = k <= room and abs(k + a - last) <= _TIE  # its next block is on the last level
        more = min(left, n) if tie else 0
        sizes += [k + 1] * more + [k] * (n - more)
        left -= more
    return sizes


# --------------------------------------------------------------------------- stage modules


def build_stage_modules(model: GPT, pp_rank: int, pp: int, virtual: int,
                        schedule: str) -> list[nn.Module]:
    """One trimmed copy of `model` per stage this rank hosts (in stage_ids order).

    Blocks are split by `stage_layout` with the costs of `stage_costs(model.cfg)`.
    Only the kept parts are copied (the dropped submodules are pre-seeded as None in
    deepcopy's memo), so a stage costs its own share of memory, not the whole model's.
    With tied embeddings the last stage's `lm_head.weight` becomes its own Parameter
    holding the same values as `tok_emb.weight` (no stage holds both); keep the copies
    equal with `sync_tied_grads`. `init_weights(seed)` on a stage gives the copy the
    embedding's values (both are keyed by the embedding's name). pp == 1 returns
    [model] itself.
    """
    ids = stage_ids(pp_rank, pp, virtual, schedule)
    if pp == 1:
        return [model]
    n_stages = pp * virtual
    names = list(model.layers.keys())
    embed_cost, head_cost = stage_costs(model.cfg)
    layout = stage_layout(len(names), n_stages, head_cost=head_cost, embed_cost=embed_cost)
    tie = "none"
    if model.cfg.tie_embeddings:
        first, last = (stage_rank(s, pp, n_stages, schedule) for s in (0, n_stages - 1))
        tie = "local" if first == last else "peer"
    stages = []
    for s in ids:
        keep = {names[i] for i in layout[s]}
        memo: dict[int, Any] = {id(block): None for name, block in model.layers.items()
                                if name not in keep}
        if s != 0:
            memo[id(model.tok_emb)] = None
            if model.pos_emb is not None:
                memo[id(model.pos_emb)] = None
        if s != n_stages - 1:
            memo[id(model.norm)] = None
            memo[id(model.lm_head)] = None
        stage = copy.deepcopy(model, memo)
        for name in [n for n, block in stage.layers.items() if block is None]:
            del stage.layers[name]
        setattr(stage, _TIE_ATTR, tie)
        stages.append(stage)
    return stages


def _unwrap_gpt(module: nn.Module) -> GPT | None:
    """The GPT inside DDP (`.module`) / torch.compile (`._orig_mod`), or None."""
    for _ in range(4):
        if isinstance(module, GPT):
            return module
        inner = getattr(module, "module", None)
        if inner is None:
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        module = inner
    return None


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.",
                     "_checkpoint_wrapped_module.")


def is_tied_copy(param_name: str, module: nn.Module) -> bool:
    """Whether `param_name` of `module` is a pipeline stage's own copy of the tied
    embedding (the last stage's `lm_head.weight` when another stage holds `tok_emb`).

    After `sync_tied_grads` its gradient equals the embedding's, so a global grad
    norm must skip it to count the tied weight once. Wrapper prefixes (DDP's
    `module.`, torch.compile's `_orig_mod.`) are ignored.
    """
    gpt = _unwrap_gpt(module)
    if gpt is None or not gpt.cfg.tie_embeddings or gpt.lm_head is None or gpt.tok_emb is not None:
        return False
    name = param_name
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name == "lm_head.weight"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sync_tied_grads(stage_modules: Iterable[nn.Module], pp_group) -> None:
    """Make the tied embedding's two copies' gradients both equal to their sum.

    Call it on every pp rank after `Pipeline.step` (and after any data-parallel
    gradient reduction) and before clipping. The copies then stay identical under
    any optimizer, since they start equal and always get the same gradient.

    - first and last stage in one module (pp == 1): a single shared Parameter, nothing to do;
    - both stages on this rank in different modules (the V schedules put stage 0 and
      the last stage on rank 0): a local sum, no communication;
    - on different ranks (pp ranks 0 and p-1 in every placement): the two holders
      swap their gradients point-to-point and each adds the other's; middle ranks
      return at once. Why not an all-reduce over the pp group with zeros from the
      others: a middle rank holds neither copy and cannot know the shape of a
      tensor-parallel shard of it; and a two-rank group cannot be created here
      (new_group is collective over the whole world). a + b == b + a in IEEE
      arithmetic, so both copies end bitwise equal.

    The gradients may be DTensors (FSDP2 / tensor parallel): their local shards are
    exchanged, which requires `tok_emb.weight` and `lm_head.weight` to be sharded
    alike (same placements on the same mesh), as an embedding table tied to a
    vocab-parallel head is.
    """
    if isinstance(pp_group, DeviceMesh):
        pp_group = pp_group.get_group()
    gpts = [g for g in (_unwrap_gpt(m) for m in stage_modules) if g is not None]
    modes = {getattr(g, _TIE_ATTR, "none") for g in gpts}
    if len(modes) > 1:
        raise ValueError(f"stage modules disagree on the tied-embedding layout: {modes}")
    mode = modes.pop() if modes else "none"
    if mode == "none":
        return
    emb = [g.tok_emb.weight for g in gpts if g.tok_emb is not None]
    head = [g.lm_head.weight for g in gpts if g.lm_head is not None and g.tok_emb is None]
    mine = emb + head
    for p in mine:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if mode == "local":
        if not mine:
            return  # a rank holding neither end of the V
        if len(emb) != 1 or len(head) != 1:
            raise RuntimeError("tied embeddings: expected both copies on this rank")
        _check_alike(emb[0].grad, head[0].grad)
        total = emb[0].grad + head[0].grad
        emb[0].grad.copy_(total)
        head[0].grad.copy_(total)
        return
    if not mine:
        return
    if len(mine) != 1:
        raise RuntimeError("tied embeddings: a rank holds both copies in 'peer' mode")
    size = dist.get_world_size(pp_group)
    peer = size - 1 if emb else 0  # stage 0 lives on pp rank 0, the last stage on p-1
    _add_peer_grad(_local(mine[0].grad), pp_group, peer)


def _add_peer_grad(grad: torch.Tensor, pp_group, peer: int) -> None:
    """Swap `grad` with pp rank `peer`'s copy point-to-point and add the copy in place."""
    other = torch.empty_like(grad)
    ops = [dist.P2POp(dist.isend, grad.contiguous(), group=pp_group, group_peer=peer),
           dist.P2POp(dist.irecv, other, group=pp_group, group_peer=peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    grad.add_(other)


def _check_alike(a: torch.Tensor, b: torch.Tensor) -> None:
    if isinstance(a, DTensor) != isinstance(b, DTensor) or isinstance(a, DTensor) and (
            a.placements != b.placements or a.device_mesh != b.device_mesh):
        raise ValueError("tied embedding copies are sharded differently; their gradients "
                         "cannot be summed shard by shard")

