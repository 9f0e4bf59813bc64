"""Who trains, and how the ranks agree on what to do next: the worker group's layout and
process groups, the per-step flag exchange, the ranks that sit out, Ray Train's report
barrier, and SIGTERM (a preemption) turned into a checkpoint.

Every rank, sitting out or not, takes part in the same collectives in the same order:
one flag exchange per meeting (after every step, or fewer: RankTrainer.meets), then the
plan (how many reports, whether to stop) that rank 0 shares with the ranks that sit out,
then that many reports.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from raypar.config import RunSpec, choose_dp
from raypar.parallel.mesh import ParallelMesh, build_mesh

log = logging.getLogger("raypar")


# -- the worker group's layout --------------------------------------------------------------------

def resolve_layout(spec: RunSpec, workers: int) -> RunSpec:
    """This worker group's layout: a fixed one as configured; an elastic one with as many
    replicas as its workers allow (raypar.config.choose_dp)."""
    if not spec.parallel.elastic.enabled:
        if workers != spec.world_size:
            raise RuntimeError(f"{workers} workers for a layout of {spec.world_size}")
        return spec
    dp = choose_dp(spec, workers)
    if dp < 1:
        raise RuntimeError(f"{workers} workers hold no valid layout of at least "
                           f"parallel.elastic.min_replicas={spec.min_dp} replicas")
    return spec.with_dp(dp)


@dataclass
class Groups:
    """One worker group's process groups. Every rank creates them (group creation is
    collective), those that sit out included: an elastic run whose workers do not make a
    whole number of usable replicas trains on the first dp*pp*tp ranks only."""
    mesh: Optional[ParallelMesh]  # None: this rank sits out
    active: Optional[dist.ProcessGroup]  # the training ranks (None: every rank)
    save: Optional[dist.ProcessGroup]  # background saves' own group over the training ranks
    idle: Optional[dist.ProcessGroup]  # rank 0 and the ranks that sit out (None: nobody)
    n_active: int

    @classmethod
    def build(cls, spec: RunSpec) -> "Groups":
        p = spec.parallel
        world, n = dist.get_world_size(), spec.world_size
        mesh = build_mesh(p.dp, p.pp, p.tp, p.dp_shard if p.dp_mode == "hsdp" else 1)
        active = idle = None
        if world > n:
            active = dist.new_group(ranks=list(range(n)))
            idle = dist.new_group(ranks=[0, *range(n, world)])
        # Background saves run DCP's collectives on a thread while training runs its own:
        # they get a group of their own so the two never interleave on one.
        save = (dist.new_group(ranks=list(range(n)), backend="gloo")
                if spec.checkpoint.async_save and n > 1 else None)
        return cls(mesh, active, save, idle, n)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


# -- the per-step exchange -------------------------------------------------------------------------

@dataclass(frozen=True)
class StepFlags:
    """The flags every rank contributes once per step, combined by max over all ranks:
    rank 0's decisions (its clock decides when rows are due, and when a background save has
    landed, and whether the driver asked the run to stop), Ray Train's preemption notice,
    and any rank's SIGTERM. Training and sitting-out ranks then act on the same values."""
    report_due: bool = False
    save_landed: bool = False
    notice: bool = False
    sigtermed: bool = False
    stop: bool = False

    def exchange(self) -> "StepFlags":
        mine = [int(self.report_due), int(self.save_landed), int(self.notice),
                int(self.sigtermed or SIGTERM.is_set()), int(self.stop)]
        if dist.get_world_size() > 1:
            t = torch.tensor(mine, dtype=torch.int64, device=_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            mine = t.tolist()
        return StepFlags(*map(bool, mine))


def barrier() -> None:
    """A flag exchange that decides nothing: every rank has arrived."""
    StepFlags().exchange()


def share_plan(n_reports: int, stop: bool, groups: Groups) -> tuple[int, bool]:
    """Rank 0 tells the ranks that sit out how many reports to make and whether to stop:
    ray.train.report is a barrier over every worker, so they report (empty) exactly when
    the others do."""
    if groups.idle is None:
        return n_reports, stop
    t = torch.tensor([n_reports, int(stop)], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=0, group=groups.idle)
    return int(t[0]), bool(t[1])


def broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (pickled between our own processes, never from storage)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report(metrics: dict[str, Any], **kwargs: Any) -> Optional[Any]:
    """ray.train.report, preceded by Ray Train's preemption check (both are barriers over
    every worker, so every rank, sitting out or not, calls the two together). Returns the
    preemption notice: a node of this group is being drained (a spot reclaim, an autoscaler
    scale-down), with the deadline Ray Core was given."""
    import ray.train  # here: see watch_sigterm
    notice = ray.train.get_preemption_info()
    ray.train.report(metrics, **kwargs)
    return notice


def sit_out(groups: Groups) -> None:
    """A rank beyond the layout: it holds no model, and takes part only in the control
    exchange and in Ray Train's report barrier, until training stops."""
    while True:
        StepFlags().exchange()
        n_reports, stop = share_plan(0, False, groups)
        for _ in range(n_reports):
            report({})
        if stop:
            barrier()  # the training ranks' closing barrier
            if SIGTERM.is_set():
                exit_after_sigterm()
            return


# -- SIGTERM: checkpoint, then exit ------------------------------------------------------------
# A spot preemption or a node drain sends the worker SIGTERM some time before the node goes.
# Ray's own handler exits at once; ours only records it, the step loop then saves a
# checkpoint with every rank, reports it, and the signalled process exits. Python runs
# signal handlers on the main thread, which in a Ray Train worker is the actor's task
# thread (training runs on another), so the handler is installed by an actor task
# (`RayTrainWorker.execute`) rather than from here.
SIGTERM = threading.Event()
_RAY_SIGTERM_HANDLER: Any = None


class Preempted(RuntimeError):
    """Raised by the ranks that were not signalled, once the preemption checkpoint is
    reported: the worker group restarts from it without the signalled worker."""


def _on_sigterm(signum: int, frame: Any) -> None:
    if SIGTERM.is_set() and callable(_RAY_SIGTERM_HANDLER):
        _RAY_SIGTERM_HANDLER(signum, frame)  # a second SIGTERM: exit now
    SIGTERM.set()


def _install_sigterm_handler() -> bool:
    global _RAY_SIGTERM_HANDLER
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _on_sigterm:
        _RAY_SIGTERM_HANDLER = previous
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def exit_after_sigterm() -> None:
    """Exit the way the SIGTERM would have made this process exit without our handler."""
    handler = _RAY_SIGTERM_HANDLER
    signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the main thread exits the process meanwhile
    os._exit(1)


def watch_sigterm() -> None:
    """Install the SIGTERM handler on this worker's main thread (see above)."""
    # ray is imported in the two functions that run in a Ray Train worker only: the bench's
    # baseline processes (a bare loop, torchrun) and the tests' one-process reference build
    # the same RankTrainer, which imports this module, and skip a second of ray's imports.
    import ray
    SIGTERM.clear()
    try:
        actor = ray.get_runtime_context().current_actor
        ok = ray.get(actor.execute.remote(_install_sigterm_handler), timeout=30)
    except Exception as e:  # noqa: BLE001 - not fatal: SIGTERM then exits at once
        ok, reason = False, f"{type(e).__name__}: {e}"
    else:
        reason = "the task did not run on the main thread"
    if not ok:
        log.warning("no SIGTERM handler (%s): a preemption loses the steps since the last "
                    "checkpoint", reason)


# -- what a step's flags mean ------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """What every rank does after a step, decided from the exchanged flags alone (so every
    rank decides the same): land the background save, save (and how), report, stop."""
    land: bool  # report the background save in flight, now that it is written
    save: bool
    sync: bool  # write the save before training goes on
    report: bool
    stop: bool

    @classmethod
    def decide(cls, flags: StepFlags, save_due: bool, last: bool, in_flight: bool,
               async_save: bool, save_on_stop: bool = False) -> "StepPlan":
        preempted = flags.sigtermed
        # A preemption notice: save now and train on; when the node goes, the group
        # restarts from this checkpoint (Ray Train's own recommendation). A SIGTERM: save,
        # then stop. The driver's stop (Ctrl-C): save if the run saves at all and the step
        # is not saved yet (save_on_stop), then stop.
        asked = flags.stop and save_on_stop
        save = save_due or preempted or flags.notice or asked
        return cls(
            # A background save is reported as soon as rank 0 has written it, or before the
            # next save starts, at the end, or before a preemption's save.
            land=in_flight and (save or last or flags.save_landed or flags.stop),
            save=save,
            # The last checkpoint, and a preemption's, are written before anything goes on.
            sync=not async_save or last or preempted or flags.notice or flags.stop,
            report=save or last or flags.report_due or flags.stop,
            stop=last or preempted or flags.stop)

    @property
    def n_reports(self) -> int:
        return int(self.land) + int(self.report)
