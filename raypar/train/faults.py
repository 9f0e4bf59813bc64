"""Fault injection for the recovery tests, both halves: the driver parses the request from
the environment, the worker fires it. Unset in normal use.

    RAYPAR_FAULT='rank=1,step=6,phase=save' raypar train ...   # rank 1 dies once, at step 6
    RAYPAR_STEP_DELAY_S=0.5 raypar train ...                    # every step 0.5 s longer
    RAYPAR_STEP_DELAY_S=0.5 RAYPAR_STEP_DELAY_REPLICA=1 raypar train ...  # replica 1's only
    RAYPAR_STEP_DELAY_S=0.5 RAYPAR_STEP_DELAY_REPLICA=rotate raypar train ...  # one a step, in turn

Phases: 'step' (SIGKILL after the step), 'save' (SIGKILL after writing its checkpoint
shard into storage, before its manifest), 'sigterm' (SIGTERM after the step, as a spot preemption or
a node drain sends it), 'ps' (with dp_mode=ps: rank 0 kills parameter-server shard R, the
`rank` field, after step S, and Ray restarts the actor). A marker file in the run directory
makes a fault fire once per run, restarts included.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from raypar.config import ConfigError
from raypar.train.rundir import RunDir

PHASES = ("step", "save", "sigterm", "ps")


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    phase: str
    marker: str  # absolute path of the run directory's marker file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_fault(run_dir: RunDir) -> Optional[Fault]:
    """RAYPAR_FAULT='rank=R,step=S[,phase=step|save|sigterm]', or None when unset."""
    text = os.environ.get("RAYPAR_FAULT", "").strip()
    if not text:
        return None
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        rank, step, phase = int(fields["rank"]), int(fields["step"]), fields.get("phase", "step")
    except (ValueError, KeyError):
        raise ConfigError(f"RAYPAR_FAULT: expected rank=R,step=S[,phase=step|save|sigterm|ps], "
                          f"got {text!r}") from None
    if phase not in PHASES:
        raise ConfigError(f"RAYPAR_FAULT: phase must be step, save, sigterm or ps, got {phase!r}")
    return Fault(rank, step, phase, str(run_dir.fault_marker.resolve()))


def parse_step_delay() -> float:
    """RAYPAR_STEP_DELAY_S: seconds every worker sleeps after each step; the elastic tests'
    way to make a run of a few dozen steps outlast node changes."""
    text = os.environ.get("RAYPAR_STEP_DELAY_S", "").strip()
    try:
        delay = float(text) if text else 0.0
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= 60:
        raise ConfigError(f"RAYPAR_STEP_DELAY_S: expected seconds in [0, 60], got {text!r}")
    return delay


def parse_step_delay_replica(dp: int) -> Optional[int | str]:
    """RAYPAR_STEP_DELAY_REPLICA: the one data-parallel replica (0 .. dp-1; all of its pp x
    tp ranks) that sleeps RAYPAR_STEP_DELAY_S after each step, a persistent straggler for
    comparing the communication strategies; 'rotate': after step t, replica t mod dp
    sleeps, a straggler that moves (a transient slowdown that strikes each replica in
    turn); unset: every replica sleeps. dp: the run's largest dp."""
    text = os.environ.get("RAYPAR_STEP_DELAY_REPLICA", "").strip()
    if not text:
        return None
    if text == "rotate":
        return text
    try:
        replica = int(text)
    except ValueError:
        replica = -1
    if not 0 <= replica < dp:
        raise ConfigError(f"RAYPAR_STEP_DELAY_REPLICA: expected a replica index in [0, {dp}) "
                          f"(parallel.dp={dp}) or 'rotate', got {text!r}")
    return replica


def delays(config: dict[str, Any], replica: int, step: int, dp: int) -> float:
    """In a worker: the seconds this rank, of data-parallel replica `replica` of dp, sleeps
    after step `step` (config's step_delay_s, for every replica, the one
    step_delay_replica, or replica step mod dp with 'rotate')."""
    delay = config.get("step_delay_s") or 0.0
    only = config.get("step_delay_replica")
    if only == "rotate":
        only = step % dp
    return delay if only is None or only == replica else 0.0


def fire(fault: Optional[dict[str, Any]], rank: int, step: int, phase: str,
         sigterm_seen: Callable[[], bool]) -> None:
    """In a worker: the named rank kills its own process at the named step and phase, once.
    sigterm_seen tells when this process's SIGTERM handler has run."""
    if not fault or fault["step"] != step or fault["phase"] != phase or fault["rank"] != rank:
        return
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{phase} {step}\n".encode())
    os.close(fd)
    if phase != "sigterm":
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGTERM)
    # The handler runs on the process's main thread: wait for it, so the test knows the
    # step at which this rank asks for the preemption checkpoint.
    deadline = time.monotonic() + 10
    while not sigterm_seen() and time.monotonic() < deadline:
        time.sleep(0.01)


def _claim(fault: dict[str, Any], phase: str) -> bool:
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{phase} {fault['step']}\n".encode())
    os.close(fd)
    return True


def fire_ps(fault: Optional[dict[str, Any]], step: int, shards: list[Any]) -> None:
    """In worker rank 0 of a dp_mode=ps run: the 'ps' fault kills parameter-server shard
    `rank` after step `step`, once (Ray restarts the actor, empty; the workers then fail
    on it and restart from the last checkpoint, which resets it)."""
    if not fault or fault["phase"] != "ps" or fault["step"] != step:
        return
    if not 0 <= fault["rank"] < len(shards) or not _claim(fault, "ps"):
        return
    import ray
    ray.kill(shards[fault["rank"]], no_restart=False)
