"""The phases of a run before its first step, shown as they end and kept as a profile.

The driver times its own phases (checks, Ray, data, tracking); rank 0 of the first worker
group marks its own (workers placed and started, model built, checkpoint loaded, first
step) on a StartupBoard, a GCS key per phase that the driver polls while it waits, so the
user sees each phase end even though a worker's first report comes later:

    raypar: ray: started a local Ray with 2 CPUs, 0 GPUs, 1 node(s) (3.1 s)
    raypar: placement: Ray Train's controller and 4 worker processes started (6.0 s)
    raypar: workers: 4 on 1 node(s): imports, process groups and mesh up (4.9 s)
    ...
    raypar: first step after 27.4 s from the command

The profile (seconds per phase, and the total) goes to summary.json ("startup"), run.log
and MLflow (startup_<phase>_s).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from ray.experimental import internal_kv

log = logging.getLogger("raypar")

# The worker-side phases, in the order rank 0 marks them ("checkpoint" only on a resume,
# "placement" where /proc gives the process's start).
WORKER_PHASES = ("placement", "workers", "model", "checkpoint", "first step")
OPTIONAL_PHASES = ("placement", "checkpoint")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def process_started() -> Optional[float]:
    """When this process started (time.time() scale, to about 10 ms), from /proc: now less
    its age (system uptime less the uptime it started at); None where there is no /proc
    (then the phase it ends is folded into the next one)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupBoard:
    """Rank 0's marks for the driver: one GCS key per phase, (time, detail) as JSON.
    (A GCS key rather than a report: Ray Train takes a worker's first report only after
    the first step, and rather than an actor: one more process would start slower than
    the phases it is meant to show.)"""
    NAMESPACE = "raypar"

    def __init__(self, key: Optional[str] = None):
        self.key = key or f"startup-{uuid.uuid4().hex}"

    def mark(self, phase: str, detail: str = "", at: Optional[float] = None) -> None:
        """Worker side: phase ended now (or at `at`). Never fails the run (the board is only
        a view)."""
        if at is None and phase == "placement":
            return  # no process start time: the next phase takes its seconds
        try:
            internal_kv._internal_kv_put(f"{self.key}/{phase}",
                                         json.dumps([time.time() if at is None else at,
                                                     detail]),
                                         namespace=self.NAMESPACE)
        except Exception:  # noqa: BLE001 - no GCS, no view; training goes on
            pass

    def read(self, phase: str) -> Optional[tuple[float, str]]:
        """Driver side: (time, detail) of a marked phase, else None."""
        try:
            raw = internal_kv._internal_kv_get(f"{self.key}/{phase}", namespace=self.NAMESPACE)
        except Exception:  # noqa: BLE001 - Ray going away: nothing more to show
            return None
        if raw is None:
            return None
        when, detail = json.loads(raw)
        return float(when), str(detail)

    def clear(self) -> None:
        for phase in WORKER_PHASES:
            try:
                internal_kv._internal_kv_del(f"{self.key}/{phase}", namespace=self.NAMESPACE)
            except Exception:  # noqa: BLE001 - Ray is gone: so are the keys
                pass


class Startup:
    """The driver's start-up profile: phases in order, each shown with its seconds when it
    ends. `started` is when the command began (time.time())."""

    def __init__(self, started: float, say: Callable[[str], None] = _stderr,
                 held: bool = True):
        self.started = self.last = started
        self.say = say
        self.phases: dict[str, float] = {}
        self.lines: list[str] = []
        self.first_step: Optional[float] = None
        self.board = StartupBoard()
        self._pending = list(WORKER_PHASES)
        # Held until the request has passed its checks: a refused run prints its one line
        # and nothing else.
        self._held: Optional[list[str]] = [] if held else None

    def release(self) -> None:
        """Show the phases held so far; from now on each shows as it ends."""
        held, self._held = self._held or [], None
        for line in held:
            self.say(line)

    def done(self, phase: str, detail: str = "", at: Optional[float] = None) -> None:
        """Phase ended (now, or at `at`): shown, logged, and its seconds kept."""
        at = time.time() if at is None else at
        seconds = max(0.0, at - self.last)
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 3)
        self.last = max(self.last, at)
        line = f"{phase}: {detail} ({seconds:.1f} s)" if detail else f"{phase} ({seconds:.1f} s)"
        self.lines.append(line)
        log.info("start-up: %s", line)
        if self._held is not None:
            self._held.append(f"raypar: {line}")
        else:
            self.say(f"raypar: {line}")

    def note(self, line: str) -> None:
        """A line that belongs with the phases (shown and logged like them, held with
        them), without a phase's seconds."""
        log.info("start-up: %s", line)
        if self._held is not None:
            self._held.append(f"raypar: {line}")
        else:
            self.say(f"raypar: {line}")

    def poll(self) -> bool:
        """Show the worker phases rank 0 has marked since the last poll, in order; True
        once the first step is marked (then there is nothing more to poll)."""
        while self._pending:
            phase = self._pending[0]
            mark = self.board.read(phase)
            if mark is None:
                # A fresh start loads no checkpoint; without /proc there is no placement
                # mark: a later phase's mark says it will not come.
                if phase in OPTIONAL_PHASES and any(
                        self.board.read(later) is not None for later in self._pending[1:]):
                    self._pending.pop(0)
                    continue
                return False
            self._pending.pop(0)
            when, detail = mark
            if phase == "first step":
                self.first_step = when
                self.phases["total"] = round(when - self.started, 3)
                self.done(phase, detail, at=when)
                self.say(f"raypar: first step after {when - self.started:.1f} s from the "
                         f"command")
            else:
                self.done(phase, detail, at=when)
        return True

    def profile(self) -> dict[str, float]:
        """{phase: seconds, ..., 'total': command to first step}: for summary.json."""
        return dict(self.phases)

    def metrics(self) -> dict[str, float]:
        """The profile as MLflow metrics: startup_<phase>_s."""
        return {f"startup_{k.replace(' ', '_')}_s": v for k, v in self.phases.items()}
