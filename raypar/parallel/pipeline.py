"""Pipeline parallelism: run a GPT's stages with a torch schedule.

    ids     = stage_ids(pp_rank, pp, virtual, schedule)               # global stages of this rank
    modules = build_stage_modules(model, pp_rank, pp, virtual, schedule)
    ... tensor parallel, then replicate / FSDP2, on each module ...
    pipe    = Pipeline(modules, ids, pp * virtual, pp_group, device, schedule,
                       n_microbatches, lm_loss, loss_context=...)
    loss    = pipe.step(inputs, targets)        # forward + backward of every micro-batch
    sync_tied_grads(modules, pp_group)          # before clipping, when embeddings are tied
    val     = pipe.eval(inputs, targets)

The stage split (build_stage_modules, stage_layout) and the tied-embedding helpers
(sync_tied_grads, is_tied_copy) are raypar/parallel/stages.py; stage_ids and
stage_rank are raypar/parallel/schedules.py's. This file is the schedule runtime.

The schedules are torch.distributed.pipelining's; raypar/parallel/schedules.py holds
the table of them (torch class, stage placement, stages per rank, micro-batch rules)
and this file maps a name onto the class and adds the loss bookkeeping.
Bubble figures and timeline plots: raypar/parallel/timeline.py.

All of them run on gloo/CPU as well as NCCL: the zero-bubble ones split each backward
into an input-gradient part (I) and a weight-gradient part (W) with plain autograd
graph surgery (torch's stage_backward_input / stage_backward_weight), which needs no
collective beyond point-to-point send/recv. Not offered: ScheduleLoopedBFS (works, but
it is an interleaved GPipe, dominated by interleaved_1f1b) and CSV-loaded custom
`_PipelineScheduleRuntime` schedules (private API).

Limits of the split backward, from torch's implementation rather than from gloo:
- torch computes the W part with `torch.autograd.grad` and writes `.grad` itself, so
  torch's `DistributedDataParallel`, whose reducer hooks autograd's gradient
  accumulation, would never average those gradients over dp (seen with dp=2 x pp=2 on
  gloo: wrong gradients); a DDP-wrapped stage module is refused with the zero-bubble
  schedules. raypar's data parallelism is FSDP2's family (`replicate`, `fully_shard`),
  which the schedule reduces explicitly after the last micro-batch.
- torch refuses stage modules that use torch.compile with the zero-bubble schedules.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
import torch.distributed.pipelining as pipelining
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from raypar.parallel import schedules
from raypar.parallel.schedules import stage_ids, stage_rank
from raypar.parallel.timeline import now as _now


# --------------------------------------------------------------------------- runtime


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
        them, possibly tensor-parallel and replicate / FSDP2 sharded) and their global
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
                 record_timeline: bool = False, grad_divisor: int = 1):
        if isinstance(pp_group, DeviceMesh):
            pp_group = pp_group.get_group()
        self.spec = schedules.get(schedule)
        if len(stage_modules) != len(stage_indices) or not stage_modules:
            raise ValueError("need one stage index per stage module")
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
        self.group = pp_group
        self.pp = dist.get_world_size(pp_group)
        self.rank = dist.get_rank(pp_group)
        self._check_layout(stage_modules, stage_indices, n_stages)
        order = sorted(range(len(stage_indices)), key=lambda i: stage_indices[i])
        self.modules = [stage_modules[i] for i in order]
        self.indices = [stage_indices[i] for i in order]
        self.n_stages = n_stages
        self.device = torch.device(device)
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        # Data-parallel replicas whose gradients are summed (raypar/parallel/data.py): the
        # training loss is divided by them too, so the sum is the mean over all of them.
        self.grad_divisor = grad_divisor
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

    def _check_layout(self, stage_modules, stage_indices, n_stages: int) -> None:
        """The stages this rank was given are the ones the schedule places here."""
        if n_stages % self.pp or (self.pp == 1 and n_stages != 1):
            raise ValueError(f"{n_stages} stages do not fit {self.pp} pp ranks "
                             f"(a multiple of pp, and 1 when pp == 1)")
        name = self.spec.name
        expected = stage_ids(self.rank, self.pp, n_stages // self.pp, name)
        if sorted(stage_indices) != expected:
            raise ValueError(f"pp rank {self.rank} should host stages {expected} under "
                             f"{name}, got {sorted(stage_indices)}")
        if self.spec.zero_bubble and self.pp > 1 and any(
                isinstance(m, DistributedDataParallel) for m in stage_modules):
            raise ValueError(f"schedule {name} splits the backward, and DDP does not see "
                             f"the weight-gradient half (torch computes it outside autograd's "
                             f"accumulation); use FSDP2 for dp > 1, or gpipe / 1f1b / "
                             f"interleaved_1f1b")

    # -- schedule construction -------------------------------------------------------
    def _train_loss(self, output, target):
        # Each micro-batch's mean loss / m: the accumulated gradients are those of the
        # mean over micro-batches. (torch's scale_grads would divide the .grad fields
        # after the step instead, which also rescales gradients accumulated earlier.)
        loss = self.loss_fn(output, target) / (self.n_microbatches * self.grad_divisor)
        # Every schedule computes the loss right after the last stage's forward of that
        # micro-batch: count it in that F bar rather than as idle time.
        ev = self._events
        if ev and ev[-1]["kind"] == "F" and ev[-1]["stage"] == self.n_stages - 1:
            ev[-1]["end"] = _now()
        return loss

    def _build(self, train: bool):
        single = self.pp == 1 or self.spec.virtual == schedules.ONE
        # One stage in all: any order does; else the table's class, looked up only here
        # so that reading the table (config checks) never imports torch.
        cls = getattr(pipelining, self.spec.torch_class) if self.pp > 1 else ScheduleGPipe
        stages = [_Stage(m, s, self.n_stages, self.device, group=self.group)
                  for m, s in zip(self.modules, self.indices)]
        for st in stages:
            st.copy_view_outputs = self.spec.zero_bubble
        loss = self._train_loss if train else self.loss_fn
        target = stages[0] if single else stages  # torch's single-stage schedules take one
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
            # train: losses were divided by m (and the replicas), so their sum is the
            # mean (over this replica's micro-batches, once multiplied back); eval: not.
            out = total * self.grad_divisor if train else total / self.n_microbatches
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
