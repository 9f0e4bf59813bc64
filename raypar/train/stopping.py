"""Ctrl-C (SIGINT) and SIGTERM to the driver: the run stops within seconds, every time,
and stays resumable.

Before the workers start, a signal stops the driver at once (`Stopped` is raised where it
is). Once they train, the first signal asks them to stop: `StopFlag` is a key in Ray's
GCS key-value store that rank 0 looks up at most every half second; every rank learns of
it in the next flag exchange (after every step; with local SGD or a stale parameter
server, at the replicas' next meeting, up to meet_every - 1 steps later), saves
a checkpoint (when checkpoint.every > 0 and a step finished since the last save) and
returns. If they have not stopped after STOP_GRACE_S (plus, where the replicas meet only
every few steps, twice that many of the slowest recent steps), or at a second signal, the driver
stops waiting and ends its Ray connection, which ends the job's actors. Either way the run
is recorded as stopped (status.json, MLflow KILLED) and the command exits 128 + the signal
number (130, 143); `raypar train --resume` continues from the checkpoint.

Why our own handler: Python's default SIGINT raises KeyboardInterrupt wherever the main
thread is (and leaves the training thread running), and ray.init installs a SIGTERM
handler that exits the interpreter under the training thread's feet. Why the GCS
key-value store (`ray.experimental.internal_kv`, which Ray's own libraries use for such
flags) and not a Ray actor: an actor is one more Python process per run, and it starts
only once the cluster has a worker process free for it, seconds after it is asked for on
a busy laptop, so the first stop request waited for it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any, Optional

import ray
from ray.experimental import internal_kv

STOP_GRACE_S = 30.0
_POLL_S = 0.5
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised on the driver's main thread: stop now. A KeyboardInterrupt, so that no
    `except Exception` on the way swallows it, and the CLI answers it as one."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(RuntimeError):
    """The run stopped on a signal; the command exits 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopFlag:
    """The driver's request to stop, where every worker can see it (a GCS key of this run)."""
    NAMESPACE = "raypar"

    def __init__(self):
        self.key = f"stop-{uuid.uuid4().hex}"

    def set(self, signum: int) -> None:
        internal_kv._internal_kv_put(self.key, str(signum), namespace=self.NAMESPACE)

    def is_set(self) -> bool:
        return internal_kv._internal_kv_exists(self.key, namespace=self.NAMESPACE)

    def fail(self, message: str) -> None:
        """Worker side: the run cannot go on for a reason that is the user's to mend (no
        checkpoint of a --resume loads). The workers then end without an error, so that
        Ray Train does not start them again for checkpoint.max_failures attempts that
        would each find the same; the driver reads the message (failure()) and says it."""
        internal_kv._internal_kv_put(f"{self.key}-failed", message, namespace=self.NAMESPACE)

    def failure(self) -> Optional[str]:
        try:
            raw = internal_kv._internal_kv_get(f"{self.key}-failed", namespace=self.NAMESPACE)
        except Exception:  # noqa: BLE001 - Ray is gone: nothing was written, or it is lost
            return None
        return raw.decode() if raw is not None else None

    def clear(self) -> None:
        try:
            for key in (self.key, f"{self.key}-failed"):
                internal_kv._internal_kv_del(key, namespace=self.NAMESPACE)
        except Exception:  # noqa: BLE001 - Ray is gone: so is the key
            pass


class StopPoll:
    """Rank 0's view of the StopFlag, looked up at most every _POLL_S (a GCS round trip of
    about a millisecond), so a step costs nothing while no stop is asked for."""

    def __init__(self, flag: Optional[StopFlag]):
        self.flag = flag
        self.asked = 0.0
        self.requested = False

    def __call__(self) -> bool:
        if self.flag is None or self.requested or time.monotonic() - self.asked < _POLL_S:
            return self.requested
        self.asked = time.monotonic()
        try:
            self.requested = self.flag.is_set()
        except Exception:  # noqa: BLE001 - the GCS is gone: Ray ends this job anyway
            self.flag = None
        return self.requested


class SignalGuard:
    """The driver's SIGINT/SIGTERM handler for the whole run (a context manager that puts
    the previous handlers back). `training(flag)` switches from stop-now to ask-the-workers."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.flag: Optional[StopFlag] = None
        self.asked_at: Optional[float] = None
        self.settled = False  # stopping now, or training ended: later signals are ignored
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalGuard":
        self.install()
        return self

    def install(self) -> None:
        """(Again after ray.init, which installs a SIGTERM handler of its own.)"""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def training(self, flag: StopFlag) -> None:
        self.flag = flag

    def settle(self) -> None:
        """From here on the run ends its own way (the records are being written): a later
        signal must not cut that short."""
        self.settled = True

    def _stop_now(self, signum: int) -> None:
        self.settled = True
        raise Stopped(signum)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.settled:
            return
        first = self.signum is None
        if first:
            self.signum = signum
        if not first or self.flag is None:
            self._stop_now(signum)
        self.asked_at = time.monotonic()
        try:
            self.flag.set(signum)
        except Exception:  # noqa: BLE001 - Ray cannot pass the request on: stop now
            self._stop_now(signum)
        # os.write, not print: the handler may interrupt a write to stderr (the progress
        # bar, a log line), and print would then fail as a reentrant call.
        os.write(2, f"raypar: {signal.Signals(signum).name}: the workers save a checkpoint "
                    f"and stop (send it again to stop at once)\n".encode())

    def check(self, extra_s: float = 0.0) -> None:
        """On the main thread while training: the workers had their time to stop,
        STOP_GRACE_S and extra_s (the steps until their next meeting, where they see the
        request: raypar.config.ParallelConfig.meet_every)."""
        if self.asked_at is not None and \
                time.monotonic() - self.asked_at > STOP_GRACE_S + extra_s:
            self._stop_now(self.signum)


def end_ray() -> None:
    """Stop the workers that did not stop: ending the driver's Ray connection ends every
    actor of its job (the controller and the workers); a local Ray goes with it."""
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - the workers end with the process regardless
        pass
