"""The run directory: the name of every file in it, and reading and writing them.

    rd = RunDir("runs/tiny-20261203")
    rows, events = rd.read_metrics()       # typed records (raypar/train/records.py)
    rd.write_status("finished")

No other module spells a run directory's file name; the bench, `--resume`, export and
generate all go through this one. What each file holds is in the README (The run directory).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

from raypar.config import ConfigError, RunSpec
from raypar.train.records import (Record, RankInfo, StepRow, Status, Summary, Timeline,
                                  parse_row)

log = logging.getLogger("raypar")

# The folder of a run's checkpoints (when checkpoint.storage_path is not set).
CHECKPOINTS = "checkpoints"
# Where `raypar export` writes in a run directory, relative to it: the Hugging Face
# directory, and with --format raypar the one raypar-native file (`raypar generate` reads it).
EXPORT = Path("export")
EXPORT_RAYPAR = Path("export.safetensors")
# Where the raypar-native file went before exports were Hugging Face directories.
EXPORT_LEGACY = Path("export") / "model.safetensors"

# --resume: how long RUN_DIR must have gone unwritten, and how long to wait for that.
QUIET_S, QUIET_TIMEOUT_S = 5.0, 120.0


def default_run_dir(spec: RunSpec) -> Path:
    return Path("runs") / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _complete_lines(data: bytes, where: Path, strict: bool = True) -> list[dict[str, Any]]:
    """The JSON lines of data up to its last newline (a torn last line is left out); a line
    that is not a JSON record is one ConfigError naming the file and the line (strict), or
    is skipped with a warning."""
    end = data.rfind(b"\n") + 1
    out = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            record = e
        if not isinstance(record, dict):
            if not strict:
                log.warning("%s: skipped a line that is not a JSON record (%r)", where,
                            line[:40])
                continue
            raise ConfigError(f"{where}: line {n} is not a JSON record ({line[:40]!r}); "
                              f"fix or remove it")
        out.append(record)
    return out


def _parse(lines: list[dict[str, Any]]) -> list[Record]:
    return [r for r in map(parse_row, lines) if r is not None]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: os.PathLike | str):
        object.__setattr__(self, "path", Path(path))

    # -- every file's name ----------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def ranks(self) -> Path:
        return self.path / "ranks.json"

    @property
    def timeline(self) -> Path:
        return self.path / "timeline.json"

    @property
    def timeline_png(self) -> Path:
        return self.path / "pipeline_timeline.png"

    @property
    def timeline_trace(self) -> Path:
        return self.path / "timeline.trace.json"

    @property
    def loss_png(self) -> Path:
        return self.path / "loss.png"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def mlflow_record(self) -> Path:
        """Which MLflow run this run directory feeds (kept across --resume)."""
        return self.path / "mlflow.json"

    @property
    def mlflow_db(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def fault_marker(self) -> Path:
        """Written when the tests' injected fault fires (raypar/train/faults.py)."""
        return self.path / ".fault-fired"

    @property
    def lock(self) -> Path:
        """Held by the driver that trains in this directory (RunLock)."""
        return self.path / ".raypar.lock"

    @property
    def export(self) -> Path:
        return self.path / EXPORT

    @property
    def export_raypar(self) -> Path:
        return self.path / EXPORT_RAYPAR

    @property
    def export_legacy(self) -> Path:
        return self.path / EXPORT_LEGACY

    # -- metrics.jsonl --------------------------------------------------------------------------
    def read_metrics(self) -> tuple[list[StepRow], list[Record]]:
        """(step rows, event records) of metrics.jsonl; a torn last line is ignored."""
        if not self.metrics.exists():
            return [], []
        records = _parse(_complete_lines(self.metrics.read_bytes(), self.metrics))
        return ([r for r in records if isinstance(r, StepRow)],
                [r for r in records if not isinstance(r, StepRow)])

    def follow_metrics(self, offset: int) -> tuple[list[Record], int]:
        """New complete records of metrics.jsonl from byte offset, and the next offset."""
        if not self.metrics.exists():
            return [], offset
        with open(self.metrics, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        return _parse(_complete_lines(data[:end], self.metrics, strict=False)), offset + end

    def metrics_size(self) -> int:
        return self.metrics.stat().st_size if self.metrics.exists() else 0

    def drop_torn_line(self) -> None:
        """A line torn by a crash: drop it (its step is redone)."""
        if not self.metrics.exists():
            return
        data = self.metrics.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.metrics, "r+b") as f:
                f.truncate(end)

    def append_metrics(self, records: Iterable[Record]) -> None:
        """Append records durably (the run's record of truth)."""
        text = "".join(json.dumps(r.to_json()) + "\n" for r in records)
        if not text:
            return
        with open(self.metrics, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    # -- the other files ------------------------------------------------------------------------
    def write_ranks(self, ranks: list[RankInfo]) -> None:
        _write_atomic(self.ranks, json.dumps([r.to_json() for r in ranks]))

    def read_ranks(self) -> Optional[list[RankInfo]]:
        if not self.ranks.exists():
            return None
        return [RankInfo.from_json(r) for r in json.loads(self.ranks.read_text())]

    def write_timelines(self, timelines: list[Timeline]) -> None:
        _write_atomic(self.timeline, json.dumps([t.to_json() for t in timelines]))

    def read_timelines(self) -> Optional[list[Timeline]]:
        if not self.timeline.exists():
            return None
        return [Timeline.from_json(t) for t in json.loads(self.timeline.read_text())]

    def write_status(self, state: str, error: Optional[str] = None) -> None:
        _write_atomic(self.status, json.dumps(Status(state, time.time(), error).to_json()))

    def read_status(self) -> Optional[Status]:
        return Status.from_json(json.loads(self.status.read_text())) \
            if self.status.exists() else None

    def write_summary(self, summary: Summary) -> None:
        self.summary.write_text(json.dumps(summary.to_json(), indent=2))

    def read_summary(self) -> Optional[Summary]:
        return Summary.from_json(json.loads(self.summary.read_text())) \
            if self.summary.exists() else None

    def holds_run(self) -> bool:
        """A run has trained (or finished) here."""
        return self.summary.exists() or self.metrics.exists()

    def log_to_file(self) -> logging.Handler:
        """Send raypar's log to run.log; returns the handler (the caller removes it)."""
        handler = logging.FileHandler(self.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("raypar").addHandler(handler)
        logging.getLogger("raypar").setLevel(logging.INFO)
        return handler

    # -- --resume: is anyone still writing here? -----------------------------------------------
    def last_write(self) -> float:
        """The newest modification time of what a run's driver and workers write."""
        paths = [self.metrics, self.checkpoints]
        if self.checkpoints.is_dir():
            paths += list(self.checkpoints.rglob("*"))
        times = []
        for p in paths:
            try:
                times.append(p.stat().st_mtime)
            except OSError:  # gone meanwhile (an old checkpoint pruned)
                pass
        return max(times, default=0.0)

    def wait_until_quiet(self, quiet_s: float = QUIET_S, timeout_s: float = QUIET_TIMEOUT_S) -> bool:
        """--resume: the workers of a stopped job (`ray job stop`, a killed driver) can go on
        for seconds after their driver is gone, finishing steps and writing checkpoints. Two
        runs writing one directory would mix their records, so wait until RUN_DIR has been
        quiet for quiet_s; if it is still being written after timeout_s, the run is alive:
        refuse. Returns whether it had to wait (something was written meanwhile)."""
        deadline = time.time() + timeout_s
        waited = False
        while (idle := time.time() - self.last_write()) < quiet_s:
            if time.time() > deadline:
                raise ConfigError(f"--resume: {self.path} is still being written to ({idle:.1f} s "
                                  f"ago): is the run still going? Stop it first (ray job stop, "
                                  f"or end its driver), then resume")
            if not waited:
                log.warning("--resume: %s was written %.1f s ago; waiting until it has been "
                            "quiet for %g s (a stopped run's workers may still be finishing)",
                            self.path, max(idle, 0.0), quiet_s)
                waited = True
            time.sleep(min(0.5, quiet_s))
        return waited


def checkpoint_root(spec: RunSpec, run_dir: Path) -> tuple[str, str, str]:
    """(storage_path, name, root) of a run's checkpoints: Ray Train writes them to
    <storage_path>/<name>/step_<N>. Without checkpoint.storage_path that is
    RUN_DIR/checkpoints; with one, <storage_path>/<run dir name> (a shared store gets one
    folder per run: the same name would make Ray Train resume one run from another's)."""
    rd = RunDir(run_dir)
    if spec.checkpoint.storage_path:
        storage, name = spec.checkpoint.storage_path.rstrip("/"), rd.path.name
    else:
        storage, name = str(rd.path.resolve()), rd.checkpoints.name
    return storage, name, f"{storage}/{name}"


def check_storage(spec: RunSpec, run_dir: Path) -> None:
    """Fail before training starts if checkpoints could not be written."""
    if not spec.checkpoint.storage_path:
        probe = run_dir.resolve()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"--run-dir: {run_dir} is not writable (checkpoints and "
                              f"metrics go there)")
        return
    storage = spec.checkpoint.storage_path
    field = "checkpoint.storage_path"
    try:
        if "://" in storage and not storage.startswith("file://"):
            # Deferred: pyarrow costs `raypar`'s quick paths (help, config errors) a third
            # of a second, and only a remote storage_path needs it.
            import pyarrow.fs as pafs
            fs, root = pafs.FileSystem.from_uri(storage)
            fs.create_dir(root, recursive=True)
            probe = f"{root.rstrip('/')}/.raypar-write-test-{os.getpid()}"
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
        else:
            local = Path(storage[len("file://"):] if storage.startswith("file://") else storage)
            local.mkdir(parents=True, exist_ok=True)
            probe = local / f".raypar-write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
    except Exception as e:  # noqa: BLE001 - any failure to write means the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if re.match(r"Bucket '[^']*' not found", reason):
            # pyarrow's own text goes on about its allow_bucket_creation option, which
            # raypar never sets: a missing bucket is the user's to create.
            reason = reason.split(".", 1)[0].replace("not found", "does not exist")
        raise ConfigError(f"{field}: cannot write checkpoints to {storage} ({reason})") from None


class RunLock:
    """One run per directory: an exclusive lock on RUN_DIR/.raypar.lock (flock), taken
    before the run writes anything and held until it ends. The kernel lets it go when the
    process ends, however it ends, so a crashed run never leaves a stale lock behind. The
    file names the holder (host, pid) for the refusal's message."""

    def __init__(self, rd: RunDir):
        self.rd = rd
        self.created: list[Path] = []  # directories the lock made (gone again if unused)
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        missing = [p for p in (self.rd.path, *self.rd.path.parents) if not p.exists()]
        self.rd.path.mkdir(parents=True, exist_ok=True)
        self.created = missing
        fd = os.open(self.rd.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"--run-dir: {self.rd.path} is in use by {self._holder()}; "
                              f"stop that run first, or choose another directory") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "time": time.time()}).encode())
        return self

    def _holder(self) -> str:
        try:
            owner = json.loads(self.rd.lock.read_text())
            return f"raypar pid {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another raypar"

    def __exit__(self, *exc: Any) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.rd.path.iterdir()] == [self.rd.lock.name]:
            self.rd.lock.unlink()  # the run wrote nothing: leave no directory behind
            for path in self.created:  # innermost first
                try:
                    path.rmdir()
                except OSError:
                    break
        os.close(self.fd)  # releases the lock
        self.fd = None


def read_metrics(run_dir: os.PathLike | str) -> tuple[list[StepRow], list[Record]]:
    """(step rows, event records) of the run in run_dir."""
    return RunDir(run_dir).read_metrics()


def wait_until_quiet(run_dir: os.PathLike | str, quiet_s: float = QUIET_S,
                     timeout_s: float = QUIET_TIMEOUT_S) -> None:
    RunDir(run_dir).wait_until_quiet(quiet_s, timeout_s)
