"""The driver: check the request, connect to Ray, prepare the data, build the TorchTrainer
and follow the run.

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
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
from ray.data import DataContext
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from raypar.cluster import (check_capacity, check_local_memory, connect, local_ray_note,
                            scaling_config)
from raypar.config import ConfigError, RunSpec, load_spec, model_config
from raypar.data import mixture
from raypar.data.corpus import is_uri
from raypar.data.pipeline import default_cache_dir
from raypar.data.prepare import PreparedDataset, console_progress
from raypar.data.tokenizer import Tokenizer, expected_vocab, parse_tokenizer
from raypar.hf_import import model_vocab
from raypar.parallel import ps as ps_mod
from raypar.train import checkpoint as ckpt
from raypar.train import restart as restart_mod
from raypar.train import tracking
from raypar.train.faults import parse_fault, parse_step_delay, parse_step_delay_replica
from raypar.train.loop import train_loop_per_worker
from raypar.train.records import Record, StepRow
from raypar.train.rundir import (RunDir, RunLock, check_storage, checkpoint_root,
                                 default_run_dir)
from raypar.train.sink import MetricsSink
from raypar.train.startup import Startup
from raypar.train.stopping import Interrupted, SignalGuard, StopFlag, Stopped, end_ray
from raypar.train.summary import Follower, finish_tracking, layout_report, summarize
from raypar.validation import check_corpus_fits, local_sgd_resume_problem

log = logging.getLogger("raypar")


def _latest_checkpoint(spec: RunSpec, rd: RunDir) -> Optional[str]:
    """--resume: the checkpoint it continues from. Checkpoints none of which verifies are
    refused: training on from step 0 would be a new run, which only --restart starts."""
    root = checkpoint_root(spec, rd.path)[2]
    found = ckpt.candidates(root)
    # Sizes only, as a worker's start checks them: every byte a rank loads is hashed as it
    # is read, and a --resume whose checkpoints pass here but none of which loads fails in
    # the workers, in one line (NoCheckpointLoads), rather than train from step 0. Hashing
    # here would read every byte of the checkpoint once more, on this machine.
    latest = ckpt.latest_valid(root, log, hashes=False)
    if found and latest is None:
        raise ConfigError(_none_verifies(len(found), root, rd))
    return None if latest is None else str(latest)


def _none_verifies(n: int, root: Any, rd: RunDir) -> str:
    return (f"--resume: none of the {n} checkpoints under {root} verifies (see the "
            f"warnings above); to train again from step 0 in this directory, with the old "
            f"records moved aside: raypar train --resume {rd.path} --restart")


def _prepare_resume(spec: RunSpec, rd: RunDir, latest: Optional[str], vocab_size: int,
                    tokenizer_json: str) -> None:
    """--resume: the same tokenizer and model as the checkpoints, steps left to train, and
    the rows of steps this run trains again on another course moved aside."""
    # Compared by digest, not by text: a run saved with the byte tokenizer's older JSON
    # resumes with a config that builds the byte tokenizer (now a HF tokenizer.json).
    if rd.tokenizer.exists() and parse_tokenizer(rd.tokenizer.read_text(), str(rd.tokenizer)) \
            .digest != Tokenizer.from_json(tokenizer_json).digest:
        raise ConfigError("data: this config builds a different tokenizer than the run's "
                          f"{rd.tokenizer}; resume with the run's data settings")
    if latest is not None:
        ckpt.check_compatible(ckpt.read_meta(latest), vars(model_config(spec, vocab_size)))
        ckpt.checked_metadata(latest)  # a forged one is refused here, before any worker
        problem = local_sgd_resume_problem(ckpt.read_train_state(latest).get("layout") or {},
                                           spec.parallel.dp, spec.parallel.sync_every)
        if problem:
            raise ConfigError(f"--resume: {problem}")
    rows, _ = rd.read_metrics()
    if rows and rows[-1].step >= spec.train.steps:
        raise ConfigError(f"--resume: {rd.path} already trained train.steps={spec.train.steps} "
                          f"steps; raise it with --set train.steps=N to train further")
    from_step = ckpt.read_train_state(latest)["step"] if latest is not None else 0
    if rows and rows[-1].step > from_step:
        # config.yaml still holds the run's settings: this --resume writes its own later.
        fields = restart_mod.changed_course(load_spec(rd.config), spec, from_step, rows[-1].step)
        if fields:
            rd.drop_torn_line()
            restart_mod.supersede(rd, from_step, fields)


def run(spec: RunSpec, run_dir: Optional[Path] = None, address: Optional[str] = None,
        progress: bool = True, resume: bool = False, restart: bool = False,
        started: Optional[float] = None) -> dict[str, Any]:
    """Train one model; returns the summary that is also written to summary.json.

    resume=True continues the run in run_dir (the driver died, or it failed, or it
    should train for more steps): workers load its latest valid checkpoint, under this
    spec's layout, and metrics.jsonl and the MLflow run go on where they stopped.
    restart=True (with resume) trains run_dir's run again from step 0, its old records
    and checkpoints moved aside (raypar/train/restart.py). started: when the command began
    (time.time(); default now), what the start-up profile counts from (startup.py)."""
    logger = logging.getLogger("raypar")
    before = list(logger.handlers)
    try:
        startup = Startup(started if started is not None else time.time())
        # From a command its imports (torch, ray) are a phase; shown once the request
        # passed its checks (a refused one prints its one line, nothing else).
        imported = time.time() if started is not None else None
        return _run(spec, RunDir(run_dir or default_run_dir(spec)), address, progress, resume,
                    restart, startup, imported)
    finally:  # this run's run.log handler: a later run in this process logs elsewhere
        for handler in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(handler)
            handler.close()


def _check_request(spec: RunSpec, rd: RunDir, address: Optional[str], resume: bool,
                   restart: bool) -> Optional[str]:
    """What can be refused before Ray starts: the data path, a layout this machine cannot
    hold, a run directory that is not what the command expects, unwritable storage, a
    --resume without a checkpoint that verifies. Returns the checkpoint --resume loads."""
    mixture.precheck(spec.data)  # the corpora, and the cache: not after minutes of preparation
    if not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        check_local_memory(spec, model_vocab(spec, expected_vocab(spec.data)))
    if resume:
        if not rd.config.is_file():
            raise ConfigError(f"--resume: {rd.path} is not a raypar run directory "
                              f"(no config.yaml)")
        rd.read_metrics()  # a damaged metrics.jsonl is refused before Ray starts
    elif rd.holds_run():
        raise ConfigError(f"--run-dir: {rd.path} already holds a run; choose another "
                          f"directory, or continue it with --resume {rd.path}")
    check_storage(spec, rd.path)
    return _latest_checkpoint(spec, rd) if resume and not restart else None


def _prepare(spec: RunSpec, address: Optional[str], guard: SignalGuard,
             startup: Startup) -> tuple[list[PreparedDataset], int, bool]:
    """Connect to Ray, check the cluster can hold the layout, prepare the dataset, or each
    source of a mixture (Ray Data tasks write its shards; this process holds only the
    manifests). Returns (datasets, padded vocabulary size, use_gpu)."""
    is_local = connect(address, spec.world_size * spec.train.threads)
    guard.install()  # again: ray.init put a SIGTERM handler of its own in its place
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    DataContext.get_current().enable_progress_bars = False
    resources, connected = ray.cluster_resources(), time.time()
    use_gpu = int(resources.get("GPU", 0)) > 0
    check_capacity(spec, is_local, model_vocab(spec, expected_vocab(spec.data)),
                   use_gpu)
    cache = Path(spec.data.cache_dir).expanduser() if spec.data.cache_dir else None
    if not mixture.ready(spec.data, cache or default_cache_dir(spec.data)):
        # Preparing takes a while and shows its progress: the phases so far show first. (A
        # cached or prepared dataset: they show once a --resume's checkpoint is checked
        # too, so that a refusal there is one line alone.)
        startup.release()
    startup.done("ray", f"{'started a local Ray' if is_local else 'connected to Ray'} with "
                        f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, "
                        f"{len(ray.nodes())} node(s)", at=connected)
    note = local_ray_note() if is_local else None
    if note:
        startup.note(note)
    t_data = time.time()
    show, every, end = console_progress()
    try:
        datasets = mixture.prepare_all(spec.data, cache, progress=show, progress_every=every)
    finally:
        end()
    startup.done("tokenizer", datasets[0].tokenizer_note,
                 at=t_data + sum(d.tokenizer_s for d in datasets))
    startup.done("dataset", "; ".join(
        f"{'reused' if d.from_cache else 'prepared'} {d.path} "
        f"({d.tokens('train') + d.tokens('val'):,} tokens, "
        f"{d.shards('train') + d.shards('val')} shards)" for d in datasets))
    n_train, n_val = mixture.blocks_of(datasets, spec.data, spec.data.seq_len)
    check_corpus_fits(spec, n_train)
    if n_val == 0 and spec.train.eval_every > 0:
        raise ConfigError("data.val_fraction: no validation blocks; raise it or set "
                          "train.eval_every=0")
    return datasets, model_vocab(spec, datasets[0].tokenizer.vocab_size), use_gpu


def _open_run_dir(spec: RunSpec, rd: RunDir, datasets: list[PreparedDataset],
                  resume: bool, startup: Startup) -> None:
    """From here on the run exists: its directory records what happens."""
    rd.path.mkdir(parents=True, exist_ok=True)
    rd.log_to_file()
    for line in startup.lines:  # the phases shown before run.log existed
        log.info("start-up: %s", line)
    if resume:
        log.info("resuming %s with config: %s", rd.path, json.dumps(spec.to_dict()))
    rd.config.write_text(spec.to_yaml())
    datasets[0].tokenizer.save(rd.tokenizer)
    rd.write_status("running")
    for corpus in datasets:
        log.info("dataset %s: %s", corpus.path, json.dumps(corpus.stats))
        if corpus.stats.get("replaced_bytes"):
            log.warning("data: replaced %d undecodable bytes in %d files of %s",
                        corpus.stats["replaced_bytes"], corpus.stats["files_with_replacements"],
                        corpus.path)


def _run(spec: RunSpec, rd: RunDir, address: Optional[str], progress: bool,
         resume: bool, restart: bool, startup: Startup,
         imported: Optional[float]) -> dict[str, Any]:
    t_start = startup.started
    latest = _check_request(spec, rd, address, resume, restart)
    if imported is not None:
        startup.done("imports", "python, torch, ray, raypar", at=imported)
    startup.done("checks", "config, data paths, run directory" + (", checkpoint" if latest
                                                                    else ""))
    # One run per directory, from before it writes anything until it ends, however it ends.
    with SignalGuard() as guard, RunLock(rd):
        try:
            if resume:  # a stopped run's workers may still be finishing
                if rd.wait_until_quiet() and not restart:  # they may have saved a newer
                    latest = _latest_checkpoint(spec, rd)   # checkpoint meanwhile
            elif rd.holds_run():  # one that started and ended since the check above
                raise ConfigError(f"--run-dir: {rd.path} already holds a run")
            if restart:
                restart_mod.move_aside(rd, checkpoint_root(spec, rd.path)[2])
                resume = False
            return _train(spec, rd, address, progress, resume, latest, t_start, guard,
                          startup)
        except (Stopped, SystemExit) as stop:  # before any worker trained
            # (While ray.init runs, its own SIGTERM handler is in place: sys.exit(15).)
            if isinstance(stop, SystemExit) and stop.code != signal.SIGTERM:
                raise
            guard.settle()
            signum = getattr(stop, "signum", signal.SIGTERM)
            name = signal.Signals(signum).name
            status = rd.read_status()  # this run's "running", not a finished run's record
            if status is not None and status.state == "running":
                rd.write_status("stopped", error=f"{name} before training started")
            raise Interrupted(f"stopped by {name} before training started", signum) from None


def _train(spec: RunSpec, rd: RunDir, address: Optional[str], progress: bool, resume: bool,
           latest: Optional[str], t_start: float, guard: SignalGuard,
           startup: Startup) -> dict[str, Any]:
    uri = tracking.resolve_uri(spec, rd.path) if spec.tracking.enabled else ""
    if uri:
        tracking.check_reachable(uri)
    fault = parse_fault(rd)
    step_delay = parse_step_delay()
    delay_replica = parse_step_delay_replica(spec.max_dp)
    datasets, vocab_size, use_gpu = _prepare(spec, address, guard, startup)
    if resume:
        _prepare_resume(spec, rd, latest, vocab_size, datasets[0].tokenizer.to_json())
    startup.release()  # every check has passed: the phases so far show, then each as it ends
    _open_run_dir(spec, rd, datasets, resume, startup)
    rd.drop_torn_line()  # before the offset the progress follows from is taken
    earlier, _ = rd.read_metrics()
    tracker: Optional[tracking.Tracker] = None
    follower: Optional[Follower] = None
    outcome: dict[str, Any] = {}
    offset = rd.metrics_size()  # before the workers start: every row they write is followed
    try:
        try:  # from here a stop ends the MLflow run too
            thread = _fit_thread(spec, rd, datasets, vocab_size, use_gpu, fault, step_delay,
                                 guard, outcome, t_start, startup.board.key,
                                 must_load=resume and latest is not None,
                                 delay_replica=delay_replica)
            # The worker group starts (seconds) while MLflow sets up its run (seconds too).
            thread.start()
            tracker = _tracker(spec, rd, uri, resume, earlier, thread)
            follower = Follower(rd, spec, tracker, progress, len(earlier), startup, offset)
            follower.follow(thread, guard)
            guard.settle()  # fit() has ended: the records are written whatever comes now
        except Stopped:  # a signal before the workers trained, a second one, or workers
            end_ray()    # that did not stop in time
            try:  # the job's actors may write for a moment after the driver let go of them
                rd.wait_until_quiet(quiet_s=1.0, timeout_s=10.0)
            except ConfigError:
                pass
            if follower is not None:
                follower.poll()  # what the workers wrote before they went
        except BaseException:  # anything else: the MLflow run ends FAILED, not RUNNING
            if tracker is not None:
                tracker.abandon()
            raise
    finally:  # this run's GCS keys, however it ends
        if guard.flag is not None:
            outcome["failed"] = guard.flag.failure()  # the workers' own word, if any
            guard.flag.clear()
        startup.board.clear()
    rows, events = (follower.rows, follower.events) if follower else ([], [])
    if follower:
        follower.close()
    return _finish(spec, rd, earlier + rows, events, tracker, outcome, t_start, guard.signum,
                   startup)


def _tracker(spec: RunSpec, rd: RunDir, uri: str, resume: bool, earlier: list,
             thread: threading.Thread) -> Optional[tracking.Tracker]:
    """The run's MLflow tracker, set up while the worker group starts. If that fails (the
    store was reachable a moment ago), the workers started for nothing end with the job's
    Ray connection, and the run fails in one line."""
    if not uri:
        return None
    tracker = None
    try:
        tracker = tracking.Tracker(spec, rd.path, resume=resume)
        tracker.log_artifact(rd.config)
        tracker.backfill(earlier)
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; one line for each
        if tracker is not None:
            tracker.abandon()
        end_ray()
        thread.join(timeout=30)
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        rd.write_status("failed", error=f"MLflow: {cause}")
        raise RuntimeError(f"training failed: MLflow at {uri}: {cause}") from e
    log.info("MLflow run %s at %s", tracker.run_id, tracker.uri)
    return tracker


def _shard_cache(spec: RunSpec, path: str) -> Optional[str]:
    """Where workers keep copies of a remote dataset's shards: under data.cache_dir when set
    (else the default under HOME, chosen by the reader). A local dataset is read in place."""
    if spec.data.cache_dir and is_uri(path):
        return str(Path(spec.data.cache_dir).expanduser() / "shards")
    return None


def _fit_thread(spec: RunSpec, rd: RunDir, datasets: list[PreparedDataset], vocab_size: int,
                use_gpu: bool, fault: Any, step_delay: Optional[float], guard: SignalGuard,
                outcome: dict[str, Any], t_start: float, startup_key: str,
                must_load: bool = False, delay_replica: Optional[int] = None
                ) -> threading.Thread:
    """The thread that runs Ray Train's fit(), its result or error into outcome. From here
    on a signal asks the workers to stop. must_load (a --resume that found checkpoints):
    workers none of whose checkpoints loads fail rather than train from step 0."""
    storage, name, root = checkpoint_root(spec, rd.path)
    flag = StopFlag()
    shards, ps = [], None
    if spec.parallel.dp_mode == "ps":
        # The parameter server's actors belong to this driver: they end with it (and
        # stop_shards ends them with the run); the workers of every group reach them
        # through the handles in their config.
        plan = ps_mod.plan_shards(spec, vocab_size)
        shards = ps_mod.start_shards(spec, plan)
        ps = {"shards": shards, "plan": plan}
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.to_dict(), "vocab_size": vocab_size,
                "tokenizer_json": datasets[0].tokenizer.to_json(),
                # Each rank reads its own blocks' shards: no corpus passes through here.
                "dataset": mixture.worker_dataset(datasets, spec.data,
                                                  lambda path: _shard_cache(spec, path)),
                "checkpoint_root": root, "fault": fault.to_json() if fault else None,
                "step_delay_s": step_delay, "step_delay_replica": delay_replica,
                "stop_flag": flag, "startup_key": startup_key, "must_load": must_load, "ps": ps,
            },
            scaling_config=scaling_config(spec, use_gpu),
            run_config=_run_config(spec, rd, storage, name, t_start))
    except BaseException:  # no fit() will run, whose end would stop the server's actors
        ps_mod.stop_shards(shards)
        raise

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            outcome["error"] = e
        finally:
            ps_mod.stop_shards(shards)

    guard.training(flag)
    return threading.Thread(target=fit, daemon=True)


def _run_config(spec: RunSpec, rd: RunDir, storage: str, name: str,
                t_start: float) -> RunConfig:
    # The same storage_path and name as before make Ray Train pick up the run's
    # registered checkpoints (its checkpoint_manager_snapshot.json): that is --resume.
    return RunConfig(
        name=name, storage_path=storage,
        # A node Ray drains for preemption (with notice: raypar saves at once) is charged to
        # Ray Train's own preemption budget, never to checkpoint.max_failures; there is no
        # limit to how often a spot cluster may reclaim nodes.
        failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures,
                                     max_preemption_failures=-1),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        callbacks=[MetricsSink(str(rd.path.resolve()), t_start,
                               elastic=spec.parallel.elastic.enabled)])


def root_cause(err: BaseException) -> str:
    """One line for a failed fit(): the exception at the bottom of Ray Train's wrappers (a
    worker's, the lowest rank's; or the controller's), as `Type: message`."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        causes = [_innermost(failures[rank]) for rank in sorted(failures)]
        # A rank that died takes its peers' collectives down with it: name the rank whose
        # failure is not one of those echoes, when there is one.
        err = next((c for c in causes if not _collective_echo(c)), causes[0])
    else:
        err = _innermost(getattr(err, "controller_failure", None) or err)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        lines = lines[-1:]  # a traceback as text: its last line is the error itself
    text = lines[0] if lines else ""
    name = type(err).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _innermost(err: BaseException) -> BaseException:
    """Down Ray's wrappers: a task error's .cause, a health check's failure, __cause__."""
    seen = {id(err)}
    while True:
        inner = (getattr(err, "cause", None) or getattr(err, "health_check_failure", None)
                 or err.__cause__)
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return err
        err, _ = inner, seen.add(id(inner))


def _collective_echo(err: BaseException) -> bool:
    text = str(err)
    return type(err).__name__ == "DistBackendError" or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer"))


def _finish(spec: RunSpec, rd: RunDir, rows: list[StepRow], events: list[Record],
            tracker: Optional[tracking.Tracker], outcome: dict[str, Any],
            t_start: float, signum: Optional[int], startup: Startup) -> dict[str, Any]:
    if outcome.get("failed"):  # the workers ended for a reason the user is to mend: they
        # trained nothing (no checkpoint of a --resume loads), so there is nothing to sum up
        message = outcome["failed"].replace("<run dir>", str(rd.path))
        log.error("training failed: %s", message)
        if tracker:
            tracker.finish("FAILED")
        rd.write_status("failed", error=message)
        raise ConfigError(message)
    complete = bool(rows) and rows[-1].step == spec.train.steps
    ok = "error" not in outcome and complete
    stopped = signum is not None and not ok
    summary = summarize(rows, events, rd, tracker, time.time() - t_start)
    summary.startup = startup.profile() or None
    if summary.startup:
        log.info("start-up profile (s): %s", json.dumps(summary.startup))
        if tracker:
            tracker.log_metrics(startup.metrics())
    layout_report(spec, rd, summary, tracker)
    if tracker:
        finish_tracking(tracker, rd, rows, "FINISHED" if ok else "KILLED" if stopped
                        else "FAILED")
    if stopped:
        step, name = rows[-1].step if rows else 0, signal.Signals(signum).name
        rd.write_status("stopped", error=f"{name} at step {step}")
        raise Interrupted(f"stopped by {name} at step {step} of {spec.train.steps}; continue "
                          f"with: raypar train --resume {rd.path}", signum)
    if not ok:
        err = outcome.get("error")
        cause = root_cause(err) if err is not None else "incomplete"
        if err is not None:  # the whole story, for whoever reads run.log
            log.error("training failed: %s", cause, exc_info=err)
        rd.write_status("failed", error=cause)
        raise RuntimeError(f"training failed: {cause}") from err
    rd.write_summary(summary)
    rd.write_status("finished")
    return summary.to_json()
