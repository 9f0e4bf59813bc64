"""Typed records: what a worker reports to the driver, and every row and file the driver
writes from it. One dataclass per record; `to_json` / `from_json` are the only way in and
out of JSON, so a field is named in one place. Rows read back as records, and a record
also reads like the JSON line it is (`row["loss"]`, `"val_loss" in row`).

The merging of reports into metrics.jsonl (one row per step across restarts, redone-step
checks, recovery timing) is `Merger`: pure logic, no Ray, no files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Optional


class Record(Mapping):
    """Base of every record: JSON conversion, and read access by key, as a read-only
    mapping of its set fields (unset optional fields, None, are absent)."""

    _always: ClassVar[tuple[str, ...]] = ()  # fields written even when None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data (an event's kind first); optional fields that are unset
        (None) are left out, except those in _always, written as null."""
        return {k: getattr(self, k) for k in self}

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        """The record of JSON data; keys it does not know are ignored (a newer writer)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __eq__(self, other: object) -> bool:
        """Equal to a record of its type with the same fields, or to its JSON data."""
        if isinstance(other, Record):
            return type(self) is type(other) and self.to_json() == other.to_json()
        if isinstance(other, Mapping):
            return self.to_json() == dict(other)
        return NotImplemented

    __hash__ = None  # mutable, like the dicts it stands for

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        value = getattr(self, key)
        if value is None and key not in self._always:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._names()
                if getattr(self, k) is not None or k in self._always)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _names(self) -> tuple[str, ...]:
        names = tuple(f.name for f in dataclasses.fields(self))
        return ("event", *(n for n in names if n != "event")) if "event" in names else names


# -- metrics.jsonl ------------------------------------------------------------------------------

@dataclass(eq=False)
class StepRow(Record):
    """One optimizer step, as rank 0 measured it (loss: the mean over replicas). Every
    step row raypar writes has every field but the last three; the defaults read rows that
    runs of older versions wrote (a field added later is absent there)."""
    step: int
    loss: float
    time: float = 0.0  # wall clock when the step ended
    lr: Optional[float] = None
    grad_norm: Optional[float] = None
    dp: Optional[int] = None
    first_block: Optional[int] = None
    last_block: Optional[int] = None
    data_s: Optional[float] = None  # seconds the step waited for its input
    tokens_per_s: Optional[float] = None
    tokens: Optional[int] = None
    # Bytes one replica (all of its pp x tp ranks together) handed to the data-parallel
    # collectives in this step (raypar/parallel/comm_count.py): 0 for dp = 1 and for local
    # SGD's steps between syncs; with dp_mode=ps, the bytes replica 0's ranks pushed to and
    # pulled from the parameter server in the step (raypar/parallel/ps.py).
    comm_bytes: Optional[int] = None
    val_loss: Optional[float] = None  # on evaluation steps
    blocks: Optional[list[int]] = None  # every block index, with train.log_blocks
    source_tokens: Optional[dict[str, int]] = None  # a mixture's training tokens per source
    # dp_mode=ps: updates this step's gradient is behind (parallel.ps.staleness).
    staleness: Optional[int] = None


@dataclass(eq=False)
class CheckpointEvent(Record):
    """A checkpoint save: how long it took to write, and how long it held training up."""
    step: int
    mode: str  # "sync" | "async"
    stall_s: float
    save_s: Optional[float] = None  # None until a background save has landed
    event: str = "checkpoint"


@dataclass(eq=False)
class LayoutEvent(Record):
    """A worker group that trains on another layout than the one before."""
    step: int
    time: float
    workers: int
    dp: int
    sitting_out: int
    layout: dict[str, Any]
    event: str = "layout"


@dataclass(eq=False)
class RecoveryEvent(Record):
    """Where training resumed after a failure, a resize or --resume, and what it cost."""
    step: int
    cause: str  # "failure" | "preemption" | "resize" | "resume"
    checkpoint: Optional[str]
    error: str = ""
    skipped: list[list[str]] = field(default_factory=list)
    load_s: Optional[float] = None
    same_layout: bool = True
    steps_redone: int = 0
    mismatched_steps: list[int] = field(default_factory=list)
    recovery_s: Optional[float] = None
    event: str = "recovery"
    _always: ClassVar[tuple[str, ...]] = ("checkpoint", "load_s")


EVENTS: dict[str, type] = {"checkpoint": CheckpointEvent, "layout": LayoutEvent,
                           "recovery": RecoveryEvent}


def parse_row(data: dict[str, Any]) -> Optional[Record]:
    """A metrics.jsonl line's data as its record; None for an event kind this version does
    not know (a newer version wrote it)."""
    kind = data.get("event")
    if kind is None:
        return StepRow.from_json(data)
    return EVENTS[kind].from_json(data) if kind in EVENTS else None


# -- what a worker reports ----------------------------------------------------------------------

@dataclass(eq=False)
class StartRecord(Record):
    """Where a worker group starts: sent with its first report."""
    checkpoint: Optional[str]
    from_step: int
    skipped: list[list[str]]
    started: float
    loaded: float
    load_s: float
    layout: dict[str, Any]
    workers: int
    sitting_out: int
    saved_layout: Optional[dict[str, Any]] = None
    _always: ClassVar[tuple[str, ...]] = ("checkpoint",)


@dataclass(eq=False)
class RankInfo(Record):
    """One rank's placement, stages and memory (ranks.json holds one per training rank)."""
    rank: int
    dp: int
    pp: int
    tp: int
    stages: list[int]
    layers: list[list[int]]
    node: int
    node_ip: str
    node_id: str
    pid: int
    block_param_bytes: int
    param_bytes: Optional[int] = None
    grad_bytes: Optional[int] = None
    optim_bytes: Optional[int] = None
    activation_peak_bytes: Optional[int] = None
    cuda_max_allocated_bytes: Optional[int] = None
    rss_init_bytes: Optional[int] = None  # the process's peak resident memory once built
    rss_peak_bytes: Optional[int] = None  # ... and after its first step
    rss_end_bytes: Optional[int] = None  # ... and after the run's last step
    rss_anon_bytes: Optional[int] = None  # its own (anonymous) resident memory after its
    # first step: without memory-mapped files (the dataset shards)
    rss_base_bytes: Optional[int] = None  # ... before its model was built (its own baseline)
    rss_anon_start_bytes: Optional[int] = None  # its anonymous RSS as the train loop began
    # (before the data, the model or a checkpoint were opened)
    load_s: Optional[float] = None  # this rank's checkpoint load at the group's start
    load_bytes: Optional[int] = None  # ... and the bytes it read from storage
    # In the run's last rank_info: how many times the ranks of this worker group (the
    # count starts again after a restart or a resume) met over the replicas (agreed on
    # rows and flags): every step, or local SGD's syncs, a stale parameter server's window
    # ends, and the saves (RankTrainer.meets).
    meetings: Optional[int] = None


# The step whose pipeline timeline is recorded: after the first, which pays one-off costs.
TIMELINE_STEP = 2


@dataclass(eq=False)
class Timeline(Record):
    """One pipeline step of one rank: forward/backward spans per stage and micro-batch."""
    events: list[dict[str, Any]]
    start: float
    end: float


@dataclass(eq=False)
class WorkerReport(Record):
    """What a rank sends with ray.train.report. Every rank reports together (the call is a
    barrier); the driver reads rank 0's rows and every rank's rank_info and timeline."""
    rows: list[StepRow] = field(default_factory=list)
    start: Optional[StartRecord] = None
    rank_info: Optional[RankInfo] = None
    timeline: Optional[Timeline] = None
    checkpoints: list[CheckpointEvent] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.rows or self.start or self.rank_info or self.timeline
                    or self.checkpoints)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": [r.to_json() for r in self.rows]}
        for key in ("start", "rank_info", "timeline"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_json()
        if self.checkpoints:
            out["checkpoints"] = [c.to_json() for c in self.checkpoints]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WorkerReport":
        def one(key, typ):
            return typ.from_json(data[key]) if data.get(key) is not None else None
        return cls(rows=[StepRow.from_json(r) for r in data.get("rows") or []],
                   start=one("start", StartRecord), rank_info=one("rank_info", RankInfo),
                   timeline=one("timeline", Timeline),
                   checkpoints=[CheckpointEvent.from_json(c)
                                for c in data.get("checkpoints") or []])


# -- the run's own files ------------------------------------------------------------------------

@dataclass(eq=False)
class Status(Record):
    """status.json: "running", "failed" (with the error), "stopped" (by a signal) or "finished"."""
    state: str
    time: float
    error: Optional[str] = None


@dataclass(eq=False)
class Summary(Record):
    """summary.json (a finished run), and what `run` returns."""
    steps: int
    final_loss: Optional[float]
    final_val_loss: Optional[float]
    first_val_loss: Optional[float]
    tokens: int
    seconds: float
    run_dir: str
    mlflow_run_id: Optional[str]
    mlflow_uri: Optional[str]
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    layouts: list[dict[str, Any]] = field(default_factory=list)
    ranks: Optional[list[dict[str, Any]]] = None
    bubble_measured: Optional[float] = None
    bubble_theory: Optional[float] = None
    startup: Optional[dict[str, float]] = None  # seconds per phase before the first step
    _always: ClassVar[tuple[str, ...]] = ("final_loss", "final_val_loss", "first_val_loss",
                                          "mlflow_run_id", "mlflow_uri")


# -- merging reports into metrics.jsonl ---------------------------------------------------------

class Merger:
    """Turns the workers' reports into metrics.jsonl records, across restarts.

    After a restart the workers redo the steps since their checkpoint. Those rows are
    already recorded, so they are not written again (each step has exactly one row);
    instead one recovery event says where training resumed from, how many steps were
    redone, how long recovery took (from the failure, or from the start of a `--resume`
    driver, to the first step finished after it), and whether every redone step
    reproduced its recorded loss. A worker group on a new layout gets a layout event."""

    def __init__(self, started: float, elastic: bool, recorded: list[StepRow]):
        self.started = started
        self.elastic = elastic
        self.losses = {r.step: r.loss for r in recorded}
        self.failed_at: Optional[float] = None
        self.failure = ""
        self.recovery: Optional[RecoveryEvent] = None
        self.since = 0.0  # when the recovery in progress began
        self.last_row_time: Optional[float] = None
        self.layout: Optional[tuple[int, int]] = None  # (workers, dp) of the current group
        self.reports = 0

    def failed(self, at: float, message: str) -> None:
        """The worker group failed (first failure of a burst counts)."""
        if self.failed_at is None:
            self.failed_at = at
            self.failure = (message.strip().splitlines() or ["?"])[0][:300]

    def merge(self, report: WorkerReport) -> list[Record]:
        """Rank 0's report as the records to append, in order."""
        first = self.reports == 0
        self.reports += 1
        out: list[Record] = []
        if report.start is not None:
            out += self._layout_event(report.start)
            if self._is_restart(report.start, first):
                out += self._begin_recovery(report.start, first)
        out += report.checkpoints
        for row in report.rows:
            out += self._row(row)
        return out

    def _is_restart(self, start: StartRecord, first: bool) -> bool:
        # A restart after a failure or a resize, or the first start of a --resume driver:
        # it had recorded steps, or there was a checkpoint to resume from (even if a driver
        # killed before writing its rows left none).
        return self.failed_at is not None or not first or bool(
            self.losses or start.checkpoint is not None or start.skipped)

    def _layout_event(self, start: StartRecord) -> list[Record]:
        layout = (start.workers, start.layout["dp"])
        changed, self.layout = layout != self.layout, layout
        if not changed or not (self.elastic or start.sitting_out):
            return []
        return [LayoutEvent(step=start.from_step, time=start.loaded, workers=layout[0],
                            dp=layout[1], sitting_out=start.sitting_out, layout=start.layout)]

    def _begin_recovery(self, start: StartRecord, first: bool) -> list[Record]:
        out: list[Record] = []
        if self.recovery is not None:  # failed again before any new step
            out.append(self.recovery)
        if self.failed_at is not None:
            preempted = "received SIGTERM" in self.failure or self.failure.startswith(
                "node preempted")
            cause = "preemption" if preempted else "failure"
            since = self.failed_at
        elif first:
            cause, since = "resume", self.started
        else:  # Ray Train resized the worker group: from the last step before it
            cause, since = "resize", self.last_row_time or self.started
        self.recovery = RecoveryEvent(
            step=start.from_step, cause=cause, error=self.failure, checkpoint=start.checkpoint,
            skipped=start.skipped, load_s=start.load_s,
            # Another layout adds in another order: redone losses differ in the last bits.
            same_layout=start.saved_layout in (None, start.layout))
        self.since = since
        self.failed_at, self.failure = None, ""
        return out

    def _row(self, row: StepRow) -> list[Record]:
        rec = self.recovery
        # Rows from before the failure (a checkpoint's own report, sent again) are not
        # "fresh"; the first fresh one is the first step finished after recovery.
        fresh = rec is not None and row.time > self.since
        if fresh and rec.recovery_s is None:
            rec.recovery_s = row.time - self.since
        if row.step in self.losses:  # redone after a restart: recorded already
            if fresh:
                rec.steps_redone += 1
                if rec.same_layout and row.loss != self.losses[row.step]:
                    rec.mismatched_steps.append(row.step)
            return []
        out: list[Record] = []
        if fresh:
            out.append(rec)
            self.recovery = None
        self.losses[row.step] = row.loss
        self.last_row_time = row.time
        out.append(row)
        return out
