"""MLflow tracking: exactly one MLflow run per training job, written by the driver.

Workers report metrics through ray.train.report; the driver turns each metrics
row into MLflow metrics, logs the whole resolved config as params, and at the
end the config and a loss-curve PNG as artifacts. With no tracking.uri and no
MLFLOW_TRACKING_URI the store is a SQLite file inside the run directory, so a
laptop needs no server:  mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from raypar.config import ConfigError, RunSpec
from raypar.train.rundir import RunDir

# Every numeric per-step field of a metrics.jsonl row (raypar/train/records.py StepRow),
# and a mixture's tokens per source as tokens_<name>. time is MLflow's own timestamp; the
# block indices are data, not metrics.
METRIC_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tokens", "dp",
               "data_s", "comm_bytes")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its runs' artifacts (each run gets its own folder under
    it, named by its run id), for a SQLite store: `mlartifacts/<experiment>` beside the
    database file. So a store several runs share (MLFLOW_TRACKING_URI) keeps every run's
    artifacts apart from every run directory: deleting one run's directory loses nothing
    of another's. (Given no location, MLflow would use ./mlruns in the working directory.)
    With raypar's default store, the database is in the run directory, and so are its
    artifacts. Other stores (a file store, a tracking server) decide for themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "default"
    return (db.resolve().parent / "mlartifacts" / safe).as_uri()


def resolve_uri(spec: RunSpec, run_dir: Path) -> str:
    """tracking.uri > $MLFLOW_TRACKING_URI > a SQLite store in the run directory."""
    return (spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
            or f"sqlite:///{RunDir(run_dir).mlflow_db.resolve()}")


def check_reachable(uri: str) -> None:
    """Fail before any cluster time is spent if an MLflow server cannot be reached."""
    field = "tracking.uri"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise ConfigError(f"{field}: MLflow server at {uri} answered HTTP {r.status}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"{field}: cannot reach MLflow at {uri} ({reason})") from None
    elif uri.startswith(("file:", "sqlite:")):
        # sqlite:///rel.db is relative, sqlite:////abs.db absolute; file: URIs carry a path.
        path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:")
                    else urllib.parse.urlparse(uri).path)
        probe = path.parent if uri.startswith("sqlite:") else path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise ConfigError(f"{field}: MLflow store {uri} is not writable")
    elif "://" not in uri and uri not in ("databricks",):
        raise ConfigError(f"{field}: expected http(s)://, file:, sqlite:///... or another "
                          f"MLflow URI, got {uri!r}")


class Tracker:
    """One MLflow run, driven through MlflowClient (no global fluent state).

    The run id is kept in RUN_DIR/mlflow.json, so `raypar train --resume` continues the
    same MLflow run: params it already has stay, a changed one is recorded as a tag
    `resumed.<key>` ('old -> new'; MLflow params cannot change), and rows missing
    from MLflow (the driver died between writing and logging them) are backfilled."""

    def __init__(self, spec: RunSpec, run_dir: Path, resume: bool = False):
        # mlflow is imported here, not at the top: it costs seconds, and runs with
        # tracking.enabled=false (and every module that imports this one) never need it.
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        # MLflow announces its schema migrations at INFO on a fresh store: not our user's news.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.uri = resolve_uri(spec, run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        record = RunDir(run_dir).mlflow_record
        previous = json.loads(record.read_text()) if resume and record.exists() else None
        run = None
        if previous is not None:
            # The run id, looked up in this store (a moved run directory has moved its store).
            from mlflow.exceptions import MlflowException
            try:
                run = self.client.get_run(previous["run_id"])
            except MlflowException:
                logging.getLogger("raypar").warning(
                    "MLflow run %s not found at %s: starting a new MLflow run",
                    previous["run_id"], self.uri)
        resumed = run is not None
        if run is not None:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            have = run.data.params
        else:
            exp = self.client.get_experiment_by_name(spec.tracking.experiment)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                exp_id = self.client.create_experiment(
                    spec.tracking.experiment,
                    artifact_location=artifact_location(self.uri, spec.tracking.experiment))
            run = self.client.create_run(exp_id, run_name=Path(run_dir).name,
                                         tags={"raypar.run_dir": str(Path(run_dir).resolve())})
            self.run_id = run.info.run_id
            have = {}
        tmp = record.with_name(".mlflow.json.tmp")
        tmp.write_text(json.dumps({"uri": self.uri, "run_id": self.run_id}))
        tmp.replace(record)
        params = [(k, str(v)) for k, v in spec.flat().items() if k not in have]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params[i:i + 100]])
        for k, v in spec.flat().items():
            if k in have and have[k] != str(v):
                self.client.set_tag(self.run_id, f"resumed.{k}", f"{have[k]} -> {v}")
        # Last, so that nothing above can fail with it running: the driver node's CPU,
        # memory, disk, network (and GPU, with nvidia-ml-py installed) as MLflow's system/*
        # metrics every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while the run trains;
        # a resumed run's continue its steps.
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        self.system = SystemMetricsMonitor(self.run_id, tracking_uri=self.uri,
                                           resume_logging=resumed)
        self.system.start()

    def backfill(self, rows: list[dict[str, Any]]) -> None:
        """Log the rows of metrics.jsonl that this MLflow run does not have yet."""
        if not rows:
            return
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "loss")}
        self.log_rows([r for r in rows if int(r["step"]) not in logged])

    def log_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        from mlflow.entities import Metric  # (deferred with the rest of mlflow)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, int(row["step"]))
                   for row in rows for k in METRIC_KEYS if k in row]
        metrics += [Metric(f"tokens_{name}", float(n), now, int(row["step"]))
                    for row in rows for name, n in (row.get("source_tokens") or {}).items()]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        """One-off metrics (per-rank memory, pipeline bubble), at `step`."""
        from mlflow.entities import Metric  # (deferred with the rest of mlflow)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        """End the MLflow run as FINISHED, FAILED or KILLED (a run stopped by a signal)."""
        self.system.finish()
        self.client.set_terminated(self.run_id, status=status)

    def abandon(self) -> None:
        """On an unexpected error: stop the system metrics and end the run FAILED, as far as
        the store still answers (the error that got here is the one to report)."""
        try:
            self.finish("FAILED")
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the cause wins
            logging.getLogger("raypar").warning("MLflow run %s not ended: %s", self.run_id, e)


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
