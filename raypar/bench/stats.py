"""The bench's arithmetic: report rows, medians, and throughput in steady state.

Steady state: the first steps of every run (start-up, allocator warm-up) are left out; the
steps after are split into `repeats` windows of equal size, and each ratio is taken
window by window (window i of raypar against window i of the baseline), which gives the
spread. Raypar's step times are the wall-clock gaps between its metrics rows, so they
include everything its loop does per step (control exchange, reports); steps that
wrote a checkpoint are left out of throughput and measured on their own.
"""
from __future__ import annotations

import statistics
from typing import Any, Optional

import numpy as np


def row(section: str, name: str, value: float, unit: str, samples: Optional[list] = None,
        target: Optional[str] = None, met: Optional[bool] = None, **detail: Any) -> dict:
    """One line of the report: a value (the median of its samples) and its spread."""
    samples = [float(x) for x in samples] if samples else [float(value)]
    return {"section": section, "name": name, "value": float(value), "unit": unit,
            "spread": [min(samples), max(samples)], "samples": samples,
            "target": target, "met": met, "detail": detail}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def windows(step_end: list[float], warmup_s: float, repeats: int, tokens_per_step: int,
            exclude: frozenset = frozenset()) -> list[float]:
    """Tokens/s in `repeats` equal windows of the step intervals that start warmup_s or
    more after the first step ended. step_end[i] is the wall-clock end of step i+1; an
    interval ending at step s is left out when s is in exclude (it held a checkpoint write).

    Why seconds and not steps: as a Ray Train run starts, Ray starts its controller and
    helper actors (new Python processes) beside the workers, and on 2 cores they slow the
    first seconds of training whatever the step time."""
    gaps = [(i + 1, step_end[i] - step_end[i - 1]) for i in range(1, len(step_end))
            if step_end[i - 1] - step_end[0] >= warmup_s]
    gaps = [g for s, g in gaps if s not in exclude]
    if len(gaps) < repeats:
        raise RuntimeError(f"bench: {len(gaps)} steady steps for {repeats} windows; "
                           f"the run was too short")
    size = len(gaps) // repeats
    return [size * tokens_per_step / sum(gaps[i * size:(i + 1) * size]) for i in range(repeats)]


def ratio_row(section: str, name: str, ours: list[float], theirs: list[float],
              target: Optional[float], **detail: Any) -> dict:
    """A row of ours / theirs, window by window; met when the median reaches target."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    value = median(ratios)
    return row(section, name, value, "x", ratios,
               target=None if target is None else f">= {target}",
               met=None if target is None else value >= target,
               ours_tokens_per_s=median(ours), theirs_tokens_per_s=median(theirs), **detail)


def lost_after(step_end: list[float], step: int, after: int = 4) -> float:
    """Seconds the `after` steps following `step` took beyond the run's median step time
    (a gap ten times the median is a restart, not a save, and ends the count)."""
    typical = median(list(np.diff(step_end[:step])))
    lost = 0.0
    for i in range(step, min(step + after, len(step_end))):
        gap = step_end[i] - step_end[i - 1]
        if gap > 10 * typical:
            break
        lost += max(0.0, gap - typical)
    return lost
