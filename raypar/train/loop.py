"""The training loop that runs inside every Ray Train worker (a Ray actor).

The driver (raypar/train/trainer.py) passes `config` with the resolved RunSpec,
the vocabulary size and object refs to the packed train/val blocks. Each worker
builds the mesh, the model and the optimizer, then for every optimizer step
takes its data-parallel slice of the step's global batch, accumulates
gradients over micro-batches, clips by the global norm, steps, and reports
one metrics row through `ray.train.report`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Optional

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from raypar.config import RunSpec, choose_dp, from_dict, model_config
from raypar.data.packing import rank_slice, stream_indices
from raypar.model import GPT, GPTConfig, lm_loss, param_groups
from raypar.parallel.data import (apply_data_parallel, finish_gradient_sync, gradient_sync,
                                  unwrap)
from raypar.parallel.mesh import ParallelMesh, build_mesh, device_type
from raypar.parallel.pipeline import Pipeline, build_stage_modules, stage_ids, sync_tied_grads
from raypar.parallel.tensor import apply_tensor_parallel, grad_sq_norm, loss_context
from raypar.train import checkpoint as ckpt
from raypar.train.memory import ActivationMeter, state_bytes
from torch.distributed._composable import checkpoint as activation_checkpoint
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

log = logging.getLogger("raypar")

# Optimizer state flattened to one key per parameter ('state.<fqn>.exp_avg'): pipeline
# stages hold disjoint parameters, and nested param_groups lists would collide in DCP.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Loading: a tied head is filled through its embedding, so its own name may be absent.
LOAD_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


def lr_at(step: int, spec: RunSpec) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step."""
    t = spec.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


class Worker:
    """One rank's state: mesh, its stage modules (tensor-sharded, data-parallel wrapped),
    one optimizer per stage module, and its view of the data."""

    def __init__(self, spec: RunSpec, vocab_size: int, train_blocks: np.ndarray,
                 val_blocks: np.ndarray, groups: Optional["Groups"] = None):
        self.spec = spec
        torch.set_num_threads(spec.train.threads)
        p, t = spec.parallel, spec.train
        self.groups = groups or Groups.build(spec)
        self.pm: ParallelMesh = self.groups.mesh
        self.device = torch.device(device_type(), torch.cuda.current_device()
                                   if torch.cuda.is_available() else None)
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        self.mcfg = model_config(spec, vocab_size)
        self.n_micro = spec.grad_accum
        # The full model is built from the seed on every rank, then cut down to this
        # rank's stages and shards: every layout starts from the single-process weights.
        torch.manual_seed(t.seed)
        full = GPT(self.mcfg)
        virtual = p.virtual_stages if p.pp > 1 else 1
        self.stage_indices = stage_ids(self.pm.coords.pp, p.pp, virtual, p.schedule)
        self.n_stages = p.pp * virtual
        stages = build_stage_modules(full, self.pm.coords.pp, p.pp, virtual, p.schedule)
        del full
        self.modules: list[torch.nn.Module] = []
        for stage in stages:
            stage.to(self.device)
            apply_tensor_parallel(stage, self.pm.tp_mesh, p.sequence_parallel)
            if t.activation_checkpointing:
                for block in stage.layers.values():
                    activation_checkpoint(block)
            self.modules.append(apply_data_parallel(stage, self.pm, p.dp_mode))
        self.plain = [unwrap(m) for m in self.modules]
        # Which stage modules hold the last stage's own copy of a tied embedding.
        self.tied_copy = [any(self._tied_copy(m, n) for n, _ in m.named_parameters())
                          for m in self.plain]
        # One optimizer per stage module, so each one's state dict is keyed by the
        # model's global parameter names (checkpoints load under any layout).
        self.optimizers = [torch.optim.AdamW(
            self._param_groups(m), lr=t.lr,
            betas=(t.beta1, t.beta2), foreach=False) for m in self.plain]
        self.loss_ctx = lambda: loss_context(self.plain[-1])
        self.pipeline = None
        if p.pp > 1:
            self.pipeline = Pipeline(self.modules, self.stage_indices, self.n_stages,
                                     self.pm.pp_group, self.device, p.schedule, self.n_micro,
                                     self._loss_fn, loss_context=self.loss_ctx)
        # Dropout draws from the global RNG: reseed it per replica so masks differ.
        torch.manual_seed(t.seed + 1 + self.pm.coords.dp)
        self.step = 0
        self.tokens_seen = 0
        # Global stream position: blocks consumed so far by all replicas together. The next
        # step takes positions [position, position + global_batch) (raypar/data/packing.py).
        self.position = 0
        self.memory: dict[str, float] | None = None

    # -- one optimizer step ------------------------------------------------------------
    def _autocast(self):
        if self.spec.train.dtype == "bf16":
            return torch.autocast(device_type(), dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, targets)

    def _local_batch(self, blocks: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        mine = rank_slice(indices, self.pm.coords.dp, self.pm.dp)
        return torch.from_numpy(blocks[mine].astype(np.int64)).to(self.device)

    def _mean_over_dp(self, value: float) -> float:
        if self.pm.dp == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pm.dp_group)
        return t.item() / self.pm.dp

    def _forward_backward(self, batch: torch.Tensor) -> float:
        """Gradients of the mean loss over this rank's micro-batches; returns that loss."""
        if self.pipeline is not None:
            with self._autocast():
                return self.pipeline.step(batch[:, :-1], batch[:, 1:])
        model = self.modules[0]
        micro = batch.split(self.spec.train.micro_batch)
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            with gradient_sync(model, enabled=i == len(micro) - 1):
                with self.loss_ctx():
                    with self._autocast():
                        loss = self._loss_fn(model(mb[:, :-1]), mb[:, 1:])
                    (loss / len(micro)).backward()
            loss_sum += loss.item()
        return loss_sum / len(micro)

    def _clip(self) -> float:
        """Clip by the norm of the whole model's gradient: every shard and stage, the
        replicated and tied parameters counted once (the same formula in every layout)."""
        params = []
        for m in self.plain:
            params += [p for name, p in m.named_parameters()
                       if p.grad is not None and not self._tied_copy(m, name)]
        sq = grad_sq_norm(params).to(torch.float64)
        if self.pm.pp > 1:
            dist.all_reduce(sq, group=self.pm.pp_group)
        norm = sq.sqrt().item()
        max_norm = self.spec.train.grad_clip
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))
            with torch.no_grad():
                for m in self.plain:
                    for p in m.parameters():
                        if p.grad is not None:
                            p.grad.mul_(coef)
        return norm

    def _param_groups(self, module: torch.nn.Module) -> list[dict]:
        """model.param_groups, except that a pipeline stage's own copy of a tied embedding
        stays out of weight decay like the embedding it mirrors."""
        groups = param_groups(module, self.spec.train.weight_decay)
        copy = [p for n, p in module.named_parameters() if self._tied_copy(module, n)]
        if copy:
            groups[0]["params"] = [p for p in groups[0]["params"] if p is not copy[0]]
            groups[1]["params"].append(copy[0])
        return groups

    def _tied_copy(self, module: torch.nn.Module, name: str) -> bool:
        """The last stage's own copy of a tied embedding (its gradient equals the first stage's)."""
        return (self.mcfg.tie_embeddings and name == "lm_head.weight"
                and getattr(module, "tok_emb", None) is None)

    def train_step(self) -> dict[str, Any]:
        spec, t = self.spec, self.spec.train
        lr = lr_at(self.step, spec)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        t_data = time.perf_counter()
        indices = stream_indices(self.position, t.global_batch, len(self.train_blocks), t.seed)
        batch = self._local_batch(self.train_blocks, indices)
        data_s = time.perf_counter() - t_data  # the step's wait for its input
        for m in self.modules:
            m.train()
        measure = self.memory is None
        meter = ActivationMeter() if measure else contextlib.nullcontext()
        with meter:
            loss = self._forward_backward(batch)
        finish_gradient_sync(self.plain)
        if self.pipeline is not None:
            sync_tied_grads(self.plain, self.pm.pp_group)
        grad_norm = self._clip()
        for opt in self.optimizers:
            opt.step()
        if measure:
            self.memory = {**state_bytes(self.plain, self.optimizers),
                           "activation_peak_bytes": meter.peak}
            if torch.cuda.is_available():
                self.memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.position += t.global_batch
        self.tokens_seen += t.global_batch * spec.data.seq_len
        row = {"step": self.step, "loss": self._mean_over_dp(loss),
               "lr": lr, "grad_norm": grad_norm, "time": time.time(), "dp": self.pm.dp,
               "first_block": int(indices[0]), "last_block": int(indices[-1]),
               "data_s": data_s}
        if t.log_blocks:
            row["blocks"] = indices.tolist()
        return row

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed set of validation blocks (the same at every evaluation)."""
        t = self.spec.train
        n_val = len(self.val_blocks)
        for m in self.modules:
            m.eval()
        total, count = 0.0, 0
        for b in range(t.eval_batches):
            indices = np.arange(b * t.global_batch, (b + 1) * t.global_batch) % n_val
            batch = self._local_batch(self.val_blocks, indices)
            with self._autocast():
                if self.pipeline is not None:
                    total += self.pipeline.eval(batch[:, :-1], batch[:, 1:])
                    count += 1
                    continue
                for mb in batch.split(t.micro_batch):
                    with self.loss_ctx():
                        total += self._loss_fn(self.modules[0](mb[:, :-1]), mb[:, 1:]).item()
                    count += 1
        return self._mean_over_dp(total / count)

    # -- checkpoints -------------------------------------------------------------------
    def _module_state(self, i: int) -> dict[str, dict[str, Any]]:
        """Stage module i's {'model', 'optim'} under checkpoint names: the model's global
        parameter names, except that a last stage's copy of a tied embedding goes by the
        embedding's name (the two are equal, and so are their optimizer states), so that a
        checkpoint looks the same whatever pp it was saved under."""
        msd, osd = get_state_dict(self.modules[i], self.optimizers[i], options=STATE_DICT_OPTIONS)
        if self.mcfg.tie_embeddings and "tok_emb.weight" in msd:
            msd.pop("lm_head.weight", None)  # the same tensor under its second name
        state = {"model": msd, "optim": osd}
        return _rename(state, "lm_head.weight", "tok_emb.weight") if self.tied_copy[i] else state

    def state_dict(self) -> dict[str, Any]:
        """{'model': ..., 'optim': ...} keyed by the model's global parameter names, with
        this rank's shards as DTensors: what DCP saves, and loads under any other layout.
        The tied copy is left out: the first stage saves the same tensor and state."""
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for i, copy in enumerate(self.tied_copy):
            state = self._module_state(i)
            model_sd.update({k: v for k, v in state["model"].items()
                             if not (copy and k == "tok_emb.weight")})
            optim_sd.update({k: v for k, v in state["optim"].items()
                             if not (copy and ".tok_emb.weight." in k)})
        return {"model": model_sd, "optim": optim_sd}

    def train_state(self) -> dict[str, Any]:
        p = self.spec.parallel
        return {"step": self.step, "tokens": self.tokens_seen, "position": self.position,
                "global_batch": self.spec.train.global_batch, "lr": lr_at(self.step, self.spec),
                "time": time.time(),
                "layout": {"dp": p.dp, "pp": p.pp, "tp": p.tp, "dp_mode": p.dp_mode,
                           "schedule": p.schedule, "virtual_stages": p.virtual_stages}}

    def load(self, path: str) -> dict[str, Any]:
        """Load model, optimizer, step, data position and (same layout) RNG state from the
        checkpoint at path, under this run's layout: DCP reshards by global names.
        Collective: every rank calls it with the same path. Returns the saved train state."""
        # One DCP load per stage module (every rank hosts the same number of them): a rank
        # of a V-shaped schedule hosts both the embedding and its tied copy, whose requests
        # would collide in one dict.
        for i, (m, opt) in enumerate(zip(self.modules, self.optimizers)):
            state = self._module_state(i)
            ckpt.load(state, path, process_group=self.groups.active)
            if self.tied_copy[i]:
                state = _rename(state, "tok_emb.weight", "lm_head.weight")
            set_state_dict(m, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=LOAD_OPTIONS)
        saved = ckpt.read_train_state(path)
        self.step = int(saved["step"])
        self.tokens_seen = int(saved["tokens"])
        # Checkpoints from before the position was recorded consumed step * global_batch.
        self.position = int(saved.get("position", self.step * int(saved.get(
            "global_batch", self.spec.train.global_batch))))
        same_layout = saved.get("layout") == self.train_state()["layout"]
        rng = ckpt.read_rng_state(path, dist.get_rank()) if same_layout else None
        if rng is not None:
            ckpt.restore_rng_state(rng)
        else:
            # A new layout has other ranks: dropout masks restart from a seed derived from
            # the step (the weights and data continue exactly; with dropout 0 nothing differs).
            torch.manual_seed(self.spec.train.seed + 1 + self.pm.coords.dp + 7919 * self.step)
        return saved

    def eval_due(self) -> bool:
        t = self.spec.train
        return len(self.val_blocks) > 0 and t.eval_every > 0 and (
            self.step % t.eval_every == 0 or self.step == t.steps)

    def checkpoint_due(self) -> bool:
        every = self.spec.checkpoint.every
        return self.step == self.spec.train.steps or (every > 0 and self.step % every == 0)


# Ray Train's controller takes one report per worker every health-check interval (2 s by
# default; the worker's result queue holds one), so a report per step would cap training at
# half a step per second. Rows are batched instead and sent at most this often.
REPORT_INTERVAL_S = 2.0


def _rank_info(worker: Worker) -> dict[str, Any]:
    """What the driver shows and logs per rank: placement, stages and memory."""
    ctx = ray.train.get_context()
    c = worker.pm.coords
    return {"rank": dist.get_rank(), "dp": c.dp, "pp": c.pp, "tp": c.tp,
            "stages": worker.stage_indices,
            "layers": [sorted(int(k) for k in m.layers.keys()) for m in worker.plain],
            "node": ctx.get_node_rank(), "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "block_param_bytes": sum(
                (p.to_local() if isinstance(p, DTensor) else p).nbytes
                for m in worker.plain for n, p in m.named_parameters() if n.startswith("layers.")),
            **(worker.memory or {})}


# The step whose pipeline timeline is recorded: after the first, which pays one-off costs.
TIMELINE_STEP = 2


def _rename(state: dict[str, dict[str, Any]], src: str, dst: str) -> dict[str, dict[str, Any]]:
    """{'model', 'optim'} with parameter src called dst (flattened optimizer keys too)."""
    return {"model": {(dst if k == src else k): v for k, v in state["model"].items()},
            "optim": {k.replace(f".{src}.", f".{dst}."): v for k, v in state["optim"].items()}}


def _choose_checkpoint(root: str) -> tuple[Optional[str], list[list[str]]]:
    """The newest checkpoint under root that verifies; each newer one that does not is
    skipped with a warning. Returns (path or None, [[skipped path, reason], ...]).

    Why the storage listing and not only `ray.train.get_checkpoint()`: Ray Train
    registers a checkpoint when its controller collects the report, up to one health
    check after the upload; a worker that dies in between takes a complete, uploaded
    checkpoint out of Ray's list. Such a checkpoint verifies, and it carries every
    metrics row the driver may not have had (train_state.json "rows"), so no row is lost."""
    skipped: list[list[str]] = []
    path = ckpt.latest_valid(root, log, skipped)
    return (str(path) if path is not None else None), skipped


def _fault(config: dict[str, Any], step: int, phase: str) -> None:
    """Fault injection for the recovery tests (RAYPAR_FAULT, read by the driver): the named
    rank kills its own process at the named step and phase, once per run (a marker file in
    the run directory remembers that it fired). 'step': SIGKILL after the step; 'save':
    SIGKILL after writing its checkpoint shard, before reporting it; 'sigterm': SIGTERM
    after the step, as a spot preemption or a node drain sends it."""
    fault = config.get("fault")
    if not fault or fault["step"] != step or fault["phase"] != phase \
            or fault["rank"] != dist.get_rank():
        return
    marker = fault["marker"]
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
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
    while not _SIGTERM.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)


# -- SIGTERM: checkpoint, then exit ---------------------------------------------------------
# A spot preemption or a node drain sends the worker SIGTERM some time before the node goes.
# Ray's own handler exits at once; ours only records it, the step loop then saves a
# checkpoint with every rank, reports it, and the signalled process exits. Python runs
# signal handlers on the main thread, which in a Ray Train worker is the actor's task
# thread (training runs on another), so the handler is installed by an actor task
# (`RayTrainWorker.execute`) rather than from here.
_SIGTERM = threading.Event()
_RAY_SIGTERM_HANDLER: Any = None


def _on_sigterm(signum: int, frame: Any) -> None:
    if _SIGTERM.is_set() and callable(_RAY_SIGTERM_HANDLER):
        _RAY_SIGTERM_HANDLER(signum, frame)  # a second SIGTERM: exit now
    _SIGTERM.set()


def _install_sigterm_handler() -> bool:
    global _RAY_SIGTERM_HANDLER
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _on_sigterm:
        _RAY_SIGTERM_HANDLER = previous
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _exit_after_sigterm() -> None:
    """Exit the way the SIGTERM would have made this process exit without our handler."""
    handler = _RAY_SIGTERM_HANDLER
    signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the main thread exits the process meanwhile
    os._exit(1)


def _watch_sigterm() -> None:
    _SIGTERM.clear()
    try:
        actor = ray.get_runtime_context().current_actor
        ok = ray.get(actor.execute.remote(_install_sigterm_handler), timeout=30)
    except Exception as e:  # noqa: BLE001 - not fatal: SIGTERM then exits at once
        ok, reason = False, f"{type(e).__name__}: {e}"
    else:
        reason = "the task did not run on the main thread"
    if not ok:
        log.warning("no SIGTERM handler (%s): a preemption loses the steps since the last "
                    "checkpoint", reason)


class Preempted(RuntimeError):
    """Raised by the ranks that were not signalled, once the preemption checkpoint is
    reported: the worker group restarts from it without the signalled worker."""


# -- who trains, and the per-step control exchange -------------------------------------------

@dataclasses.dataclass
class Groups:
    """One worker group's process groups. Every rank creates them (group creation is
    collective), those that sit out included: an elastic run whose workers do not make a
    whole number of usable replicas trains on the first dp*pp*tp ranks only."""
    mesh: Optional[ParallelMesh]  # None: this rank sits out
    active: Optional[dist.ProcessGroup]  # the training ranks (None: every rank)
    save: Optional[dist.ProcessGroup]  # background saves' own group over the training ranks
    idle: Optional[dist.ProcessGroup]  # rank 0 and the ranks that sit out (None: nobody)
    n_active: int

    @classmethod
    def build(cls, spec: RunSpec) -> "Groups":
        p = spec.parallel
        world, n = dist.get_world_size(), spec.world_size
        mesh = build_mesh(p.dp, p.pp, p.tp)
        active = idle = None
        if world > n:
            active = dist.new_group(ranks=list(range(n)))
            idle = dist.new_group(ranks=[0, *range(n, world)])
        # Background saves run DCP's collectives on a thread while training runs its own:
        # they get a group of their own so the two never interleave on one.
        save = (dist.new_group(ranks=list(range(n)), backend="gloo")
                if spec.checkpoint.async_save and n > 1 else None)
        return cls(mesh, active, save, idle, n)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


# The flags every rank contributes once per step (max over all ranks): rank 0's decisions
# (its clock decides when rows are due, and when a background save has landed), Ray
# Train's preemption notice, and any rank's SIGTERM. Training and sitting-out ranks then
# act on the same values.
REPORT_DUE, SAVE_LANDED, NOTICE, SIGTERMED = range(4)
NO_FLAGS = [0, 0, 0, 0]


def _step_flags(report_due: bool = False, save_landed: bool = False,
                notice: bool = False) -> list[int]:
    """This rank's contribution to a step's exchange (rank 0's decisions, and whether this
    process got SIGTERM)."""
    flags = list(NO_FLAGS)
    flags[REPORT_DUE], flags[SAVE_LANDED], flags[NOTICE] = map(int, (report_due, save_landed,
                                                                     notice))
    flags[SIGTERMED] = int(_SIGTERM.is_set())
    return flags


def _report(metrics: dict[str, Any], **kwargs: Any) -> Optional[Any]:
    """ray.train.report, preceded by Ray Train's preemption check (both are barriers over
    every worker, so every rank, sitting out or not, calls the two together). Returns the
    preemption notice: a node of this group is being drained (a spot reclaim, an autoscaler
    scale-down), with the deadline Ray Core was given."""
    notice = ray.train.get_preemption_info()
    ray.train.report(metrics, **kwargs)
    return notice


def _exchange(flags: list[int]) -> list[int]:
    if dist.get_world_size() == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _share_plan(plan: list[int], groups: Groups) -> list[int]:
    """Rank 0 tells the ranks that sit out [reports to make, stop]: ray.train.report is a
    barrier over every worker, so they report (empty) exactly when the others do."""
    if groups.idle is None:
        return plan
    t = torch.tensor(plan, dtype=torch.int64, device=_device())
    dist.broadcast(t, src=0, group=groups.idle)
    return t.tolist()


def _broadcast(obj: Any) -> Any:
    """Rank 0's object on every rank (pickled between our own processes, never from storage)."""
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_layout(spec: RunSpec, workers: int) -> RunSpec:
    """This worker group's layout: a fixed one as configured; an elastic one with as many
    replicas as its workers allow (raypar.config.choose_dp)."""
    if not spec.parallel.elastic.enabled:
        if workers != spec.world_size:
            raise RuntimeError(f"{workers} workers for a layout of {spec.world_size}")
        return spec
    dp = choose_dp(spec, workers)
    if dp < 1:
        raise RuntimeError(f"{workers} workers hold no valid layout of at least "
                           f"parallel.elastic.min_replicas={spec.min_dp} replicas")
    return spec.with_dp(dp)


def _sit_out(groups: Groups) -> None:
    """A rank beyond the layout: it holds no model, and takes part only in the control
    exchange and in Ray Train's report barrier, until training stops."""
    while True:
        _exchange(_step_flags())
        n_reports, stop = _share_plan([0, 0], groups)
        for _ in range(n_reports):
            _report({})
        if stop:
            _exchange(list(NO_FLAGS))  # the training ranks' closing barrier
            if _SIGTERM.is_set():
                _exit_after_sigterm()
            return


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker (again after every restart)."""
    started = time.time()
    _watch_sigterm()
    world = dist.get_world_size()
    configured = from_dict(config["spec"])
    spec = resolve_layout(configured, world)
    groups = Groups.build(spec)
    rank = dist.get_rank()
    choice = _choose_checkpoint(config["checkpoint_root"]) if rank == 0 else None
    path, skipped = _broadcast(choice)
    if groups.mesh is None:
        _sit_out(groups)
        return
    worker = Worker(spec, config["vocab_size"], ray.get(config["train_ref"]),
                    ray.get(config["val_ref"]), groups)
    meta = {"model": vars(worker.mcfg), "spec": config["spec"],
            "tokenizer": config["tokenizer_json"],
            "layout": dataclasses.asdict(spec.parallel)}
    pending: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    t_load = time.perf_counter()
    saved = worker.load(path) if path is not None else {}
    load_s = time.perf_counter() - t_load
    # Where this worker group starts: the driver tells a restart from a fresh start and
    # counts the steps redone. The checkpoint's own report rows go out again: that report
    # may have died with a worker before Ray collected it (the driver skips known steps).
    extra["start"] = {"checkpoint": path, "from_step": worker.step, "skipped": skipped,
                      "started": started, "loaded": time.time(), "load_s": load_s,
                      "saved_layout": saved.get("layout"),
                      "layout": worker.train_state()["layout"],
                      "workers": world, "sitting_out": world - groups.n_active}
    pending.extend(saved.get("rows", []))
    last_report = time.perf_counter()
    placed = False
    inflight: Optional[ckpt.PendingSave] = None
    inflight_started = 0.0
    # Timings of this group's checkpoint saves, sent with the next report: how long each
    # took to write and how long it held training up (the driver logs them as events).
    saves: list[dict[str, Any]] = []

    # The rows of the last report sent: Ray's worker-side queue holds one report, so every
    # earlier one has reached the driver, but this one may still die with the worker.
    unconfirmed: list[dict[str, Any]] = []
    # Ray Train's preemption notice (rank 0's), and whether its checkpoint is saved.
    notice: Optional[Any] = None
    notice_saved = False

    def report(checkpoint: Optional[Any], step: int) -> None:
        nonlocal pending, extra, last_report, unconfirmed, notice, saves
        timed = [entry for entry in saves if "save_s" in entry]
        if timed:
            extra["checkpoints"] = timed
            saves = [entry for entry in saves if "save_s" not in entry]
        notice = _report({"rows": pending, **extra}, checkpoint=checkpoint,
                         checkpoint_dir_name=ckpt.dir_name(step),
                         delete_local_checkpoint_after_upload=True) or notice
        unconfirmed = pending
        pending, extra, last_report = [], {}, time.perf_counter()

    def save(sync: bool) -> Optional[Any]:
        """Every rank writes its shard; returns the checkpoint to report now, or None
        when it is written in the background (reported once it lands)."""
        nonlocal inflight, inflight_started
        # Every row the driver may not have yet travels with the checkpoint.
        state = {**worker.train_state(), "rows": unconfirmed + pending}
        rng = {ckpt.rng_name(rank): ckpt.rng_state_bytes()}
        t_save = time.perf_counter()
        if not sync:
            inflight = ckpt.write_async(worker.state_dict(), state, meta, rng,
                                        process_group=groups.save)
            inflight_started = t_save
            stall = time.perf_counter() - t_save
            saves.append({"step": worker.step, "mode": "async", "stall_s": stall})
            return None
        checkpoint = ckpt.save(worker.state_dict(), state, meta, rng,
                               process_group=groups.active)
        took = time.perf_counter() - t_save
        saves.append({"step": worker.step, "mode": "sync", "save_s": took, "stall_s": took})
        _fault(config, worker.step, "save")
        return checkpoint

    def land() -> Any:
        """The background save's checkpoint, once every rank has written its part."""
        nonlocal inflight
        t_wait = time.perf_counter()
        local = inflight.finish()
        done = time.perf_counter()
        for entry in saves:  # its timing row: written in (done - started) s, and the
            if entry["step"] == inflight.step and "save_s" not in entry:  # wait for it
                entry["save_s"] = done - inflight_started
                entry["stall_s"] += done - t_wait
        inflight = None
        return ray.train.Checkpoint.from_directory(str(local))

    stop = worker.step >= spec.train.steps
    while not stop:
        timeline = worker.pipeline is not None and worker.step + 1 == TIMELINE_STEP
        if timeline:
            worker.pipeline.record_timeline = True
        t0 = time.perf_counter()
        row = worker.train_step()
        t1 = time.perf_counter()
        row["tokens_per_s"] = spec.train.global_batch * spec.data.seq_len / (t1 - t0)
        row["tokens"] = worker.tokens_seen
        if not placed:  # after this worker group's first step, which measures memory
            extra["rank_info"] = _rank_info(worker)
            placed = True
        if timeline:
            worker.pipeline.record_timeline = False
            pipe = worker.pipeline
            extra["timeline"] = {"events": pipe.timeline, "start": pipe.step_start,
                                 "end": pipe.step_end}
        if worker.eval_due():
            row["val_loss"] = worker.evaluate()
        pending.append(row)
        if config.get("step_delay_s"):
            time.sleep(config["step_delay_s"])
        _fault(config, worker.step, "step")
        _fault(config, worker.step, "sigterm")
        last = worker.step == spec.train.steps
        due_ckpt = worker.checkpoint_due()
        flags = _exchange(_step_flags(
            report_due=rank == 0 and time.perf_counter() - last_report >= REPORT_INTERVAL_S,
            save_landed=rank == 0 and inflight is not None and inflight.done(),
            notice=rank == 0 and notice is not None and not notice_saved))
        preempted = bool(flags[SIGTERMED])
        # A preemption notice: save now and train on; when the node goes, the group
        # restarts from this checkpoint (Ray Train's own recommendation).
        if flags[NOTICE]:
            notice_saved = True
            if rank == 0:
                log.warning("preemption notice at step %d: %s; saving a checkpoint",
                            worker.step, notice)
        # A background save is reported as soon as rank 0 has written it (or before the
        # next save starts, at the end, or before a preemption's save).
        save_now = due_ckpt or preempted or bool(flags[NOTICE])
        finish = inflight is not None and (save_now or last or bool(flags[SAVE_LANDED]))
        stop = last or preempted
        report_now = save_now or last or bool(flags[REPORT_DUE])
        if rank == 0:
            _share_plan([int(finish) + int(report_now), int(stop)], groups)
        if finish:
            step = inflight.step
            report(land(), step)
        checkpoint = None
        if save_now:
            # The last checkpoint, and a preemption's, are written before anything goes on.
            checkpoint = save(sync=not spec.checkpoint.async_save or last or preempted
                              or bool(flags[NOTICE]))
        if report_now:
            report(checkpoint, worker.step)
    if pending or extra:
        # Resumed from the final checkpoint: nothing left to train, but its rows and the
        # start record still go to the driver (every rank holds the same, so all report).
        _exchange(list(NO_FLAGS))
        if rank == 0:
            _share_plan([1, 1], groups)
        report(None, worker.step)
    # Every rank has uploaded its part of the last checkpoint before any of them exits.
    _exchange(list(NO_FLAGS))
    if worker.step < spec.train.steps:
        if _SIGTERM.is_set():
            _exit_after_sigterm()
        raise Preempted(f"a worker received SIGTERM at step {worker.step}: saved the "
                        f"checkpoint {ckpt.dir_name(worker.step)}; restarting from it")
