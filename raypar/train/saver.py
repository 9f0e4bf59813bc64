"""Checkpoint saves, seen from one rank: when a save is due, writing it (now, or in the
background), the background save in flight, landing it, and the timing of each save.

    saver = Saver(spec, trainer, groups, meta, fault)
    checkpoint = saver.save(rows, sync=True, taken)   # a ray.train.Checkpoint to report
    saver.save(rows, sync=False, taken)               # in the background; later:
    checkpoint, step = saver.land()                   # once every rank has written its part

Every rank writes its shards straight into the checkpoint's folder in the run's storage
(Ray Train's own filesystem and path for it), so the checkpoint it reports is already where
Ray Train keeps it: reported with checkpoint_upload_mode=NO_UPLOAD, nothing is copied. A
background save writes to storage on DCP's thread; the step loop only stages the state
into host memory, and reports the checkpoint once every rank's part (manifest last) is
written.
"""
from __future__ import annotations

import time
from typing import Any, Collection, Optional

import ray.train
import torch.distributed as dist

from raypar.config import RunSpec
from raypar.train import checkpoint as ckpt
from raypar.train import faults
from raypar.train.control import SIGTERM, Groups
from raypar.train.records import CheckpointEvent, StepRow
from raypar.train.trainer import RankTrainer


class Saver:
    def __init__(self, spec: RunSpec, trainer: RankTrainer, groups: Groups,
                 meta: dict[str, Any], fault: Optional[dict[str, Any]] = None):
        self.spec, self.trainer, self.groups = spec, trainer, groups
        self.meta, self.fault = meta, fault
        self.rank = dist.get_rank()
        self.inflight: Optional[ckpt.PendingSave] = None
        self._inflight_started = 0.0
        # This group's saves; each is reported once its write time is known.
        self._events: list[CheckpointEvent] = []

    def due(self) -> bool:
        """A save is due at every checkpoint.every steps and at the last step."""
        step, every = self.trainer.step, self.spec.checkpoint.every
        return step == self.spec.train.steps or (every > 0 and step % every == 0)

    def landed(self) -> bool:
        """This rank's part of the background save is written."""
        return self.inflight is not None and self.inflight.done()

    def save(self, rows: list[StepRow], sync: bool,
             taken: Collection[str] = ()) -> Optional[ray.train.Checkpoint]:
        """Every rank writes its shard; rows are every metrics row the driver may not have
        yet (they travel with the checkpoint); taken: the checkpoint folders storage held
        when this group started (ckpt.dir_name). Returns the checkpoint to report now, or
        None when it is written in the background (reported once it lands)."""
        t = self.trainer
        state = {**t.train_state(), "rows": [r.to_json() for r in rows]}
        rng = {ckpt.rng_name(self.rank): ckpt.rng_state_bytes(), **t.extra_files()}
        started = time.perf_counter()
        run_storage = ray.train.get_context().get_storage()
        dest = (run_storage.storage_filesystem,
                run_storage.build_checkpoint_path_from_name(ckpt.dir_name(t.step, taken)))
        if not sync:
            self.inflight = ckpt.write_async(t.state_dict(), state, self.meta, rng, dest=dest,
                                             process_group=self.groups.save)
            self._inflight_started = started
            self._events.append(CheckpointEvent(step=t.step, mode="async",
                                                stall_s=time.perf_counter() - started))
            return None
        # The 'save' fault dies with this rank's shard in storage and its manifest not: a
        # crash in the middle of a save, which leaves a folder that does not verify.
        checkpoint = ckpt.save(t.state_dict(), state, self.meta, rng, dest=dest,
                               process_group=self.groups.active,
                               before_manifest=lambda: faults.fire(self.fault, self.rank, t.step,
                                                                   "save", SIGTERM.is_set))
        took = time.perf_counter() - started
        self._events.append(CheckpointEvent(step=t.step, mode="sync", save_s=took, stall_s=took))
        return checkpoint

    def land(self) -> tuple[ray.train.Checkpoint, int]:
        """The background save's checkpoint and step, once every rank has written its part."""
        waited = time.perf_counter()
        self.inflight.finish()
        writer = self.inflight.writer
        done = time.perf_counter()
        for event in self._events:  # its timing: written in (done - started) s, and the
            if event.step == self.inflight.step and event.save_s is None:  # wait for it
                event.save_s = done - self._inflight_started
                event.stall_s += done - waited
        step, self.inflight = self.inflight.step, None
        return ray.train.Checkpoint(writer.path, filesystem=writer.files.fs), step

    def take_timings(self) -> list[CheckpointEvent]:
        """The saves whose write time is known and not reported yet."""
        timed = [e for e in self._events if e.save_s is not None]
        self._events = [e for e in self._events if e.save_s is None]
        return timed
