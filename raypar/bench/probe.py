"""Measurements inside one Ray Train worker group, for the layouts `raypar bench` compares.

A raypar run starts a worker group (seconds on a small machine); the bench compares a
dozen layouts, so one group of workers builds raypar's own per-rank `RankTrainer` for each
layout in turn and times its `train_step`: the same model, parallel wrappers, pipeline
schedules and optimizer step as a run, without the run's checkpoint and report plumbing
(which the bench measures in whole runs). Ranks beyond a layout's size wait it out.

Each job: {"name", "spec" (RunSpec.to_dict()), "warmup", "steps", "profile" (time the
collectives of one step), "timeline" (record each timed step's pipeline timeline, on the
processes' common wall clock), "curve" (instead of timing: each of `steps` steps' loss,
gradient norm, blocks and, when due, validation loss, as a run records them; the layout
parity tests compare these with one process), "digest" (with curve: each step's sha256 of
the rank's parameters, which the local SGD tests compare across replicas)}.
Rank 0 leaves [{"name", "ranks": [per-rank result]}] in the driver's Mailbox actor, which
`run_probe` returns.
"""
from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from raypar.config import from_dict
from raypar.parallel.timeline import covered_length
from raypar.train.control import Groups
from raypar.train.trainer import RankTrainer

# Profiler event names of torch.distributed collectives and point-to-point transfers:
# c10d ops (DDP's bucket all-reduce, DTensor's functional collectives and their waits,
# the pipeline's send/recv) and gloo's own records.
COMM = re.compile(r"all_?reduce|all_?gather|reduce_?scatter|broadcast|wait_tensor|"
                  r"all_to_all|send|recv|barrier|gloo", re.I)


def _profiled_step(worker) -> tuple[float, float]:
    """(step seconds, seconds inside communication) of one profiled train_step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        worker.train_step()
        step_s = time.perf_counter() - t0
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if COMM.search(e.name)]
    return step_s, covered_length(spans) / 1e6


def _measure(worker, job: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"rank": dist.get_rank(), "step_s": [], "timelines": [],
                           "comm_bytes": []}
    for _ in range(job.get("warmup", 1)):
        worker.train_step()
    out["memory"] = dict(worker.memory or {})
    pipe = worker.pipeline
    for _ in range(job["steps"]):
        if pipe is not None and job.get("timeline"):
            pipe.record_timeline = True
        t0 = time.perf_counter()
        row = worker.train_step()
        out["step_s"].append(time.perf_counter() - t0)
        out["comm_bytes"].append(row.comm_bytes)  # a replica's bytes to the dp collectives
        if pipe is not None and job.get("timeline"):
            pipe.record_timeline = False
            # The driver puts the ranks' timelines of each step together (pipeline_bubble).
            out["timelines"].append({"events": pipe.timeline, "start": pipe.step_start,
                                     "end": pipe.step_end})
    if job.get("profile"):
        out["profiled_step_s"], out["comm_s"] = [], []
        for _ in range(job.get("profile_steps", 2)):
            step_s, comm_s = _profiled_step(worker)
            out["profiled_step_s"].append(step_s)
            out["comm_s"].append(comm_s)
    return out


def _param_digest(worker) -> str:
    """sha256 of this rank's parameters (its shards) after the step: replicas that agree
    hold the same bytes."""
    h = hashlib.sha256()
    for m in worker.plain:
        for name, p in m.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            h.update(name.encode())
            h.update(local.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _curve(worker, job: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for _ in range(job["steps"]):
        step = worker.train_step()
        row = {"step": step.step, "loss": step.loss, "grad_norm": step.grad_norm,
               "first_block": step.first_block, "last_block": step.last_block,
               "comm_bytes": step.comm_bytes}
        if job.get("digest"):
            row["param_digest"] = _param_digest(worker)
        if worker.eval_due():
            row["val_loss"] = worker.evaluate()
        rows.append(row)
    return {"rank": dist.get_rank(), "rows": rows, "memory": dict(worker.memory or {})}


def probe_loop(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for the bench's probe group."""
    torch.set_num_threads(1)
    train, val = ray.get(config["train_ref"]), ray.get(config["val_ref"])
    results = []
    for job in config["jobs"]:
        started = time.perf_counter()
        spec = from_dict(job["spec"])
        torch.set_num_threads(spec.train.threads)
        groups = Groups.build(spec)  # collective: every rank, inside the layout or not
        mine = None
        if groups.mesh is not None:
            worker = RankTrainer(spec, config["vocab_size"], train, val, groups)
            mine = _curve(worker, job) if job.get("curve") else _measure(worker, job)
            del worker
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results.append({"name": job["name"], "ranks": [g for g in gathered if g is not None],
                        "seconds": time.perf_counter() - started})
    if dist.get_rank() == 0:
        ray.get(config["mailbox"].put.remote(results))


@ray.remote(num_cpus=0)
class Mailbox:
    """Where rank 0 leaves the probe's results for the driver (a worker group's function
    returns nothing to the driver, and its reported metrics need not reach the Result)."""

    def __init__(self):
        self.value = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def run_probe(jobs: list[dict[str, Any]], vocab_size: int, train, val,
              storage_path: str, num_workers: int = 2) -> list[dict[str, Any]]:
    """Run the jobs in one Ray Train group of num_workers (train, val: the packed blocks);
    returns [{"name", "ranks", "seconds"}] in job order."""
    mailbox = Mailbox.remote()
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config={"jobs": jobs, "vocab_size": vocab_size, "mailbox": mailbox,
                           "train_ref": ray.put(train), "val_ref": ray.put(val)},
        scaling_config=ScalingConfig(num_workers=num_workers),
        run_config=RunConfig(name="probe", storage_path=storage_path))
    trainer.fit()
    results = ray.get(mailbox.get.remote())
    ray.kill(mailbox)
    return results
