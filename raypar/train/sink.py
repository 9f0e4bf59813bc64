"""The Ray Train callback that writes a run's records, in a module of its own: Ray Train's
controller (a process of its own) imports it to unpickle the callback, and importing the
driver there would cost the controller's start-up seconds of imports it never uses
(MLflow, the data preparation, plotting)."""
from __future__ import annotations

import time
from typing import Optional

import ray.train

from raypar.train.records import Merger, WorkerReport
from raypar.train.rundir import RunDir


# How a worker death on a node Ray drained for preemption (a spot reclaim through the
# autoscaler, `ray drain-node --reason=DRAIN_NODE_REASON_PREEMPTION`) starts its message.
PREEMPTED = "node preempted"


def _preempted(error: BaseException) -> bool:
    """Whether Ray says this worker died with a preempted node: the RayActorError (inside
    Ray Train's health-check error) carries the flag Ray Train's failure policy reads."""
    inner = getattr(error, "health_check_failure", None) or error
    return bool(getattr(inner, "preempted", False))


class MetricsSink(ray.train.UserCallback):
    """Runs in the Ray Train controller, which Ray pins to the driver's node: merges rank
    0's every report into metrics.jsonl, the run's record of truth (records.Merger decides
    what is written), and keeps what every rank reports once (placement and memory in
    ranks.json, the pipeline timeline in timeline.json)."""

    def __init__(self, run_dir: str, started: float, elastic: bool = False):
        self.rd = RunDir(run_dir)
        self.started, self.elastic = started, elastic
        self.merger: Optional[Merger] = None
        self.failure: Optional[tuple[float, str]] = None

    def after_exception(self, run_context, worker_exceptions):
        first = next(iter(worker_exceptions.values()), None)
        message = str(first).strip() or type(first).__name__
        if any(_preempted(e) for e in worker_exceptions.values()):
            # Ray Train charges it to FailureConfig.max_preemption_failures, not max_failures.
            message = f"{PREEMPTED}: {message}"
        if self.merger is None:
            self.failure = self.failure or (time.time(), message)
        else:
            self.merger.failed(time.time(), message)

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        if self.merger is None:  # the first report this driver sees
            self.rd.drop_torn_line()
            self.merger = Merger(self.started, self.elastic, self.rd.read_metrics()[0])
            if self.failure is not None:
                self.merger.failed(*self.failure)
        reports = [WorkerReport.from_json(m) for m in metrics]
        # (ranks that sit out report nothing)
        ranks = [r.rank_info for r in reports if r.rank_info is not None]
        if ranks:
            self.rd.write_ranks(ranks)
        timelines = [r.timeline for r in reports if r.timeline is not None]
        if timelines:
            self.rd.write_timelines(timelines)
        self.rd.append_metrics(self.merger.merge(reports[0]))
