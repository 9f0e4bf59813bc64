"""What the driver tells the user about a run as it goes and when it ends: the start-up
phases and the progress bar fed from metrics.jsonl (Follower), the log line of each event
in it, the summary, and the per-rank and pipeline report (into the summary, MLflow and
pipeline_timeline.png, timeline.trace.json).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Optional

from tqdm import tqdm

from raypar.config import RunSpec
from raypar.parallel.timeline import (pipeline_bubble, plot_timeline, theoretical_bubble,
                                      write_chrome_trace)
from raypar.plan import tp_groups_across_nodes
from raypar.train import checkpoint as ckpt
from raypar.train import tracking
from raypar.train.records import (TIMELINE_STEP, CheckpointEvent, LayoutEvent, Record,
                                  RecoveryEvent, StepRow, Summary)
from raypar.train.rundir import RunDir

if TYPE_CHECKING:
    from raypar.train.startup import Startup
    from raypar.train.stopping import SignalGuard

log = logging.getLogger("raypar")

MEMORY_KEYS = ("param_bytes", "grad_bytes", "optim_bytes", "activation_peak_bytes",
               "block_param_bytes", "rss_init_bytes", "rss_peak_bytes", "rss_end_bytes",
               "rss_base_bytes")


def announce(spec: RunSpec, event: Record, tracker: Optional[tracking.Tracker]) -> None:
    """One event of metrics.jsonl, as the log line (and MLflow metrics) the user sees."""
    if isinstance(event, LayoutEvent):
        _log_layout(spec, event)
    elif isinstance(event, CheckpointEvent):
        log.info("checkpoint %s (%s): written in %.2f s, training held up %.2f s",
                 ckpt.dir_name(event.step), event.mode, event.save_s, event.stall_s)
        if tracker:
            tracker.log_metrics({"checkpoint_save_s": event.save_s,
                                 "checkpoint_stall_s": event.stall_s}, step=event.step)
    elif isinstance(event, RecoveryEvent):
        _log_recovery(event)
        if tracker:
            recovery_s = event.recovery_s if event.recovery_s is not None else float("nan")
            tracker.log_metrics({"recovery_s": recovery_s, "steps_redone": event.steps_redone},
                                step=event.step)


def _log_layout(spec: RunSpec, event: LayoutEvent) -> None:
    p = spec.parallel
    line = (f"from step {event.step}: {event.workers} workers, training on dp="
            f"{event.dp} x pp={p.pp} x tp={p.tp}")
    if not event.sitting_out:
        log.info(line)
        return
    r, workers = spec.replica_size, event.workers
    reasons = []
    if workers // r > event.dp:
        reasons.append(f"train.global_batch={spec.train.global_batch} does not divide into "
                       f"{workers // r} replicas x train.micro_batch={spec.train.micro_batch}")
    if workers % r:
        reasons.append(f"{workers % r} workers do not make a whole replica of pp*tp={r}")
    log.warning("%s; %d sit out (%s)", line, event.sitting_out, "; ".join(reasons))


def _log_recovery(event: RecoveryEvent) -> None:
    for path, reason in event.skipped or []:
        log.warning("checkpoint %s skipped: %s", path, reason)
    where = (f"checkpoint {event.checkpoint}" if event.checkpoint
             else "the start (no valid checkpoint)")
    cause = {"resume": "--resume", "resize": "a resize of the worker group"}.get(
        event.cause, f"{event.cause} ({event.error})")
    recovery_s = event.recovery_s if event.recovery_s is not None else -1
    log.warning("recovered from %s: resumed at step %d from %s, %d steps redone, %.1f s",
                cause, event.step, where, event.steps_redone, recovery_s)
    if event.mismatched_steps:
        log.warning("redone steps %s did not reproduce their recorded loss",
                    event.mismatched_steps)


def summarize(rows: list[StepRow], events: list[Record], rd: RunDir,
              tracker: Optional[tracking.Tracker], seconds: float) -> Summary:
    val = [r.val_loss for r in rows if r.val_loss is not None]
    last = rows[-1] if rows else None
    return Summary(
        steps=last.step if last else 0, final_loss=last.loss if last else None,
        final_val_loss=val[-1] if val else None, first_val_loss=val[0] if val else None,
        tokens=(last.tokens or 0) if last else 0, seconds=round(seconds, 1), run_dir=str(rd.path),
        mlflow_run_id=tracker.run_id if tracker else None,
        mlflow_uri=tracker.uri if tracker else None,
        recoveries=[e.to_json() for e in events if isinstance(e, RecoveryEvent)],
        layouts=[e.to_json() for e in events if isinstance(e, LayoutEvent)])


def layout_report(spec: RunSpec, rd: RunDir, summary: Summary,
                  tracker: Optional[tracking.Tracker]) -> None:
    """Per-rank memory and the pipeline timeline: into the summary, MLflow, a PNG and a
    Chrome trace."""
    ranks = rd.read_ranks()
    if ranks is not None:
        summary.ranks = [r.to_json() for r in ranks]
        if tracker:
            tracker.log_artifact(rd.ranks)
            tracker.log_metrics({f"memory.rank{r.rank}.{k}": float(r[k])
                                 for r in ranks for k in MEMORY_KEYS if k in r})
    timelines = rd.read_timelines()
    if timelines is None:
        return
    p = spec.parallel
    summary.bubble_measured = pipeline_bubble([t.to_json() for t in timelines])
    dp = 1 + max((r.dp for r in ranks or []), default=p.dp - 1)
    summary.bubble_theory = theoretical_bubble(p.schedule, p.pp, spec.with_dp(dp).grad_accum,
                                               p.virtual_stages)
    m = spec.with_dp(dp).grad_accum
    # ranks.json describes the last worker group, the timeline its step 2: the labels go
    # with the rows only when both have the same ranks (an elastic run may have resized).
    labels = {r.rank: f"rank {r.rank}: dp {r.dp}, pp {r.pp}, tp {r.tp}, stage"
                      f"{'s' if len(r.stages) > 1 else ''} {', '.join(map(str, r.stages))}"
              for r in ranks or []} if len(ranks or []) == len(timelines) else {}
    v = f", {p.virtual_stages} stages per rank" if p.virtual_stages > 1 else ""
    title = (f"{p.schedule}, pp={p.pp}{v}, {m} micro-batches per step, step "
             f"{TIMELINE_STEP}: bubble {summary.bubble_measured:.0%} measured, "
             f"{summary.bubble_theory:.0%} in theory")
    plot_timeline({r: t.events for r, t in enumerate(timelines)}, rd.timeline_png, labels,
                  title)
    write_chrome_trace([t.to_json() for t in timelines], rd.timeline_trace, labels, title)
    if tracker:
        tracker.log_metrics({"bubble_measured": summary.bubble_measured,
                             "bubble_theory": summary.bubble_theory})
        tracker.log_artifact(rd.timeline_png)
        tracker.log_artifact(rd.timeline_trace)


def finish_tracking(tracker: tracking.Tracker, rd: RunDir, rows: list[StepRow],
                    status: str) -> None:
    """The loss plot, and the MLflow run ended as status (FINISHED, FAILED, KILLED)."""
    if rows:
        tracking.plot_loss(rows, rd.loss_png)
        tracker.log_artifact(rd.loss_png)
    tracker.finish(status)


class Follower:
    """While fit() runs on its thread, this one shows the start-up phases as the workers
    mark them (startup.py), then tails metrics.jsonl into the progress bar and MLflow, and
    keeps the new step rows and events."""

    def __init__(self, rd: RunDir, spec: RunSpec, tracker: Optional[tracking.Tracker],
                 progress: bool, done: int, startup: Optional["Startup"] = None,
                 offset: Optional[int] = None):
        self.rd, self.spec, self.tracker = rd, spec, tracker
        # Where the new rows start: taken by the caller before the workers started.
        self.offset = rd.metrics_size() if offset is None else offset
        self.rows: list[StepRow] = []
        self.events: list[Record] = []
        self.progress, self.done = progress, done
        self.startup = startup
        self.started_up = startup is None
        # Made when the first steps arrive: its rate (and ETA) then counts steps only, not
        # the start-up before them.
        self.bar: Optional[tqdm] = None
        self.placement: Optional[int] = None  # ranks.json's mtime when last checked
        self.warned: set[str] = set()  # placement warnings already given

    def follow(self, thread: threading.Thread, guard: "SignalGuard") -> None:
        """Until the started fit() thread ends."""
        while True:
            alive = thread.is_alive()
            self.poll()
            if not alive:
                return
            guard.check(self.until_meeting_s())
            thread.join(timeout=0.5)

    def until_meeting_s(self) -> float:
        """Twice the time the workers may train before they next meet (and see a stop):
        meet_every - 1 steps of the slowest of the recent ones (0 when they meet at every
        step or no two steps have arrived yet)."""
        every = self.spec.parallel.meet_every
        recent = self.rows[-64:]
        if every == 1 or len(recent) < 2:
            return 0.0
        slowest = max(b.time - a.time for a, b in zip(recent, recent[1:]))
        return 2 * (every - 1) * max(slowest, 0.0)

    def poll(self) -> None:
        if not self.started_up:
            self.started_up = self.startup.poll()
        if self.spec.parallel.tp > 1:
            self._check_placement()
        new, self.offset = self.rd.follow_metrics(self.offset)
        for event in (r for r in new if not isinstance(r, StepRow)):
            self.events.append(event)
            announce(self.spec, event, self.tracker)
        new = [r for r in new if isinstance(r, StepRow)]
        if new:
            self.rows.extend(new)
            if self.tracker:
                self.tracker.log_rows(new)
            if self.bar is None:
                self.bar = tqdm(total=self.spec.train.steps, initial=self.done + len(new),
                                desc="train", unit="step", disable=not self.progress,
                                dynamic_ncols=True)
            else:
                self.bar.update(len(new))
            self.bar.set_postfix(loss=f"{new[-1].loss:.4f}",
                                 tok_s=f"{new[-1].tokens_per_s:.0f}")

    def _check_placement(self) -> None:
        """Warn (run.log and the console) about each tensor-parallel group that Ray placed
        across nodes, once per placement (each worker group writes ranks.json anew)."""
        try:
            stamp = self.rd.ranks.stat().st_mtime_ns
        except OSError:
            return
        if stamp == self.placement:
            return
        self.placement = stamp
        for line in tp_groups_across_nodes((r.rank, r.dp, r.pp, r.node_ip)
                                           for r in self.rd.read_ranks() or []):
            if line not in self.warned:
                self.warned.add(line)
                log.warning(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
