"""Pipeline parallelism: cut the GPT into stages and run them with a torch schedule.

    ids     = stage_ids(pp_rank, pp, virtual, schedule)               # global stages of this rank
    modules = build_stage_modules(model, pp_rank, pp, virtual, schedule)
    ... tensor parallel, then DDP / FSDP2, on each module ...
    pipe    = Pipeline(modules, ids, pp * virtual, pp_group, device, schedule,
                       n_microbatches, lm_loss, loss_context=...)
    loss    = pipe.step(inputs, targets)        # forward + backward of every micro-batch
    sync_tied_grads(modules, pp_group)          # before clipping, when embeddings are tied
    val     = pipe.eval(inputs, targets)

A stage is a copy of the whole model with the blocks it does not own deleted from
`layers` (the rest keep their global names, so checkpoints stay keyed by the
single-process FQNs), `tok_emb` / `pos_emb` set to None unless it is global stage 0
and `norm` / `lm_head` None unless it is the last one. `GPT.forward` copes with all
of these, so every stage runs the model file's own code.

The schedules are torch.distributed.pipelining's (this file only maps names onto
them, picks the stage placement each one expects and adds the loss bookkeeping):

    name               torch class                      stages on pp rank r (p ranks, v per rank)
    gpipe              ScheduleGPipe                    [r]                    (v == 1)
    1f1b               Schedule1F1B                     [r]                    (v == 1)
    interleaved_1f1b   ScheduleInterleaved1F1B          [r, r+p, .., r+(v-1)p]
    interleaved_zb     ScheduleInterleavedZeroBubble    [r, r+p, .., r+(v-1)p]
    zbv                ScheduleZBVZeroBubble            [r, 2p-1-r]            (v == 2, "V" shape)
    dualpipev          ScheduleDualPipeV                [r, 2p-1-r]            (v == 2, "V" shape)

All of them run on gloo/CPU as well as NCCL: the zero-bubble ones split each backward
into an input-gradient part (I) and a weight-gradient part (W) with plain autograd
graph surgery (torch's stage_backward_input / stage_backward_weight), which needs no
collective beyond point-to-point send/recv. Not offered: ScheduleLoopedBFS (works, but
it is an interleaved GPipe, dominated by interleaved_1f1b) and CSV-loaded custom
`_PipelineScheduleRuntime` schedules (private API).

Limits of the split backward, from torch's implementation rather than from gloo:
- torch computes the W part with `torch.autograd.grad` and writes `.grad` itself, so
  DDP's reducer, which hooks autograd's gradient accumulation, never averages those
  gradients over dp (seen with dp=2 x pp=2 on gloo: wrong gradients). A DDP-wrapped stage
  module is therefore refused with the zero-bubble schedules; FSDP2 works (the
  schedule reduces it explicitly), and so does a gradient all-reduce after the step.
- torch refuses stage modules that use torch.compile with the zero-bubble schedules.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, Callable, ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                          ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from raypar.model import GPT, GPTConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
LOOPED = ("interleaved_1f1b", "interleaved_zb")  # v >= 1 stages per rank, round-robin
V_SHAPED = ("zbv", "dualpipev")                  # exactly 2 stages per rank, r and 2p-1-r
ZERO_BUBBLE = ("interleaved_zb", "zbv", "dualpipev")

_CLASSES = {
    "gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B, "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV,
}

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
    leftovers go to the first stages).
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layer < n_stages:
        raise ValueError(f"{n_layer} layers cannot fill {n_stages} pipeline stages "
                         f"(every stage needs at least one block)")
    L, S, eps = n_layer, n_stages, 1e-9

    def cost(s: int, k: int) -> float:
        return k + (embed_cost if s == 0 else 0.0) + (head_cost if s == S - 1 else 0.0)

    def sizes(s: int, i: int) -> range:  # blocks stage s may take from layer i on
        return range(L - i - (S - 1 - s), 0, -1)  # largest first; leave 1 per later stage

    # Pass 1: the least achievable bottleneck, best[s][i] for layers i.. on stages s..
    inf = math.inf
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    best[S][L] = 0.0
    for s in range(S - 1, -1, -1):
        for i in range(s, L - (S - 1 - s)):
            best[s][i] = min(max(cost(s, k), best[s + 1][i + k]) for k in sizes(s, i))
    bound = best[0][0] + eps
    # Pass 2: the most even split under that bottleneck (sum of squares is additive).
    sq = [[inf] * (L + 1) for _ in range(S + 1)]
    pick = [[0] * (L + 1) for _ in range(S + 1)]
    sq[S][L] = 0.0
    for s in range(S - 1, -1, -1):
        for i in range(s, L - (S - 1 - s)):
            for k in sizes(s, i):
                c = cost(s, k)
                if c > bound:
                    continue
                v = c * c + sq[s + 1][i + k]
                if v < sq[s][i] - eps:  # strict: ties keep the larger k (earlier stage)
                    sq[s][i], pick[s][i] = v, k
    layout, i = [], 0
    for s in range(S):
        k = pick[s][i]
        layout.append(list(range(i, i + k)))
        i += k
    return layout


def _unknown(schedule: str) -> str:
    return f"unknown pipeline schedule {schedule!r}; choose from {', '.join(SCHEDULES)}"


def _check_virtual(pp: int, virtual: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(_unknown(schedule))
    if pp < 1 or virtual < 1:
        raise ValueError(f"pp and virtual must be >= 1, got pp={pp}, virtual={virtual}")
    if pp == 1:
        return
    if schedule in V_SHAPED and virtual != 2:
        raise ValueError(f"schedule {schedule} places exactly 2 stages per rank (a V); "
                         f"got virtual={virtual}")
    if schedule not in LOOPED + V_SHAPED and virtual != 1:
        raise ValueError(f"schedule {schedule} runs one stage per rank; got virtual={virtual} "
                         f"(use one of {', '.join(LOOPED + V_SHAPED)} for several)")


def stage_ids(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Global stage indices pp rank `pp_rank` hosts, ascending.

    Round-robin ('loop') placement r, r+p, ... for gpipe / 1f1b / the interleaved
    schedules; the V placement [r, 2p-1-r] of ZBV and DualPipeV (stage 0 and the last
    stage both sit on rank 0). pp == 1 is one stage, whatever `virtual` says.
    """
    _check_virtual(pp, virtual, schedule)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} outside [0, {pp})")
    if pp == 1:
        return [0]
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def stage_rank(stage: int, pp: int, n_stages: int, schedule: str) -> int:
    """The pp rank hosting global stage `stage` (the inverse of stage_ids)."""
    if pp == 1:
        return 0
    if schedule in V_SHAPED:
        return stage if stage < pp else n_stages - 1 - stage
    return stage % pp


# --------------------------------------------------------------------------- stage modules


def build_stage_modules(model: GPT, pp_rank: int, pp: int, virtual: int,
                        schedule: str) -> list[nn.Module]:
    """One trimmed copy of `model` per stage this rank hosts (in stage_ids order).

    Blocks are split by `stage_layout` with the costs of `stage_costs(model.cfg)`.
    Only the kept parts are copied (the dropped submodules are pre-seeded as None in
    deepcopy's memo), so a stage costs its own share of memory, not the whole model's.
    With tied embeddings the last stage's `lm_head.weight` becomes its own Parameter
    holding the same values as `tok_emb.weight` (no stage holds both); keep the copies
    equal with `sync_tied_grads`, and don't call `init_weights` on a stage (it would
    re-draw the copy independently). pp == 1 returns [model] itself.
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
    grad = _local(mine[0].grad)
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


# --------------------------------------------------------------------------- runtime


_ANCHOR = time.time() - time.perf_counter()


def _now() -> float:
    """perf_counter's resolution on the wall clock's origin, so the timelines of
    processes on one host line up (across hosts only as well as their clocks do)."""
    return _ANCHOR + time.perf_counter()


class _Stage(PipelineStage):
    """torch's PipelineStage plus (a) a timeline of its compute calls and (b) a
    forward-only fix for the V schedules.

    (a) The schedules expose no hook per action, and module forward hooks would see
    neither the micro-batch index nor the backward, and would also fire for torch's
    metadata-inference forward. Overriding the three compute entry points of the
    stage object (never the user's module) gets all three kinds with their
    micro-batch ids at the cost of two clock reads per call.

    (b) `schedule.eval()` runs a schedule's whole action list with backward disabled;
    torch's runtime then still hands (absent) input gradients between two adjacent
    stages on one rank (the V schedules' turn), and asserts. Those hand-offs, and the
    FSDP post-backward of REDUCE_GRAD, are skipped here when there is no backward.

    (c) torch's input-gradient half of a split backward (stage_backward_input) ends with
    `detach_()` on the stage's outputs, which raises for a view; a tensor-parallel
    stage's output can be one (sequence parallelism gathers it back into a view). With
    the zero-bubble schedules such outputs are replaced by a copy right after the
    forward, before anything reads them (one activation copy per micro-batch).
    """

    timeline: list[dict] | None = None  # set by Pipeline to record into
    copy_view_outputs: bool = False     # set by Pipeline for the split-backward schedules

    def _record(self, kind: str, mb: int, start: float) -> None:
        if self.timeline is not None:
            self.timeline.append({"stage": self.stage_index, "microbatch": mb, "kind": kind,
                                  "start": start, "end": _now()})

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        t = _now()
        out = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        if self.copy_view_outputs and self.has_backward and not self.is_last:
            outputs, inputs = self.fwd_cache[fwd_chunk_id]
            if any(isinstance(o, torch.Tensor) and o._is_view() for o in outputs):
                outputs = tuple(o.clone() if isinstance(o, torch.Tensor) and o._is_view() else o
                                for o in outputs)
                self.fwd_cache[fwd_chunk_id] = (outputs, inputs)
                out = outputs[0] if isinstance(out, torch.Tensor) else outputs
        self._record("F", fwd_chunk_id, t)
        return out

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        t = _now()
        super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                   last_backward=last_backward)
        if self.has_backward:
            self._record("B", bwd_chunk_id, t)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        t = _now()
        super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)
        if self.has_backward:
            self._record("W", bwd_chunk_id, t)

    def get_local_bwd_output(self, mb_index):
        if not self.has_backward:
            return ()
        return super().get_local_bwd_output(mb_index)

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index):
        if not self.has_backward:
            return
        super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    def perform_reduce_grad(self, grad_scale_factor):
        if not self.has_backward:
            return
        super().perform_reduce_grad(grad_scale_factor)


def _scalar(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.float().reshape(())


class Pipeline:
    """Runs this pp rank's stage modules under one torch pipeline schedule.

    stage_modules / stage_indices: this rank's modules (as build_stage_modules made
        them, possibly tensor-parallel and DDP / FSDP2 wrapped) and their global
        indices (stage_ids); n_stages = pp * virtual.
    pp_group: the pipeline ProcessGroup, or the 1-D pp DeviceMesh (its group is used).
    loss_fn(logits, targets) -> scalar mean loss of one micro-batch (e.g. lm_loss).
    loss_context: a factory of a context manager wrapped around each schedule call
        (e.g. DTensor loss_parallel for vocab-sharded logits).

    Schedules are built lazily, one per (train | eval, batch shape): a torch schedule
    infers its stages' activation shapes from the first micro-batch and keeps
    receive buffers of that size. Eval uses its own PipelineStage objects, so
    alternating train and eval never redoes that inference.
    """

    def __init__(self, stage_modules: list[nn.Module], stage_indices: list[int], n_stages: int,
                 pp_group, device, schedule: str, n_microbatches: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 loss_context: Callable[[], ContextManager] | None = None,
                 record_timeline: bool = False):
        if isinstance(pp_group, DeviceMesh):
            pp_group = pp_group.get_group()
        if schedule not in SCHEDULES:
            raise ValueError(_unknown(schedule))
        if len(stage_modules) != len(stage_indices) or not stage_modules:
            raise ValueError("need one stage index per stage module")
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
        self.group = pp_group
        self.pp = dist.get_world_size(pp_group)
        self.rank = dist.get_rank(pp_group)
        if n_stages % self.pp or (self.pp == 1 and n_stages != 1):
            raise ValueError(f"{n_stages} stages do not fit {self.pp} pp ranks "
                             f"(a multiple of pp, and 1 when pp == 1)")
        virtual = n_stages // self.pp
        expected = stage_ids(self.rank, self.pp, virtual, schedule)
        if sorted(stage_indices) != expected:
            raise ValueError(f"pp rank {self.rank} should host stages {expected} under "
                             f"{schedule}, got {sorted(stage_indices)}")
        if schedule in ZERO_BUBBLE and self.pp > 1 and any(
                isinstance(m, DistributedDataParallel) for m in stage_modules):
            raise ValueError(f"schedule {schedule} splits the backward, and DDP does not see "
                             f"the weight-gradient half (torch computes it outside autograd's "
                             f"accumulation); use FSDP2 for dp > 1, or gpipe / 1f1b / "
                             f"interleaved_1f1b")
        order = sorted(range(len(stage_indices)), key=lambda i: stage_indices[i])
        self.modules = [stage_modules[i] for i in order]
        self.indices = [stage_indices[i] for i in order]
        self.n_stages = n_stages
        self.device = torch.device(device)
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.loss_context = loss_context
        self.record_timeline = record_timeline
        self.has_first = 0 in self.indices
        self.has_last = n_stages - 1 in self.indices
        self.last_rank = stage_rank(n_stages - 1, self.pp, n_stages, schedule)
        self.timeline: list[dict] = []
        self.step_start = self.step_end = 0.0
        self._schedules: dict[tuple, Any] = {}
        self._events: list[dict] | None = None  # the step being recorded
        self._build(True)  # torch checks its constraints (e.g. 1f1b: m >= stages) here, early

    # -- schedule construction -------------------------------------------------------
    def _train_loss(self, output, target):
        # Each micro-batch's mean loss / m: the accumulated gradients are those of the
        # mean over micro-batches. (torch's scale_grads would divide the .grad fields
        # after the step instead, which also rescales gradients accumulated earlier.)
        loss = self.loss_fn(output, target) / self.n_microbatches
        # Every schedule computes the loss right after the last stage's forward of that
        # micro-batch: count it in that F bar rather than as idle time.
        ev = self._events
        if ev and ev[-1]["kind"] == "F" and ev[-1]["stage"] == self.n_stages - 1:
            ev[-1]["end"] = _now()
        return loss

    def _build(self, train: bool):
        cls = _CLASSES[self.schedule] if self.pp > 1 else ScheduleGPipe  # one stage: any order
        stages = [_Stage(m, s, self.n_stages, self.device, group=self.group)
                  for m, s in zip(self.modules, self.indices)]
        for st in stages:
            st.copy_view_outputs = self.schedule in ZERO_BUBBLE
        loss = self._train_loss if train else self.loss_fn
        target = stages[0] if cls in (ScheduleGPipe, Schedule1F1B) else stages
        return cls(target, self.n_microbatches, loss_fn=loss, scale_grads=False), stages

    def _schedule_for(self, train: bool, shape: tuple[int, int]):
        key = (train, shape)
        if key not in self._schedules:
            self._schedules[key] = self._build(train)
        return self._schedules[key]

    def _agree_shape(self, inputs, targets) -> tuple[int, int]:
        """The (B, T) every pp rank runs: ranks without a batch learn it from the others.

        One small all-gather per call; every check below is made on the gathered
        values, so a bad call raises on all pp ranks alike instead of leaving the
        others waiting in the schedule.
        """
        ref = inputs if inputs is not None else targets
        missing = int(self.has_first and inputs is None or self.has_last and targets is None)
        shape = list(ref.shape[:2]) if ref is not None else [0, 0]
        mine = torch.tensor([*shape, missing], dtype=torch.int64, device=self.device)
        gathered = [mine]
        if self.pp > 1:
            gathered = [torch.empty_like(mine) for _ in range(self.pp)]
            dist.all_gather(gathered, mine, group=self.group)
        rows = [g.tolist() for g in gathered]
        if any(r[2] for r in rows):
            raise ValueError("the rank hosting the first stage must pass inputs and the one "
                             "hosting the last stage targets")
        shapes = {tuple(r[:2]) for r in rows} - {(0, 0)}
        if len(shapes) != 1:
            raise ValueError(f"pp ranks passed batches of different shapes: {sorted(shapes)}")
        B, T = shapes.pop()
        if B % self.n_microbatches:
            raise ValueError(f"batch size {B} is not divisible by "
                             f"n_microbatches={self.n_microbatches}")
        return B, T

    def _run(self, train: bool, inputs, targets) -> float:
        shape = self._agree_shape(inputs, targets)
        sched, stages = self._schedule_for(train, shape)
        args = (inputs,) if self.has_first else ()
        target = targets if self.has_last else None
        losses: list[torch.Tensor] = []
        events: list[dict] | None = [] if (train and self.record_timeline) else None
        for st in stages:
            st.timeline = events
        self._events = events
        ctx = self.loss_context() if self.loss_context is not None else contextlib.nullcontext()
        start = _now()
        try:
            with ctx:
                if train:
                    sched.step(*args, target=target, losses=losses, return_outputs=False)
                else:
                    sched.eval(*args, target=target, losses=losses, return_outputs=False)
        finally:
            for st in stages:
                st.timeline = None
            self._events = None
        end = _now()
        if events is not None:
            self.timeline, self.step_start, self.step_end = events, start, end
        out = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.has_last:
            total = torch.stack([_scalar(l) for l in losses]).sum()
            # train: losses were divided by m, so their sum is the mean; eval: not.
            out = total if train else total / self.n_microbatches
        if self.pp > 1:
            dist.broadcast(out, group=self.group, group_src=self.last_rank)
        return out.item()

    # -- public ---------------------------------------------------------------------
    def step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> float:
        """Forward + backward of all micro-batches of this (B, T) batch.

        Gradients accumulate into the stage parameters' .grad (call zero_grad between
        steps) and equal those of the mean micro-batch loss. Returns that mean on every
        pp rank. The first stage's rank must pass `inputs`, the last stage's `targets`;
        any rank may pass both (the same batch), others may pass None.
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("Pipeline.step needs autograd; use Pipeline.eval under no_grad")
        return self._run(True, inputs, targets)

    def eval(self, inputs: torch.Tensor | None, targets: torch.Tensor | None) -> float:
        """Mean loss over the micro-batches, forward only (no graph, no gradients), on
        every pp rank. Stage modules are put in eval mode for the call (no dropout) and
        restored afterwards."""
        modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        try:
            with torch.no_grad():
                return self._run(False, inputs, targets)
        finally:
            for m, mode in zip(self.modules, modes):
                m.train(mode)


# --------------------------------------------------------------------------- timelines


def theoretical_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a rank's step for p ranks, m micro-batches, v stages per rank.

    gpipe, 1f1b:       (p-1) / (m+p-1)
    interleaved_1f1b:  (p-1) / (v*m+p-1)        (Narayanan et al. 2021)
    interleaved_zb:    (p-1) / (3*v*m+p-1)      (ZB-H1, Qi et al. 2023)
    zbv, dualpipev:    0

    The zero-bubble figures take the papers' idealisation that a stage's forward (F),
    input-gradient (B) and weight-gradient (W) passes cost the same unit. A rank then
    works 3*v*m units per step; 1F1B-style schedules idle (p-1)(F+B+W) = 3(p-1) units
    beside that (the first two formulas), ZB-H1 fills all but (p-1)(F+B-W) = p-1 of
    them with deferred W passes, and the V schedules (ZB-V; DualPipeV, DeepSeek 2024)
    fill the rest too once m >= 2p. Real F, B and W differ (and a first stage's B is
    empty), so compare with `measured_bubble`.
    """
    if p < 1 or m < 1 or v < 1:
        raise ValueError("p, m and v must be >= 1")
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "interleaved_zb":
        return (p - 1) / (3 * v * m + p - 1)
    if schedule in V_SHAPED:
        return 0.0
    raise ValueError(_unknown(schedule))


def covered_length(spans: Iterable[tuple[float, float]]) -> float:
    """Total length covered by intervals (s, e) that may overlap or nest; empty ones
    (e <= s) count nothing."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if e <= s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def measured_bubble(events: list[dict], step_start: float, step_end: float) -> float:
    """1 - busy / elapsed for one rank: busy is the union of its F/B/W intervals (clipped
    to the step), so overlapping records are not counted twice."""
    elapsed = step_end - step_start
    if elapsed <= 0:
        raise ValueError("step_end must be after step_start")
    busy = covered_length((max(e["start"], step_start), min(e["end"], step_end))
                          for e in events)
    return 1.0 - busy / elapsed


def pipeline_bubble(timelines: list[dict]) -> float:
    """Idle fraction of one pipeline step, averaged over its ranks: each timeline is one
    rank's {"events", "start", "end"} of the same step, and every rank is measured over
    the step's whole span (earliest start to latest end). That is the theory's step: a
    rank whose schedule returns early (the last stage finishes before the first stage's
    final backward) still waits for the others before the optimizer step."""
    start, end = step_span(timelines)
    return sum(measured_bubble(t["events"], start, end) for t in timelines) / len(timelines)


def step_span(timelines: list[dict]) -> tuple[float, float]:
    """(earliest start, latest end) of one pipeline step's per-rank timelines."""
    if not timelines:
        raise ValueError("no timelines")
    return min(t["start"] for t in timelines), max(t["end"] for t in timelines)


def plot_timeline(events_per_rank: dict[int, list[dict]], path) -> None:
    """Write a PNG: one row per pp rank, a bar per F / B / W event (blue / orange /
    green, darker for later micro-batches), labelled with its micro-batch index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    everything = [e for evs in events_per_rank.values() for e in evs]
    t0 = min((e["start"] for e in everything), default=0.0)
    n_mb = 1 + max((e["microbatch"] for e in everything), default=0)
    cmaps = {"F": plt.get_cmap("Blues"), "B": plt.get_cmap("Oranges"), "W": plt.get_cmap("Greens")}
    ranks = sorted(events_per_rank)
    fig, ax = plt.subplots(figsize=(12, 0.8 + 0.6 * max(1, len(ranks))))
    for row, rank in enumerate(ranks):
        for e in events_per_rank[rank]:
            x, w = (e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3
            shade = 0.4 + 0.5 * e["microbatch"] / max(1, n_mb - 1)
            ax.barh(row, w, left=x, height=0.8, color=cmaps[e["kind"]](shade), edgecolor="black",
                    linewidth=0.3)
            ax.text(x + w / 2, row, f"{e['microbatch']}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(ranks)), [f"pp rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first event")
    ax.legend(handles=[Patch(color=cmaps[k](0.7), label=k) for k in "FBW"], loc="upper left",
              bbox_to_anchor=(1.0, 1.0),
              fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
