"""Pipeline timelines: the clock the stages record with, bubble figures (in theory and
as measured from the recorded F / B / W events) and a plot of one step.

An event is {"stage", "microbatch", "kind" ("F", "B" or "W"), "start", "end"}, times in
seconds on the `now()` clock; a rank's timeline of one step is {"events", "start", "end"}.
The same step is written as a PNG (`plot_timeline`) and as a Chrome trace (`chrome_trace`,
for Perfetto and chrome://tracing).
Nothing here imports torch.
"""
from __future__ import annotations

import time
import json
from pathlib import Path
from typing import Iterable, Optional

from raypar.parallel import schedules

_ANCHOR = time.time() - time.perf_counter()


def now() -> float:
    """perf_counter's resolution on the wall clock's origin, so the timelines of
    processes on one host line up (across hosts only as well as their clocks do)."""
    return _ANCHOR + time.perf_counter()


def theoretical_bubble(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a rank's step for p ranks, m micro-batches, v stages per rank.

    gpipe, 1f1b:       (p-1) / (m+p-1)          (one stage per rank: v does not count)
    interleaved_1f1b:  (p-1) / (v*m+p-1)        (Narayanan et al. 2021)
    interleaved_zb:    (p-1) / (3*v*m+p-1)      (ZB-H1, Qi et al. 2023)
    zbv, dualpipev:    0

    (The factor before v*m is the table's `bubble_fill`, raypar/parallel/schedules.py.)
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
    s = schedules.get(schedule)
    if s.bubble_fill is None:
        return 0.0
    if s.virtual == schedules.ONE:
        v = 1
    return (p - 1) / (s.bubble_fill * v * m + p - 1)


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


def plot_timeline(events_per_rank: dict[int, list[dict]], path,
                  labels: Optional[dict[int, str]] = None, title: str = "") -> None:
    """Write a PNG: one row per global rank (labels[rank] names it, e.g. its (dp, pp, tp)
    coordinates and stages), a bar per F / B / W event (blue / orange / green, darker for
    later micro-batches), labelled with its micro-batch index; title above."""
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
    ax.set_yticks(range(len(ranks)), [(labels or {}).get(r, f"rank {r}") for r in ranks],
                  fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first event")
    ax.legend(handles=[Patch(color=cmaps[k](0.7), label=k) for k in "FBW"], loc="upper left",
              bbox_to_anchor=(1.0, 1.0),
              fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def chrome_trace(timelines: list[dict], labels: Optional[dict[int, str]] = None,
                 title: str = "") -> dict:
    """One pipeline step as a Chrome trace (the Trace Event Format that Perfetto's UI,
    chrome://tracing and speedscope read): timelines[rank] is that rank's {"events",
    "start", "end"}. Each rank is a process (pid = rank, named "rank N", sorted by rank)
    with one thread whose name is labels[rank] (its (dp, pp, tp) and stages); on it a
    "step" slice spans the rank's step and holds one complete ("X") slice per F / B / W
    event, named e.g. "F3" (micro-batch 3) with its stage and micro-batch as args. Times
    are microseconds since the step's earliest start; `otherData` keeps that origin on
    the wall clock, and the title.

    Written by hand (the format is a few documented JSON fields): torch.profiler writes
    this format only for what it profiles itself, and the perfetto package writes
    protobuf traces through a trace processor binary it downloads."""
    if not timelines:
        raise ValueError("no timelines")
    t0 = min(t["start"] for t in timelines)

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 3)

    events: list[dict] = []
    for rank, tl in enumerate(timelines):
        label = (labels or {}).get(rank, f"rank {rank}")
        events += [
            {"ph": "M", "name": "process_name", "pid": rank, "tid": 0,
             "args": {"name": f"rank {rank}"}},
            {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0,
             "args": {"sort_index": rank}},
            {"ph": "M", "name": "thread_name", "pid": rank, "tid": 0, "args": {"name": label}},
        ]
        # Within a thread, "X" slices nest by time; the enclosing step goes first so that a
        # reader meeting equal timestamps still sees it as the parent.
        events.append({"ph": "X", "name": "step", "cat": "step", "pid": rank, "tid": 0,
                       "ts": us(tl["start"]), "dur": us(tl["end"]) - us(tl["start"])})
        for e in sorted(tl["events"], key=lambda e: (e["start"], e["end"])):
            events.append({"ph": "X", "name": f"{e['kind']}{e['microbatch']}",
                           "cat": e["kind"], "pid": rank, "tid": 0, "ts": us(e["start"]),
                           "dur": max(0.0, us(e["end"]) - us(e["start"])),
                           "args": {"stage": e["stage"], "microbatch": e["microbatch"]}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"title": title, "origin_unix_s": t0}}


def write_chrome_trace(timelines: list[dict], path, labels: Optional[dict[int, str]] = None,
                       title: str = "") -> None:
    """`chrome_trace` into path (timeline.trace.json in a run directory)."""
    Path(path).write_text(json.dumps(chrome_trace(timelines, labels, title)))
