"""The driver: connect to Ray, prepare the data, build the TorchTrainer, follow the run.

    raypar train --config jobs/configs/tiny.yaml          # what the CLI calls
    run(load_spec("jobs/configs/tiny.yaml"), run_dir=Path("runs/x"))

Everything that can be wrong with the request (config, data path, MLflow URI,
cluster size, memory) is checked before the workers start; the run directory
is created only once the data is ready, and it says "finished" only at the end.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from raypar.cluster import check_capacity, check_local_memory, connect, scaling_config
from raypar.config import ConfigError, RunSpec, model_config
from raypar.data.tokenizer import expected_vocab, padded_vocab
from raypar.train import checkpoint as ckpt
from raypar.train import tracking
from raypar.train.loop import train_loop_per_worker

log = logging.getLogger("raypar")

def default_run_dir(spec: RunSpec) -> Path:
    return Path("runs") / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step rows, event rows) of a run's metrics.jsonl; a torn last line is ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return [], []
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


class MetricsSink(ray.train.UserCallback):
    """Runs in the Ray Train controller, which Ray pins to the driver's node: appends
    the rows of rank 0's every report to metrics.jsonl, the run's record of truth, and
    keeps what every rank reports once (placement and memory, the pipeline timeline).

    After a restart the workers redo the steps since their checkpoint. Those rows are
    already recorded, so they are not written again (each step has exactly one row);
    instead one {"event": "recovery"} row says where training resumed from, how many
    steps were redone, how long recovery took (from the failure, or from the start of
    a `--resume` driver, to the first step finished after it), and whether every
    redone step reproduced its recorded loss."""

    def __init__(self, run_dir: str, started: float, elastic: bool = False):
        self.run_dir = Path(run_dir)
        self.started = started
        self.elastic = elastic
        self.losses: Optional[dict[int, float]] = None
        self.failed_at: Optional[float] = None
        self.failure = ""
        self.recovery: Optional[dict[str, Any]] = None
        self.last_row_time: Optional[float] = None
        self.layout: Optional[tuple[int, int]] = None  # (workers, dp) of the current group

    def _load(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line torn by a crash: drop it, its step is redone
                with open(path, "r+b") as f:
                    f.truncate(end)
        rows, _ = read_metrics(self.run_dir)
        self.losses = {int(r["step"]): r["loss"] for r in rows}

    def _layout_event(self, start: dict[str, Any]) -> list[dict[str, Any]]:
        """An {"event": "layout"} row when a worker group trains on another layout than the
        one before (elastic runs, and any group where workers sit out)."""
        layout = (start.get("workers", 0), start["layout"]["dp"])
        changed, self.layout = layout != self.layout, layout
        if not changed or not (self.elastic or start.get("sitting_out")):
            return []
        return [{"event": "layout", "step": start["from_step"], "time": start["loaded"],
                 "workers": layout[0], "dp": layout[1], "sitting_out": start.get("sitting_out", 0),
                 "layout": start["layout"]}]

    def after_exception(self, run_context, worker_exceptions):
        if self.failed_at is None:
            self.failed_at = time.time()
            first = next(iter(worker_exceptions.values()), None)
            self.failure = (str(first).strip().splitlines() or [type(first).__name__])[0][:300]

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        first = self.losses is None  # the first report this driver sees
        if first:
            self._load()
        for key, name in (("rank_info", "ranks.json"), ("timeline", "timeline.json")):
            # (ranks that sit out report nothing)
            if key in metrics[0]:
                tmp = self.run_dir / (name + ".tmp")
                tmp.write_text(json.dumps([m[key] for m in metrics if key in m]))
                tmp.replace(self.run_dir / name)
        out: list[dict[str, Any]] = []
        start = metrics[0].get("start")
        if start is not None:
            out += self._layout_event(start)
        # A restart after a failure or a resize, or the first start of a --resume driver:
        # it had recorded steps, or there was a checkpoint to resume from (even if a driver
        # killed before writing its rows left none).
        resume = start if start is not None and (self.failed_at is not None or not first or (
            self.losses or start["checkpoint"] is not None or start["skipped"])) else None
        if resume is not None:
            if self.recovery is not None:  # failed again before any new step
                self.recovery.pop("since", None)
                out.append(self.recovery)
            if self.failed_at is not None:
                cause = "preemption" if "received SIGTERM" in self.failure else "failure"
                since = self.failed_at
            elif first:
                cause, since = "resume", self.started
            else:  # Ray Train resized the worker group: from the last step before it
                cause, since = "resize", self.last_row_time or self.started
            self.recovery = {
                "event": "recovery", "step": resume["from_step"], "cause": cause,
                "error": self.failure, "checkpoint": resume["checkpoint"],
                "skipped": resume["skipped"], "load_s": resume.get("load_s"),
                "steps_redone": 0,
                # Another layout adds in another order: redone losses differ in the last bits.
                "same_layout": resume.get("saved_layout") in (None, resume.get("layout")),
                "since": since, "mismatched_steps": []}
            self.failed_at, self.failure = None, ""
        out += [{"event": "checkpoint", **entry} for entry in metrics[0].get("checkpoints", [])]
        for row in metrics[0].get("rows") or []:
            step = int(row["step"])
            rec = self.recovery
            # Rows from before the failure (a checkpoint's own report, sent again) are not
            # "fresh"; the first fresh one is the first step finished after recovery.
            fresh = rec is not None and row["time"] > rec["since"]
            if fresh and "recovery_s" not in rec:
                rec["recovery_s"] = row["time"] - rec["since"]
            if step in self.losses:  # redone after a restart: recorded already
                if fresh:
                    rec["steps_redone"] += 1
                    if rec["same_layout"] and row["loss"] != self.losses[step]:
                        rec["mismatched_steps"].append(step)
                continue
            if fresh:
                rec.pop("since")
                out.append(rec)
                self.recovery = None
            self.losses[step] = row["loss"]
            self.last_row_time = row["time"]
            out.append(row)
        if out:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in out))
                f.flush()
                os.fsync(f.fileno())


def _follow(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """New complete JSON lines of path from byte offset."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def checkpoint_root(spec: RunSpec, run_dir: Path) -> tuple[str, str, str]:
    """(storage_path, name, root) of a run's checkpoints: Ray Train writes them to
    <storage_path>/<name>/step_<N>. Without checkpoint.storage_path that is
    RUN_DIR/checkpoints; with one, <storage_path>/<run dir name> (a shared store gets one
    folder per run: the same name would make Ray Train resume one run from another's)."""
    if spec.checkpoint.storage_path:
        storage, name = spec.checkpoint.storage_path.rstrip("/"), run_dir.name
    else:
        storage, name = str(run_dir.resolve()), "checkpoints"
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
        raise ConfigError(f"{field}: cannot write checkpoints to {storage} ({reason})") from None


def _fault_injection(run_dir: Path) -> Optional[dict[str, Any]]:
    """RAYPAR_FAULT='rank=R,step=S[,phase=step|save|sigterm]': the recovery tests' way to
    kill one worker once (see raypar.train.loop._fault). Unset in normal use."""
    text = os.environ.get("RAYPAR_FAULT", "").strip()
    if not text:
        return None
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        fault = {"rank": int(fields["rank"]), "step": int(fields["step"]),
                 "phase": fields.get("phase", "step")}
    except (ValueError, KeyError):
        raise ConfigError(f"RAYPAR_FAULT: expected rank=R,step=S[,phase=step|save|sigterm], "
                          f"got {text!r}") from None
    if fault["phase"] not in ("step", "save", "sigterm"):
        raise ConfigError(f"RAYPAR_FAULT: phase must be step, save or sigterm, got "
                          f"{fault['phase']!r}")
    fault["marker"] = str((run_dir / ".fault-fired").resolve())
    return fault


def _step_delay() -> float:
    """RAYPAR_STEP_DELAY_S: seconds every worker sleeps after each step; the elastic tests'
    way to make a run of a few dozen steps outlast node changes. Unset (0) in normal use."""
    text = os.environ.get("RAYPAR_STEP_DELAY_S", "").strip()
    try:
        delay = float(text) if text else 0.0
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= 60:
        raise ConfigError(f"RAYPAR_STEP_DELAY_S: expected seconds in [0, 60], got {text!r}")
    return delay


# --resume: how long RUN_DIR must have gone unwritten, and how long to wait for that.
QUIET_S, QUIET_TIMEOUT_S = 5.0, 120.0


def _last_write(run_dir: Path) -> float:
    """The newest modification time of what a run's driver and workers write."""
    paths = [run_dir / "metrics.jsonl", run_dir / "checkpoints"]
    if (run_dir / "checkpoints").is_dir():
        paths += list((run_dir / "checkpoints").rglob("*"))
    times = []
    for p in paths:
        try:
            times.append(p.stat().st_mtime)
        except OSError:  # gone meanwhile (an old checkpoint pruned)
            pass
    return max(times, default=0.0)


def wait_until_quiet(run_dir: Path, quiet_s: float = QUIET_S,
                     timeout_s: float = QUIET_TIMEOUT_S) -> None:
    """--resume: the workers of a stopped job (`ray job stop`, a killed driver) can go on
    for seconds after their driver is gone, finishing steps and writing checkpoints. Two
    runs writing one directory would mix their records, so wait until RUN_DIR has been
    quiet for quiet_s; if it is still being written after timeout_s, the run is alive:
    refuse."""
    deadline = time.time() + timeout_s
    waited = False
    while (idle := time.time() - _last_write(run_dir)) < quiet_s:
        if time.time() > deadline:
            raise ConfigError(f"--resume: {run_dir} is still being written to ({idle:.1f} s "
                              f"ago): is the run still going? Stop it first (ray job stop, or "
                              f"end its driver), then resume")
        if not waited:
            log.warning("--resume: %s was written %.1f s ago; waiting until it has been quiet "
                        "for %g s (a stopped run's workers may still be finishing)",
                        run_dir, max(idle, 0.0), quiet_s)
            waited = True
        time.sleep(min(0.5, quiet_s))


def _check_resumable(spec: RunSpec, run_dir: Path, root: str, vocab_size: int,
                     tokenizer_json: str) -> None:
    """--resume: the same tokenizer and model as the checkpoints, and steps left to train."""

    saved_tok = run_dir / "tokenizer.json"
    if saved_tok.exists() and json.loads(saved_tok.read_text()) != json.loads(tokenizer_json):
        raise ConfigError("data: this config builds a different tokenizer than the run's "
                          f"{saved_tok}; resume with the run's data settings")
    latest = ckpt.latest_valid(root, log)
    if latest is not None:
        ckpt.check_compatible(ckpt.read_meta(latest), vars(model_config(spec, vocab_size)))
    rows, _ = read_metrics(run_dir)
    if rows and rows[-1]["step"] >= spec.train.steps:
        raise ConfigError(f"--resume: {run_dir} already trained train.steps={spec.train.steps} "
                          f"steps; raise it with --set train.steps=N to train further")


def run(spec: RunSpec, run_dir: Optional[Path] = None, address: Optional[str] = None,
        progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train one model; returns the summary that is also written to summary.json.

    resume=True continues the run in run_dir (the driver died, or it failed, or it
    should train for more steps): workers load its latest valid checkpoint, under this
    spec's layout, and metrics.jsonl and the MLflow run go on where they stopped."""
    logger = logging.getLogger("raypar")
    before = list(logger.handlers)
    try:
        return _run(spec, run_dir, address, progress, resume)
    finally:  # this run's run.log handler: a later run in this process logs elsewhere
        for handler in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(handler)
            handler.close()


def _run(spec: RunSpec, run_dir: Optional[Path], address: Optional[str], progress: bool,
         resume: bool) -> dict[str, Any]:
    from raypar.data import prepare_corpus, resolve_sources
    from raypar.data.corpus import check_not_empty, file_stats

    t_start = time.time()
    # A bad or empty path, and a layout this machine cannot hold, fail before Ray starts.
    sources = resolve_sources(spec.data.path, spec.data.format)
    check_not_empty(sources, file_stats(sources))
    if not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        check_local_memory(spec, padded_vocab(expected_vocab(spec.data), spec.parallel.tp))
    run_dir = Path(run_dir) if run_dir else default_run_dir(spec)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {run_dir} is not a raypar run directory "
                              f"(no config.yaml)")
        wait_until_quiet(run_dir)
    elif (run_dir / "summary.json").exists() or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"--run-dir: {run_dir} already holds a run; choose another "
                          f"directory, or continue it with --resume {run_dir}")
    check_storage(spec, run_dir)
    storage, name, root = checkpoint_root(spec, run_dir)
    uri = tracking.resolve_uri(spec, run_dir) if spec.tracking.enabled else ""
    if uri:
        tracking.check_reachable(uri)
    fault = _fault_injection(run_dir)
    step_delay = _step_delay()

    is_local = connect(address, spec.world_size)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    use_gpu = int(ray.cluster_resources().get("GPU", 0)) > 0
    check_capacity(spec, is_local, padded_vocab(expected_vocab(spec.data), spec.parallel.tp), use_gpu)
    cache = Path(spec.data.cache_dir).expanduser() if spec.data.cache_dir else None
    corpus = prepare_corpus(spec.data, cache)
    vocab_size = padded_vocab(corpus.tokenizer.vocab_size, spec.parallel.tp)
    if len(corpus.val) == 0 and spec.train.eval_every > 0:
        raise ConfigError("data.val_fraction: no validation blocks; raise it or set "
                          "train.eval_every=0")
    if resume:
        _check_resumable(spec, run_dir, root, vocab_size, corpus.tokenizer.to_json())

    # From here on the run exists: its directory records what happens.
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to(run_dir / "run.log")
    if resume:
        log.info("resuming %s with config: %s", run_dir, json.dumps(spec.to_dict()))
    (run_dir / "config.yaml").write_text(spec.to_yaml())
    corpus.tokenizer.save(run_dir / "tokenizer.json")
    _write_status(run_dir, "running")
    log.info("corpus: %s", json.dumps(corpus.stats))
    if corpus.stats.get("replaced_bytes"):
        log.warning("data: replaced %d undecodable bytes in %d files",
                    corpus.stats["replaced_bytes"], corpus.stats["files_with_replacements"])
    earlier, _ = read_metrics(run_dir)
    tracker = tracking.Tracker(spec, run_dir, resume=resume) if uri else None
    if tracker:
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.backfill(earlier)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.to_dict(), "vocab_size": vocab_size,
            "tokenizer_json": corpus.tokenizer.to_json(),
            "train_ref": ray.put(corpus.train), "val_ref": ray.put(corpus.val),
            "checkpoint_root": root, "fault": fault, "step_delay_s": step_delay,
        },
        scaling_config=scaling_config(spec, use_gpu),
        run_config=RunConfig(
            # The same storage_path and name as before make Ray Train pick up the run's
            # registered checkpoints (its checkpoint_manager_snapshot.json): that is --resume.
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            callbacks=[MetricsSink(str(run_dir.resolve()), t_start,
                                   elastic=spec.parallel.elastic.enabled)],
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = e

    new_rows, events = _follow_training(threading.Thread(target=fit, daemon=True), run_dir,
                                        spec, tracker, progress, len(earlier))
    rows = earlier + new_rows
    ok = "error" not in outcome and bool(rows) and rows[-1]["step"] == spec.train.steps
    summary = _summarize(spec, rows, run_dir, tracker, time.time() - t_start)
    summary["recoveries"] = [e for e in events if e["event"] == "recovery"]
    summary["layouts"] = [e for e in events if e["event"] == "layout"]
    summary.update(_layout_report(spec, run_dir, tracker))
    if tracker:
        _finish_tracking(tracker, run_dir, rows, ok)
    if not ok:
        _write_status(run_dir, "failed", error=str(outcome.get("error", "incomplete")))
        err = outcome.get("error")
        raise RuntimeError(f"training failed: {err}") from err
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_status(run_dir, "finished")
    return summary


def _follow_training(thread: threading.Thread, run_dir: Path, spec: RunSpec,
                     tracker: Optional[tracking.Tracker], progress: bool, done: int
                     ) -> tuple[list[dict], list[dict]]:
    """Run fit() on a thread while this one tails metrics.jsonl into tqdm and MLflow.
    Returns the new (step rows, recovery events)."""
    from tqdm import tqdm

    path = run_dir / "metrics.jsonl"
    offset = path.stat().st_size if path.exists() else 0
    rows: list[dict] = []
    events: list[dict] = []
    bar = tqdm(total=spec.train.steps, initial=done, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        new, offset = _follow(path, offset)
        for event in (r for r in new if "event" in r):
            events.append(event)
            if event["event"] == "layout":
                _log_layout(spec, event)
                continue
            if event["event"] == "checkpoint":
                log.info("checkpoint %s (%s): written in %.2f s, training held up %.2f s",
                         ckpt.dir_name(event["step"]), event["mode"], event["save_s"],
                         event["stall_s"])
                if tracker:
                    tracker.log_metrics({"checkpoint_save_s": event["save_s"],
                                         "checkpoint_stall_s": event["stall_s"]},
                                        step=event["step"])
                continue
            _log_event(event)
            if tracker:
                tracker.log_metrics({"recovery_s": event.get("recovery_s", float("nan")),
                                     "steps_redone": event["steps_redone"]}, step=event["step"])
        new = [r for r in new if "event" not in r]
        if new:
            rows.extend(new)
            if tracker:
                tracker.log_rows(new)
            last = new[-1]
            bar.update(len(new))
            bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if not alive:
            break
        thread.join(timeout=0.5)
    bar.close()
    return rows, events


def _log_layout(spec: RunSpec, event: dict[str, Any]) -> None:
    p = spec.parallel
    line = (f"from step {event['step']}: {event['workers']} workers, training on dp="
            f"{event['dp']} x pp={p.pp} x tp={p.tp}")
    idle = event["sitting_out"]
    if not idle:
        log.info(line)
        return
    r, workers = spec.replica_size, event["workers"]
    reasons = []
    if workers // r > event["dp"]:
        reasons.append(f"train.global_batch={spec.train.global_batch} does not divide into "
                       f"{workers // r} replicas x train.micro_batch={spec.train.micro_batch}")
    if workers % r:
        reasons.append(f"{workers % r} workers do not make a whole replica of pp*tp={r}")
    log.warning("%s; %d sit out (%s)", line, idle, "; ".join(reasons))


def _log_event(event: dict[str, Any]) -> None:
    for path, reason in event.get("skipped") or []:
        log.warning("checkpoint %s skipped: %s", path, reason)
    where = (f"checkpoint {event['checkpoint']}" if event.get("checkpoint")
             else "the start (no valid checkpoint)")
    cause = {"resume": "--resume", "resize": "a resize of the worker group"}.get(
        event["cause"], f"{event['cause']} ({event['error']})")
    log.warning("recovered from %s: resumed at step %d from %s, %d steps redone, %.1f s",
                cause, event["step"], where, event["steps_redone"], event.get("recovery_s", -1))
    if event.get("mismatched_steps"):
        log.warning("redone steps %s did not reproduce their recorded loss",
                    event["mismatched_steps"])


def _summarize(spec: RunSpec, rows: list[dict], run_dir: Path,
               tracker: Optional[tracking.Tracker], seconds: float) -> dict[str, Any]:
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    return {
        "steps": rows[-1]["step"] if rows else 0,
        "final_loss": rows[-1]["loss"] if rows else None,
        "final_val_loss": val[-1] if val else None,
        "first_val_loss": val[0] if val else None,
        "tokens": rows[-1]["tokens"] if rows else 0,
        "seconds": round(seconds, 1),
        "run_dir": str(run_dir),
        "mlflow_run_id": tracker.run_id if tracker else None,
        "mlflow_uri": tracker.uri if tracker else None,
    }


def _layout_report(spec: RunSpec, run_dir: Path,
                   tracker: Optional[tracking.Tracker]) -> dict[str, Any]:
    """Per-rank memory and the pipeline timeline: into the summary, MLflow and a PNG."""
    out: dict[str, Any] = {}
    ranks_file, timeline_file = run_dir / "ranks.json", run_dir / "timeline.json"
    if ranks_file.exists():
        ranks = json.loads(ranks_file.read_text())
        out["ranks"] = ranks
        if tracker:
            tracker.log_artifact(ranks_file)
            keys = ("param_bytes", "grad_bytes", "optim_bytes", "activation_peak_bytes",
                    "block_param_bytes")
            tracker.log_metrics({f"memory.rank{r['rank']}.{k}": float(r[k])
                                 for r in ranks for k in keys if k in r})
    if timeline_file.exists():
        from raypar.parallel.pipeline import pipeline_bubble, plot_timeline, theoretical_bubble
        p = spec.parallel
        timelines = json.loads(timeline_file.read_text())
        out["bubble_measured"] = pipeline_bubble(timelines)
        dp = 1 + max((r["dp"] for r in out.get("ranks", [])), default=p.dp - 1)
        out["bubble_theory"] = theoretical_bubble(p.schedule, p.pp, spec.with_dp(dp).grad_accum,
                                                  p.virtual_stages)
        png = run_dir / "pipeline_timeline.png"
        plot_timeline({r: t["events"] for r, t in enumerate(timelines)}, png)
        if tracker:
            tracker.log_metrics({"bubble_measured": out["bubble_measured"],
                                 "bubble_theory": out["bubble_theory"]})
            tracker.log_artifact(png)
    return out


def _finish_tracking(tracker: tracking.Tracker, run_dir: Path, rows: list[dict],
                     ok: bool) -> None:
    if rows:
        png = run_dir / "loss.png"
        tracking.plot_loss(rows, png)
        tracker.log_artifact(png)
    tracker.finish(ok)


def _write_status(run_dir: Path, state: str, **extra: Any) -> None:
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps({"state": state, "time": time.time(), **extra}))
    tmp.replace(run_dir / "status.json")


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("raypar").addHandler(handler)
    logging.getLogger("raypar").setLevel(logging.INFO)
