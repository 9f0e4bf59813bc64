"""The step loop that Ray Train runs in every worker (a Ray actor), again after every restart.

The driver (raypar/train/driver.py) passes `config`, a dict:

    spec            RunSpec.to_dict() of the run (resolved here to this worker group's layout)
    vocab_size      int: the model's (padded) vocabulary size
    tokenizer_json  str: the tokenizer, saved into every checkpoint's metadata
    dataset         {"path": str, "cache_dir": str | None, "cache_bytes": int | None}:
                    the prepared dataset (raypar/data/shards.py) each rank reads its own
                    blocks from. path: the dataset directory, local or a pyarrow URI
                    (s3://, gs://); cache_dir: the node-local shard cache shared by the
                    node's ranks (None: local shards are read in place, remote ones through
                    ~/.cache/raypar/shards); cache_bytes: the cache's soft size bound (None:
                    unbounded). Missing keys read as None; path is required.
    checkpoint_root str: where the run's checkpoints are listed
    ps              with parallel.dp_mode=ps: {"shards": the parameter server's actor
                    handles, "plan": which rows each holds} (raypar/parallel/ps.py)
    fault, step_delay_s, step_delay_replica, stop_flag  optional: fault injection
                    (faults.py), a sleep after every step (tests; on every replica, or on
                    the one step_delay_replica), the driver's StopFlag actor (stopping.py)

Each worker resolves its layout, loads the newest valid checkpoint, and then loops: one
optimizer step, an evaluation when due; then, where the replicas meet (every step, but
only at local SGD's syncs and at a stale parameter server's window ends: see
RankTrainer.meets), the mean of the rows since the last meeting over the replicas, one
flag exchange with every rank, and whatever the flags decided (land a background save,
save, report, stop). Each collaborator owns its
cadence: RankTrainer (raypar/train/trainer.py) the step and its data, Saver (saver.py) the
checkpoints, Reporter (below) the reports, raypar/train/control.py the agreement between
ranks.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from typing import Any, Collection, Optional

import ray
import ray.train
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from torch.distributed.tensor import DTensor

from raypar.config import from_dict
from raypar.data.blocks import open_mixture, open_splits
from raypar.train import checkpoint as ckpt
from raypar.train import control, faults
from raypar.train.control import SIGTERM, Groups, StepFlags, StepPlan
from raypar.train.records import (TIMELINE_STEP, CheckpointEvent, RankInfo, StartRecord,
                                  StepRow, Timeline, WorkerReport)
from raypar.train.saver import Saver
from raypar.train.startup import StartupBoard, process_started
from raypar.train.stopping import StopPoll
from raypar.train.trainer import RankTrainer

log = logging.getLogger("raypar")

# Ray Train's controller takes one report per worker every health-check interval (2 s by
# default; the worker's result queue holds one), so a report per step would cap training at
# half a step per second. Rows are batched instead and sent at most this often.
REPORT_INTERVAL_S = 2.0


class Reporter:
    """Batches this rank's reports to the driver, and remembers what may not have arrived:
    Ray's worker-side queue holds one report, so every earlier one has reached the driver,
    but the last one sent may still die with the worker."""

    def __init__(self, taken: Collection[str] = ()):
        self.taken = set(taken)  # checkpoint folders in storage when this group started
        self.next = WorkerReport()  # what goes with the next report
        self.unconfirmed: list[StepRow] = []
        self.last_sent = time.perf_counter()
        self.notice: Optional[Any] = None  # Ray Train's preemption notice, once given
        self.placed = False  # this group's placement and memory (rank_info) are queued

    def due(self) -> bool:
        return time.perf_counter() - self.last_sent >= REPORT_INTERVAL_S

    def unsent(self) -> list[StepRow]:
        """Every row the driver may not have yet."""
        return self.unconfirmed + self.next.rows

    def send(self, checkpoint: Optional[Any], step: int,
             timings: list[CheckpointEvent]) -> None:
        report, self.next = self.next, WorkerReport()
        report.checkpoints = timings
        # NO_UPLOAD: the ranks wrote the checkpoint into Ray Train's storage themselves
        # (raypar/train/saver.py); Ray Train registers it where it is.
        self.notice = control.report(report.to_json(), checkpoint=checkpoint,
                                     checkpoint_dir_name=ckpt.dir_name(step, self.taken),
                                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD
                                     ) or self.notice
        self.unconfirmed, self.last_sent = report.rows, time.perf_counter()


def rank_info(trainer: RankTrainer, end: bool = False) -> RankInfo:
    """What the driver shows and logs per rank: placement, stages and memory (with `end`,
    sent again after the run's last step, also the peak memory of the whole run)."""
    c = trainer.pm.coords
    return RankInfo(
        rank=dist.get_rank(), dp=c.dp, pp=c.pp, tp=c.tp, stages=trainer.stage_indices,
        layers=[sorted(int(k) for k in m.layers.keys()) for m in trainer.plain],
        node=ray.train.get_context().get_node_rank(), node_ip=ray.util.get_node_ip_address(),
        node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid(),
        block_param_bytes=sum((p.to_local() if isinstance(p, DTensor) else p).nbytes
                              for m in trainer.plain for n, p in m.named_parameters()
                              if n.startswith("layers.")),
        rss_init_bytes=trainer.rss_init,
        rss_peak_bytes=trainer.rss_first_step or peak_rss_bytes(),
        rss_end_bytes=peak_rss_bytes() if end else None,
        rss_anon_bytes=trainer.anon_first_step, rss_anon_start_bytes=trainer.anon_start,
        rss_base_bytes=trainer.rss_base, load_s=trainer.load_s,
        load_bytes=trainer.load_stats.bytes if trainer.load_stats is not None else None,
        **(trainer.memory or {}))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anon_rss_bytes() -> Optional[int]:
    """This process's resident memory of its own now (Linux's RssAnon): without the pages of
    memory-mapped files, such as the dataset shards a rank reads, which the kernel may drop
    and read again at any time. None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_checkpoint(root: str) -> tuple[Optional[str], list[list[str]], list[str]]:
    """The newest checkpoint under root that verifies; each newer one that does not is
    skipped with a warning. Returns (path or None, [[skipped path, reason], ...], the
    names of every checkpoint folder there: a new save never reuses one, ckpt.dir_name).

    Why the storage listing and not only `ray.train.get_checkpoint()`: Ray Train
    registers a checkpoint when its controller collects the report, up to one health
    check after the checkpoint is written; a worker that dies in between takes a complete
    checkpoint out of Ray's list. Such a checkpoint verifies, and it carries every
    metrics row the driver may not have had (train_state.json "rows"), so no row is lost."""
    skipped: list[list[str]] = []
    # Sizes against the manifests only: each byte a rank loads is hashed as it is read
    # (ckpt.Source), and a checkpoint that fails there is skipped then (_load_newest).
    path = ckpt.latest_valid(root, log, skipped, hashes=False)
    taken = [ckpt.storage.basename(c) for c in ckpt.candidates(root)]
    return (str(path) if path is not None else None), skipped, taken


class NoCheckpointLoads(RuntimeError):
    """A --resume whose checkpoints all failed as they were read (their sizes matched):
    training from step 0 would be a new run, which only --restart starts. The workers
    end (StopFlag.fail) and the driver shows it as a user error, in one line."""


def _load_newest(config: dict[str, Any], groups: Groups, trainer: RankTrainer,
                 choice: tuple[Optional[str], list[list[str]], list[str]], rebuild: Any
                 ) -> tuple[RankTrainer, tuple[Optional[str], list[list[str]], list[str]],
                            dict[str, Any], float]:
    """Load the chosen checkpoint. One whose bytes do not match its manifests (checked as
    they are read) is skipped with a warning naming it and the file, like one that fails
    the size check, and the next older one is tried. Every training rank agrees: DCP's load
    fails on all of them together, and each rank's own failures (its RNG file) are
    gathered. A trainer that loaded part of a skipped checkpoint and has nothing older to
    load is built again (rebuild()), so it starts from step 0 as a fresh one would.
    Returns the trainer, the choice as it ended, the saved train state, the load's seconds."""
    path, skipped, taken = choice
    t_load = time.perf_counter()
    touched = False
    while path is not None:
        reason, saved = None, {}
        try:
            saved = trainer.load(path)
        except ckpt.CorruptCheckpoint as e:
            reason = str(e)
        reasons: list[Optional[str]] = [None] * groups.n_active
        dist.all_gather_object(reasons, reason, group=groups.active)
        reason = next((r for r in reasons if r), None)
        if reason is None:
            return trainer, (path, skipped, taken), saved, time.perf_counter() - t_load
        touched = True
        if dist.get_rank() == 0:
            log.warning("checkpoint %s skipped: %s", path, reason)
            skipped.append([path, reason])
            older = ckpt.latest_valid(config["checkpoint_root"], log, skipped, hashes=False,
                                      older_than=path)
            box = [(str(older) if older is not None else None, skipped)]
        else:
            box = [None]
        dist.broadcast_object_list(box, src=0, group=groups.active)
        path, skipped = box[0]
    if config.get("must_load") and taken:
        # The driver found a checkpoint whose files have their sizes; none loaded here.
        raise NoCheckpointLoads(
            f"--resume: none of the {len(taken)} checkpoints under {config['checkpoint_root']} "
            f"loads ({'; '.join(f'{p}: {r}' for p, r in skipped) or 'none found'}); to train "
            f"again from step 0, with the old records moved aside: raypar train --resume "
            f"<run dir> --restart")
    if touched:
        trainer.close()
        trainer = rebuild()
    return trainer, (None, skipped, taken), {}, time.perf_counter() - t_load


def _start(groups: Groups, trainer: RankTrainer, started: float,
           choice: tuple[Optional[str], list[list[str]], list[str]],
           saved: dict[str, Any], load_s: float) -> Reporter:
    """The first report says where this worker group starts (the driver tells a restart
    from a fresh start and counts the steps redone), and the checkpoint's own rows go out
    again: that report may have died with a worker before Ray collected it (the driver
    skips the steps it knows)."""
    path, skipped, taken = choice
    reporter = Reporter(taken)
    reporter.next.start = StartRecord(
        checkpoint=path, from_step=trainer.step, skipped=skipped, started=started,
        loaded=time.time(), load_s=load_s,
        saved_layout=saved.get("layout"), layout=trainer.layout(),
        workers=dist.get_world_size(), sitting_out=dist.get_world_size() - groups.n_active)
    reporter.next.rows = [StepRow.from_json(r) for r in saved.get("rows", [])]
    return reporter


def _step(trainer: RankTrainer, reporter: Reporter, config: dict[str, Any]) -> StepRow:
    """One optimizer step and what it measured, queued for the next report (its loss this
    replica's own until the next meeting agrees on it: RankTrainer.agree)."""
    pipe = trainer.pipeline
    timeline = pipe is not None and trainer.step + 1 == TIMELINE_STEP
    if timeline:
        pipe.record_timeline = True
    row = trainer.train_step(agree=False)
    if not reporter.placed:  # after this worker group's first step, which measures memory
        trainer.rss_first_step, trainer.anon_first_step = peak_rss_bytes(), anon_rss_bytes()
        reporter.next.rank_info, reporter.placed = rank_info(trainer), True
    if trainer.step == trainer.spec.train.steps:  # the run's last step: its whole peak
        reporter.next.rank_info = rank_info(trainer, end=True)
    if timeline:
        pipe.record_timeline = False
        reporter.next.timeline = Timeline(pipe.timeline, pipe.step_start, pipe.step_end)
    if trainer.eval_due():
        row.val_loss = trainer.evaluate(agree=False)
    reporter.next.rows.append(row)
    delay = faults.delays(config, trainer.pm.coords.dp, trainer.step, trainer.pm.dp)
    if delay:
        time.sleep(delay)
    for phase in ("step", "sigterm"):
        faults.fire(config.get("fault"), dist.get_rank(), trainer.step, phase, SIGTERM.is_set)
    if trainer.ps is not None and dist.get_rank() == 0:
        faults.fire_ps(config.get("fault"), trainer.step, trainer.ps.shards)
    return row


DATASET_KEYS = ("path", "sources", "cache_dir", "cache_bytes")


def data_sources(config: dict[str, Any], seq_len: int) -> tuple[Any, Any]:
    """This worker's train and val blocks: the splits of config["dataset"], one dataset's
    ('path') or a mixture's ('sources': [{path, weight, name}]), opened here: the manifests
    only; each rank then fetches just the shards its blocks need."""
    dataset = config.get("dataset") or {}
    unknown = sorted(set(dataset) - set(DATASET_KEYS))
    if unknown or bool(dataset.get("path")) == bool(dataset.get("sources")):
        raise ValueError(f"config['dataset']: needs 'path' or 'sources' and allows "
                         f"{DATASET_KEYS}, got {sorted(dataset)}")
    if dataset.get("sources"):
        return open_mixture(dataset["sources"], seq_len, dataset.get("cache_dir"),
                            dataset.get("cache_bytes"))
    return open_splits(str(dataset["path"]), seq_len, dataset.get("cache_dir"),
                       dataset.get("cache_bytes"))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker (again after every restart)."""
    started = time.time()
    # This process's own memory before raypar opens anything: a Ray worker process may be
    # reused, and keep what earlier tasks (a dataset's preparation) left in its heap.
    anon_start = anon_rss_bytes()
    control.watch_sigterm()
    spec = control.resolve_layout(from_dict(config["spec"]), dist.get_world_size())
    groups = Groups.build(spec)
    rank = dist.get_rank()
    board = StartupBoard(config.get("startup_key")) if rank == 0 else None
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if board:
        # This process's own start: where Ray Train's controller, placement and process
        # launch end, and the worker's imports and set-up begin.
        born = process_started()
        board.mark("placement", f"Ray Train's controller and {len(nodes)} worker processes "
                                f"started", at=born)
        setup = f"imports and Ray Train's set-up {started - born:.1f} s, " if born else ""
        board.mark("workers", f"{len(nodes)} on {len(set(nodes))} node(s): {setup}raypar's "
                              f"process groups and mesh {time.time() - started:.1f} s")
    choice = control.broadcast(choose_checkpoint(config["checkpoint_root"]) if rank == 0 else None)
    if groups.mesh is None:
        control.sit_out(groups)
        return
    train, val = data_sources(config, spec.data.seq_len)

    def build(pretrained: bool = True) -> RankTrainer:
        base = peak_rss_bytes()  # Ray's worker, torch, the process groups, the data opened
        built = RankTrainer(spec, config["vocab_size"], train, val, groups,
                            pretrained=pretrained, ps=config.get("ps"))
        built.rss_base, built.rss_init = base, peak_rss_bytes()
        built.anon_start = anon_start
        return built

    # model.init_from's weights are step 0's: a group that loads a checkpoint does not read
    # them (one that finds no loadable checkpoint after all is built again, with them).
    trainer = build(pretrained=choice[0] is None)
    if board:
        p = spec.parallel
        board.mark("model", f"built and parallelized (dp={p.dp} pp={p.pp} tp={p.tp} "
                            f"{p.dp_mode}), data opened")
    try:
        try:
            trainer, choice, saved, load_s = _load_newest(config, groups, trainer, choice,
                                                          build)
        except NoCheckpointLoads as e:  # every training rank raises it, together
            if config.get("stop_flag") is None:
                raise
            if rank == 0:
                config["stop_flag"].fail(str(e))
            # The ranks that sit out (an elastic group's spares) wait in the control
            # exchange: one last one, that says stop, and the closing barrier release them.
            StepFlags().exchange()
            if rank == 0:
                control.share_plan(0, True, groups)
            control.barrier()
            return  # every rank ends without an error: Ray Train has nothing to retry
        if choice[0] is not None:
            trainer.load_s = load_s
        if trainer.ps is not None:
            trainer.start_ps()  # the parameter server, reset from what this group holds
        _train(config, spec, groups, trainer, started, choice, saved, load_s, board)
    finally:
        trainer.close()


def _train(config: dict[str, Any], spec, groups: Groups, trainer: RankTrainer, started: float,
           choice: tuple[Optional[str], list[list[str]], list[str]], saved: dict[str, Any],
           load_s: float, board: Optional[StartupBoard] = None) -> None:
    """The step loop, after the trainer is built; returns when the run (or this group)
    is done."""
    rank = dist.get_rank()
    meta = {"model": vars(trainer.mcfg), "spec": config["spec"],
            "tokenizer": config["tokenizer_json"], "layout": dataclasses.asdict(spec.parallel)}
    saver = Saver(spec, trainer, groups, meta, config.get("fault"))
    reporter = _start(groups, trainer, started, choice, saved, load_s)
    if board and choice[0] is not None:
        board.mark("checkpoint", f"loaded {ckpt.storage.basename(choice[0])} (step "
                                 f"{trainer.step})")
    notice_saved = False
    stop_asked = StopPoll(config.get("stop_flag") if rank == 0 else None)
    flags = StepFlags()
    plan = StepPlan(land=False, save=False, sync=True, report=False,
                    stop=trainer.step >= spec.train.steps)
    pending: list[StepRow] = []  # rows since the replicas last met
    meetings = 0
    while not plan.stop:
        pending.append(_step(trainer, reporter, config))
        if board:
            board.mark("first step", f"step {trainer.step} trained")
            board = None
        if not (trainer.meets() or saver.due()):
            # Local SGD between syncs, a stale parameter server within its window: no
            # collective over the replicas, so a slow one holds nobody up here. Whatever
            # the flags would say (a report due, a stop, a SIGTERM) waits for the meeting.
            continue
        trainer.agree(pending)
        pending, meetings = [], meetings + 1
        if reporter.next.rank_info is not None:
            reporter.next.rank_info.meetings = meetings
        notice = rank == 0 and reporter.notice is not None and not notice_saved
        flags = StepFlags(report_due=rank == 0 and reporter.due(),
                          save_landed=rank == 0 and saver.landed(), notice=notice,
                          stop=stop_asked()).exchange()
        if flags.notice:
            notice_saved = True
            if rank == 0:
                log.warning("preemption notice at step %d: %s; saving a checkpoint",
                            trainer.step, reporter.notice)
        last = trainer.step == spec.train.steps
        plan = StepPlan.decide(flags, saver.due(), last, saver.inflight is not None,
                               spec.checkpoint.async_save,
                               save_on_stop=spec.checkpoint.every > 0)
        if rank == 0:
            control.share_plan(plan.n_reports, plan.stop, groups)
        if plan.land:
            reporter.send(*saver.land(), saver.take_timings())
        checkpoint = (saver.save(reporter.unsent(), plan.sync, reporter.taken) if plan.save
                      else None)
        if plan.report:
            reporter.send(checkpoint, trainer.step, saver.take_timings())
    if not reporter.next.empty():
        # Resumed from the final checkpoint: nothing left to train, but its rows and the
        # start record still go to the driver (every rank holds the same, so all report).
        control.barrier()
        if rank == 0:
            control.share_plan(1, True, groups)
        reporter.send(None, trainer.step, saver.take_timings())
    # Every rank has written its part of the last checkpoint before any of them exits.
    control.barrier()
    if trainer.step < spec.train.steps and not flags.stop:  # (the driver's stop: return)
        if SIGTERM.is_set():
            control.exit_after_sigterm()
        raise control.Preempted(f"a worker received SIGTERM at step {trainer.step}: saved the "
                                f"checkpoint {ckpt.dir_name(trainer.step)}; restarting from it")
