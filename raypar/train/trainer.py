"""The per-rank trainer: one rank's model share, optimizers and data view, and what it does
with them: an optimizer step, an evaluation, clipping, and its checkpoint state.

    trainer = RankTrainer(spec, vocab_size, train, val, groups)
    row = trainer.train_step()          # a StepRow (raypar/train/records.py)

train and val are block sources (raypar/data/blocks.py): packed arrays in memory, or splits
of a prepared dataset that the rank reads block by block, its next steps' shards fetched
ahead on a background thread.

It knows nothing of Ray: the step loop (raypar/train/loop.py) drives it, the bench's probe
and the tests step it directly. Parallelism is applied by raypar/parallel/parallelize.py.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from raypar.config import RunSpec, model_config
from raypar.validation import local_sgd_resume_problem
from raypar.data.blocks import PREFETCH_STEPS, BlockSource, Prefetcher, as_source
from raypar.data.order import rank_blocks
from raypar.data.packing import rank_slice
from raypar.model import lm_loss, param_groups
from raypar.parallel.comm_count import CommCounter
from raypar.parallel.data import gradient_sync, powersgd_memory
from raypar.parallel.local_sgd import LocalSGD
from raypar.parallel.mesh import ParallelMesh, device_type
from raypar.parallel.parallelize import parallelize
from raypar.parallel.pipeline import Pipeline
from raypar.parallel.ps import (PSClient, PushCodec, local_tensor, new_generation,
                                staleness_of)
from raypar.parallel.stages import is_tied_copy, sync_tied_grads
from raypar.parallel.tensor import grad_sq_norm, loss_context
from raypar.train import checkpoint as ckpt
from raypar.train.control import Groups
from raypar.train.memory import ActivationMeter, return_large_frees, state_bytes
from raypar.train.records import StepRow

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


def _names(key: str, name: str) -> bool:
    """Whether a checkpoint key is parameter `name`'s: the name itself, a prefixed one
    ('replica0.model.<name>', local SGD's), or a flattened optimizer key ('state.<name>.exp_avg')."""
    return key == name or key.endswith(f".{name}") or f".{name}." in key


def _rename_key(key: str, src: str, dst: str) -> str:
    if key == src:
        return dst
    if key.endswith(f".{src}"):
        return key[:-len(src)] + dst
    return key.replace(f".{src}.", f".{dst}.")


def _rename(state: dict[str, dict[str, Any]], src: str, dst: str) -> dict[str, dict[str, Any]]:
    """{'model', 'optim', ...} with parameter src called dst in every part (flattened
    optimizer keys too)."""
    return {part: {_rename_key(k, src, dst): v for k, v in entries.items()}
            for part, entries in state.items()}


class RankTrainer:
    """One rank's state: mesh, its stage modules (tensor-sharded, data-parallel),
    one optimizer per stage module, and its view of the data."""

    def __init__(self, spec: RunSpec, vocab_size: int, train_blocks: BlockSource | np.ndarray,
                 val_blocks: BlockSource | np.ndarray, groups: Optional[Groups] = None,
                 pretrained: bool = True, ps: Optional[dict[str, Any]] = None):
        """train_blocks, val_blocks: BlockSources, or arrays (n_blocks, seq_len + 1) of
        packed blocks (wrapped in ArrayBlocks). pretrained=False: with model.init_from,
        leave the Hugging Face weights unread (a checkpoint is loaded over the model next).
        ps: with parallel.dp_mode=ps, the parameter server {"shards": actor handles, "plan":
        its plan} the driver started (raypar/parallel/ps.py)."""
        self.spec = spec
        self.ps_config = ps
        torch.set_num_threads(spec.train.threads)
        # Before anything is built: freed layers and activations go back to the system
        # instead of staying in glibc's heap (raypar/train/memory.py). CPU ranks only: on
        # a GPU they live in CUDA's allocator, and the host's copies would only fault more.
        if not torch.cuda.is_available():
            return_large_frees()
        t = spec.train
        self.groups = groups or Groups.build(spec)
        self.pm: ParallelMesh = self.groups.mesh
        self.device = torch.device(device_type(), torch.cuda.current_device()
                                   if torch.cuda.is_available() else None)
        self.train_data = as_source(train_blocks, spec.data.seq_len)
        self.val_data = as_source(val_blocks, spec.data.seq_len)
        if self.train_data.n_blocks < 1:
            raise ValueError(f"train blocks: {self.train_data!r} holds no block of "
                             f"data.seq_len + 1 = {spec.data.seq_len + 1} tokens")
        # The seeded order of global blocks: step s reads positions [s*G, (s+1)*G) of it
        # (a mixture's order also draws each position's source).
        self.order = self.train_data.order(t.seed)
        self._train_feed = Prefetcher(self.train_data, "raypar-prefetch-train")
        self._val_feed = Prefetcher(self.val_data, "raypar-prefetch-val")
        try:
            self._build(spec, vocab_size, spec.model.init_from if pretrained else "")
        except BaseException:
            self.close()  # no fetch thread outlives a trainer that failed to build
            raise

    def _build(self, spec: RunSpec, vocab_size: int, init_from: str) -> None:
        p, t = spec.parallel, spec.train
        if self.val_data.n_blocks and t.eval_every > 0:
            # Evaluation reads the same blocks every time: fetch them now, while the model
            # is built, and keep them.
            self._val_feed.plan(range(t.eval_batches), self._val_indices)
        self.mcfg = model_config(spec, vocab_size)
        self.n_micro = spec.grad_accum
        # Each rank materializes only its stages' shards, with the values the single-process
        # model has there (or the Hugging Face checkpoint's): every layout starts from the
        # same weights.
        rank_model = parallelize(self.mcfg, t.seed, self.pm, p, self.device,
                                 t.activation_checkpointing, t.dtype, init_from)
        # plain: the stage modules (optimizers, checkpoints, clipping); modules: what runs
        # them (the same, or powersgd's DDP wrappers).
        self.plain = rank_model.modules
        self.modules = rank_model.forward_modules or self.plain
        self.stage_indices, self.n_stages = rank_model.stage_indices, rank_model.n_stages
        self.tied_copy = rank_model.tied_copies()
        # One optimizer per stage module, so each one's state dict is keyed by the
        # model's global parameter names (checkpoints load under any layout).
        self.optimizers = [torch.optim.AdamW(
            self._param_groups(m), lr=t.lr,
            betas=(t.beta1, t.beta2), foreach=False) for m in self.plain]
        self.loss_ctx = lambda: loss_context(self.plain[-1])
        # dp_mode=ps: the optimizers above only carry the state a checkpoint saves and
        # loads; the parameter server's shards step it (start_ps, state_dict).
        self.ps: Optional[PSClient] = None
        self._ps_history: dict[int, dict[str, torch.Tensor]] = {}
        self._ps_norms: dict[int, float] = {}
        if p.dp_mode == "ps":
            if self.ps_config is None:
                raise ValueError("parallel.dp_mode=ps: the trainer needs the parameter "
                                 "server's shards (the driver starts them)")
            self.ps = PSClient(self.ps_config["shards"], self.ps_config["plan"],
                               p.ps.staleness, self._checkpoint_params(),
                               PushCodec(p.grad_compression, p.powersgd_rank, t.seed),
                               tp_rank=self.pm.coords.tp)
        # Local SGD (sync_every > 1): no per-step gradient reduction, each replica's
        # gradients are those of its own mean loss, and the replicas agree every
        # sync_every steps (raypar/parallel/local_sgd.py).
        self.local_sgd = (LocalSGD(self.plain, self.pm, p.outer_lr, p.outer_momentum)
                          if p.sync_every > 1 else None)
        # The replicas whose gradients the reduction sums: each rank's loss is divided by them
        # (local SGD reduces no gradient; torch's DDP under powersgd averages itself).
        self.ddp = rank_model.forward_modules is not None
        self.grad_dp = 1 if self.local_sgd is not None or self.ddp else self.pm.dp
        # The bytes this rank hands to the dp collectives in a step (comm_bytes).
        self.comm = CommCounter(self.pm.dp_groups)
        self.pipeline = None
        if p.pp > 1:
            self.pipeline = Pipeline(self.modules, self.stage_indices, self.n_stages,
                                     self.pm.pp_group, self.device, p.schedule, self.n_micro,
                                     lm_loss, loss_context=self.loss_ctx,
                                     grad_divisor=self.grad_dp)
        # Dropout draws from the global RNG: reseed it per replica so masks differ.
        torch.manual_seed(t.seed + 1 + self.pm.coords.dp)
        self.step = 0
        self.tokens_seen = 0
        # A mixture's training tokens so far, per source name (None: one dataset).
        self.source_tokens = self.train_data.source_counts([])
        # Global stream position: blocks consumed so far by all replicas together. The next
        # step takes positions [position, position + global_batch) (raypar/data/order.py).
        self.position = 0
        self.memory: dict[str, float] | None = None
        self.rss_init: Optional[int] = None  # peak RSS once built (the worker loop sets it)
        self.rss_first_step: Optional[int] = None  # ... and after this group's first step
        self.anon_first_step: Optional[int] = None  # its anonymous RSS then (no mapped files)
        self.rss_base: Optional[int] = None  # ... and before it was built
        self.anon_start: Optional[int] = None  # its anonymous RSS as the train loop began
        self.load_s: Optional[float] = None  # seconds of the checkpoint load, if one was
        self.load_stats: Optional[ckpt.dcp_io.ReadStats] = None  # ... and what it read

    # -- one optimizer step ------------------------------------------------------------
    def _autocast(self):
        """bf16 under autocast with dp = 1 (or local SGD, or powersgd's DDP); with
        dp > 1 the data-parallel units cast instead
        (FSDP2's mixed-precision policy: bf16 compute, fp32 master weights and gradient
        reduction, raypar/parallel/data.py)."""
        if self.spec.train.dtype == "bf16" and (self.pm.dp == 1 or self.ps is not None
                                                or self.local_sgd is not None or self.ddp):
            return torch.autocast(device_type(), dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- data --------------------------------------------------------------------------
    def _my_indices(self, position: int) -> np.ndarray:
        """This replica's blocks of the step that starts at stream position `position`."""
        return rank_blocks(self.order, position, self.spec.train.global_batch,
                           self.pm.coords.dp, self.pm.dp)

    def _val_indices(self, b: int) -> np.ndarray:
        """This replica's blocks of validation batch b: its slice of the fixed global
        batch arange(b*G, (b+1)*G) % n_val (the same at every evaluation)."""
        g, n_val = self.spec.train.global_batch, self.val_data.n_blocks
        per = g // self.pm.dp
        return (b * g + self.pm.coords.dp * per + np.arange(per, dtype=np.int64)) % n_val

    def prefetch(self) -> None:
        """Have the next PREFETCH_STEPS steps' blocks fetched in the background (and every
        other shard let go); returns at once. train_step and load call it."""
        g = self.spec.train.global_batch
        self._train_feed.plan([self.position + k * g for k in range(PREFETCH_STEPS)],
                              self._my_indices)

    def close(self) -> None:
        """Stop the background prefetch (the trainer still reads, synchronously)."""
        self._train_feed.close()
        self._val_feed.close()

    def _to_device(self, blocks: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(blocks.astype(np.int64)).to(self.device)

    def meets(self) -> bool:
        """Whether the replicas meet after the step just taken, to agree on its rows and on
        what to do next (raypar/train/loop.py). Every step, except where they need not:
        local SGD's replicas meet only at their syncs, and a parameter server's with
        staleness s every s+1 steps, so a replica slowed for a while falls behind, and the
        others train on, until the next meeting (within the window, a replica waits only
        for the versions its staleness allows). The last step is always a meeting; the loop
        adds the steps that save (deterministic by step, the same on every rank)."""
        step, every = self.step, self.spec.parallel.meet_every
        return step % every == 0 or step == self.spec.train.steps

    def agree(self, rows: list[StepRow]) -> None:
        """Set the rows' loss (and val_loss, and local SGD's grad_norm, each replica having
        clipped its own gradient) to the mean over the replicas of what each replica
        measured alone: one gather for all the rows since the last meeting, in place."""
        if self.pm.dp == 1 or not rows:
            return
        fields = [[f for f in ("loss", "grad_norm", "val_loss")
                   if getattr(r, f) is not None
                   and (f != "grad_norm" or self.local_sgd is not None)] for r in rows]
        values = [getattr(r, f) for r, names in zip(rows, fields) for f in names]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        mean = iter(self.pm.mean_over_dp(t).tolist())
        for r, names in zip(rows, fields):
            for f in names:
                setattr(r, f, next(mean))

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
                        loss = lm_loss(model(mb[:, :-1]), mb[:, 1:])
                    # Scaled by every micro-batch of the step over all replicas: the
                    # gradient reduction sums (raypar/parallel/data.py).
                    (loss / (len(micro) * self.grad_dp)).backward()
            loss_sum += loss.item()
        return loss_sum / len(micro)

    def _replica_bytes(self, mine: int) -> int:
        """Summed over this replica's pp x tp ranks (each sends its own shards' gradients)."""
        if self.pm.pp * self.pm.tp == 1:
            return mine
        t = torch.tensor([mine], dtype=torch.int64, device=self.device)
        for dim, size in (("tp", self.pm.tp), ("pp", self.pm.pp)):
            if size > 1:
                dist.all_reduce(t, group=self.pm.mesh.get_group(dim))
        return int(t.item())

    def _clip(self) -> float:
        """Clip by the norm of the whole model's gradient: every shard and stage, the
        replicated and tied parameters counted once (the same formula in every layout)."""
        params = []
        for m in self.plain:
            params += [p for name, p in m.named_parameters()
                       if p.grad is not None and not is_tied_copy(name, m)]
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
        copy = [p for n, p in module.named_parameters() if is_tied_copy(n, module)]
        if copy:
            groups[0]["params"] = [p for p in groups[0]["params"] if p is not copy[0]]
            groups[1]["params"].append(copy[0])
        return groups

    def _optimizer_step(self) -> Optional[float]:
        """Gradients are complete: synchronise, clip, step; returns the gradient norm (with
        dp_mode=ps: of the newest update the replica pulled, None when it pulled none)."""
        if self.ps is not None:
            # The shards sum the replicas' and the tied copies' gradients, clip and step.
            self.ps.bytes = 0
            return self.ps.step(self.step, lr_at(self.step, self.spec))
        if self.pipeline is not None:
            sync_tied_grads(self.plain, self.pm.pp_group)
        grad_norm = self._clip()
        for opt in self.optimizers:
            opt.step()
        return grad_norm

    def train_step(self, agree: bool = True) -> StepRow:
        """One optimizer step. Its row's loss (and local SGD's grad_norm) is the mean over
        the replicas; with agree=False, this replica's own, until agree([row, ...]) (the
        step loop's way to meet the other replicas only when it must: meets())."""
        spec, t = self.spec, self.spec.train
        t0 = time.perf_counter()
        lr = lr_at(self.step, spec)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        t_data = time.perf_counter()
        indices = self.order.blocks(self.position, t.global_batch)
        self.prefetch()  # planned by the step before (or load) already, unless the first
        mine = rank_slice(indices, self.pm.coords.dp, self.pm.dp)
        batch = self._to_device(self._train_feed.read(self.position, mine))
        data_s = time.perf_counter() - t_data  # the step's wait for its input
        for m in self.modules:
            m.train()
        measure = self.memory is None
        meter = ActivationMeter() if measure else contextlib.nullcontext()
        with meter, self.comm.counting():
            loss = self._forward_backward(batch)
        with self.comm.counting():
            grad_norm = self._optimizer_step()
        if measure:
            self.memory = {**state_bytes(self.plain, self.optimizers),
                           "activation_peak_bytes": meter.peak}
            if self.local_sgd is not None:  # the anchor and outer momentum: optimizer state
                self.memory["optim_bytes"] += self.local_sgd.nbytes()
            if torch.cuda.is_available():
                self.memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.local_sgd is not None and (self.step % spec.parallel.sync_every == 0
                                           or self.step == t.steps):
            # Every sync_every steps, and at the last step (the run ends in agreement).
            with self.comm.counting():
                self.local_sgd.sync()
        self.position += t.global_batch
        self.prefetch()  # the next steps' shards come while this rank evaluates, saves, ...
        self.tokens_seen += t.global_batch * spec.data.seq_len
        if self.source_tokens is not None:
            for name, n in self.train_data.source_counts(indices).items():
                self.source_tokens[name] += n * spec.data.seq_len
        counted, ps_fields = self.comm.take(), {}
        if self.ps is not None:  # its pushes and pulls, not collectives
            counted = self.ps.bytes
            ps_fields = {"staleness": staleness_of(self.step - 1, spec.parallel.ps.staleness)}
        row = StepRow(**ps_fields, comm_bytes=self._replica_bytes(counted), step=self.step,
                    loss=loss, lr=lr, grad_norm=grad_norm, time=time.time(),
                    dp=self.pm.dp, first_block=int(indices[0]), last_block=int(indices[-1]),
                    data_s=data_s, tokens=self.tokens_seen,
                    tokens_per_s=t.global_batch * spec.data.seq_len
                    / (time.perf_counter() - t0),
                    blocks=indices.tolist() if t.log_blocks else None,
                    source_tokens=dict(self.source_tokens)
                    if self.source_tokens is not None else None)
        if agree:
            self.agree([row])
        return row

    @torch.no_grad()
    def evaluate(self, agree: bool = True) -> float:
        """Mean loss over a fixed set of validation blocks (the same at every evaluation),
        over the replicas; with agree=False, this replica's own (see train_step)."""
        t = self.spec.train
        for m in self.modules:
            m.eval()
        total, count = 0.0, 0
        for b in range(t.eval_batches):
            batch = self._to_device(self._val_feed.read(b, self._val_indices(b)))
            with self._autocast():
                if self.pipeline is not None:
                    total += self.pipeline.eval(batch[:, :-1], batch[:, 1:])
                    count += 1
                    continue
                for mb in batch.split(t.micro_batch):
                    with self.loss_ctx():
                        total += lm_loss(self.modules[0](mb[:, :-1]), mb[:, 1:]).item()
                    count += 1
        if not agree or self.pm.dp == 1:
            return total / count
        t = torch.tensor([total / count], dtype=torch.float64, device=self.device)
        return self.pm.mean_over_dp(t).item()

    def eval_due(self) -> bool:
        t = self.spec.train
        return self.val_data.n_blocks > 0 and t.eval_every > 0 and (
            self.step % t.eval_every == 0 or self.step == t.steps)

    # -- checkpoints -------------------------------------------------------------------
    def _module_state(self, i: int) -> dict[str, dict[str, Any]]:
        """Stage module i's {'model', 'optim'} under checkpoint names: the model's global
        parameter names, except that a last stage's copy of a tied embedding goes by the
        embedding's name (the two are equal, and so are their optimizer states), so that a
        checkpoint looks the same whatever pp it was saved under."""
        msd, osd = get_state_dict(self.plain[i], self.optimizers[i], options=STATE_DICT_OPTIONS)
        if self.mcfg.tie_embeddings and "tok_emb.weight" in msd:
            msd.pop("lm_head.weight", None)  # the same tensor under its second name
        state = {"model": msd, "optim": osd}
        if self.local_sgd is not None:
            # Local SGD: 'model' is the anchor, the parameters every replica agreed on at
            # the last sync (what export and generate read), 'outer' the outer momentum;
            # each replica's own parameters and AdamW state (which differ between syncs)
            # go under its own keys, so that each replica writes and reads back its own.
            own = f"replica{self.pm.coords.dp}"
            extra = self.local_sgd.state(i)
            state = {"model": extra["anchor"], "outer": extra["outer"],
                     "local": {**{f"{own}.model.{k}": v for k, v in msd.items()},
                               **{f"{own}.optim.{k}": v for k, v in osd.items()}}}
        return _rename(state, "lm_head.weight", "tok_emb.weight") if self.tied_copy[i] else state

    def state_dict(self) -> dict[str, Any]:
        """{'model': ..., 'optim': ...} keyed by the model's global parameter names, with
        this rank's shards as DTensors: what DCP saves, and loads under any other layout.
        The tied copy is left out: the first stage saves the same tensor and state.
        dp_mode=ps: the same, from the parameter server (and, with staleness, the older
        versions the next steps compute on, as 'ps_history': {lag: {name: tensor}})."""
        if self.ps is not None:
            return self._ps_state_dict()
        return self._local_state_dict()

    def _checkpoint_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(checkpoint name, parameter) of every stage module's parameters: a last stage's
        copy of the tied embedding goes by the embedding's name."""
        return [("tok_emb.weight" if is_tied_copy(n, m) else n, p)
                for m in self.plain for n, p in m.named_parameters()]

    def _ps_state_dict(self) -> dict[str, Any]:
        """The parameter server's state of this rank's parameters at this step, put into the
        local modules and optimizers for the moment of building the ordinary state dict."""
        values, optim, history = self.ps.state(self.step)
        named = self._checkpoint_params()
        with torch.no_grad():  # (with tp: this rank's shards, into its DTensors' own)
            for name, p in named:
                local_tensor(p).copy_(values[name])
        names = {id(p): name for name, p in named}

        def like(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # AdamW keeps a DTensor parameter's moments as DTensors placed like it.
            if isinstance(p, DTensor) and v.dim():
                return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False)
            return v

        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if names[id(p)] in optim:
                        opt.state[p] = {n: like(p, v) for n, v in optim[names[id(p)]].items()}
        state = self._local_state_dict()
        for opt in self.optimizers:
            opt.state.clear()  # the state dict keeps its tensors; the optimizers need none
        lag = staleness_of(self.step, self.spec.parallel.ps.staleness)
        if history:
            # The local parameters go back to the version the next step computes on.
            state["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
            by_name = dict(named)  # (with tp: DTensors placed like their parameters)
            state["ps_history"] = {str(k): {name: like(by_name[name], v)
                                            for name, v in older.items()}
                                   for k, older in history.items()}
            with torch.no_grad():
                for name, p in named:
                    local_tensor(p).copy_(history[lag][name])
        return state

    def start_ps(self) -> None:
        """Every worker-group start, after any checkpoint is loaded (collective): reset the
        parameter server from this group's state, under a new generation, and pull the
        parameters the next step computes on."""
        from raypar.train.control import broadcast
        generation = broadcast(new_generation() if dist.get_rank() == 0 else None)
        sources = self.pm.pp * self.pm.tp if self.pm.coords.dp == 0 else None
        self.ps.start(generation, self.step, dist.get_rank(), sources, self.optimizers,
                      self._ps_history, self._ps_norms)
        for opt in self.optimizers:
            opt.state.clear()
        self._ps_history, self._ps_norms = {}, {}
        dist.barrier(group=self.groups.active)
        self.ps.sync(self.step)

    def _local_state_dict(self) -> dict[str, Any]:
        out: dict[str, dict[str, Any]] = {}
        for i, copy in enumerate(self.tied_copy):
            for part, entries in self._module_state(i).items():
                out.setdefault(part, {}).update(
                    {k: v for k, v in entries.items() if not (copy and _names(k, "tok_emb.weight"))})
        return out

    def _powersgd_file(self) -> str:
        return f"powersgd-{dist.get_rank()}.pt"

    def _ps_powersgd_file(self) -> str:
        return f"ps-powersgd-{dist.get_rank()}.pt"

    def extra_files(self) -> dict[str, bytes]:
        """This rank's files besides DCP's in a checkpoint: PowerSGD's error feedback, warm
        start and RNG (per rank; one state per stage module; under dp_mode=ps, the error
        feedback and warm-start Q of this rank's pushes), restored on a resume with the
        same layout so that it replays the uninterrupted run."""
        if self.ps is not None:
            tensors = self.ps.codec.state()
            if not tensors:
                return {}
            buf = io.BytesIO()
            torch.save(tensors, buf)
            return {self._ps_powersgd_file(): buf.getvalue()}
        states = [powersgd_memory(m) for m in self.modules]
        if not any(s is not None for s in states):
            return {}
        tensors = {f"{i}.{k}": v for i, s in enumerate(states) if s is not None
                   for k, v in s.tensors().items()}
        buf = io.BytesIO()
        torch.save(tensors, buf)
        return {self._powersgd_file(): buf.getvalue()}

    def _load_extra_files(self, source: "ckpt.Source") -> None:
        if self.ps is not None:
            name = self._ps_powersgd_file()
            if name in source.expected:
                self.ps.codec.load(torch.load(io.BytesIO(source.read_bytes(name)),
                                              weights_only=True, map_location="cpu"))
            return
        name = self._powersgd_file()
        if name not in source.expected:
            return
        saved = torch.load(io.BytesIO(source.read_bytes(name)), weights_only=True,
                           map_location="cpu")
        for i, m in enumerate(self.modules):
            memory = powersgd_memory(m)
            if memory is not None:
                prefix = f"{i}."
                memory.load({k[len(prefix):]: v for k, v in saved.items()
                             if k.startswith(prefix)})

    def layout(self) -> dict[str, Any]:
        p = self.spec.parallel
        out = {"dp": p.dp, "pp": p.pp, "tp": p.tp, "dp_mode": p.dp_mode,
               "schedule": p.schedule, "virtual_stages": p.virtual_stages}
        if p.sync_every > 1:
            out["sync_every"] = p.sync_every
        if p.grad_compression == "powersgd":
            # Its saved state (error feedback, warm-start factors of this rank) is restored
            # only into the same layout: another rank r would not fit its factors.
            out["powersgd_rank"] = p.powersgd_rank
            if p.dp_mode == "ps":  # ... and under ps it is kept per piece of the plan
                out["ps_shards"] = p.ps.shards
        return out

    def train_state(self) -> dict[str, Any]:
        state = {"step": self.step, "tokens": self.tokens_seen, "position": self.position,
                 "global_batch": self.spec.train.global_batch, "lr": lr_at(self.step, self.spec),
                 "order": self._order_id(), "source_tokens": self.source_tokens,
                 "source_draws": self._source_draws(),
                 "time": time.time(), "layout": self.layout()}
        if self.ps is not None:  # the norms the next rows report (update t - staleness)
            state["ps_norms"] = {str(u): n for u, n in self.ps.recent_norms(self.step).items()}
        return state

    def _order_id(self) -> dict[str, Any]:
        """What fixes which blocks a stream position reads: the order's version and size
        (and a mixture's sources and weights)."""
        return self.order.ident()

    def load(self, path: str) -> dict[str, Any]:
        """Load model, optimizer, step, data position and (same layout) RNG state from the
        checkpoint at path, under this run's layout: DCP reshards by global names.
        Collective: every rank calls it with the same path. Returns the saved train state."""
        # Straight from storage, each byte this rank needs read once and checked against the
        # manifests (ckpt.Source): a mismatch raises ckpt.CorruptCheckpoint on every rank.
        # One DCP load per stage module (every rank hosts the same number of them): a rank
        # of a V-shaped schedule hosts both the embedding and its tied copy, whose requests
        # would collide in one dict (the Source reads their bytes once for both).
        # Every rank opens the checkpoint (its manifests and DCP's metadata) before any
        # enters DCP's collectives: a rank that finds it corrupt tells the others here,
        # rather than leave them waiting in a collective it never joins.
        source, problem = None, None
        try:
            source = ckpt.Source(path)
        except (ckpt.CorruptCheckpoint, ckpt.UnsafeCheckpoint) as e:
            problem = str(e)  # a forged one (safe_dcp) is skipped like a corrupt one
        problems: list[Optional[str]] = [None] * self.groups.n_active
        dist.all_gather_object(problems, problem, group=self.groups.active)
        problem = next((p for p in problems if p), None)
        if problem is not None:
            raise ckpt.CorruptCheckpoint(problem)
        self._check_local_sgd(source.read_json(ckpt.TRAIN_STATE).get("layout") or {}, path)
        states = [self._module_state(i) for i in range(len(self.modules))]
        history: dict[str, dict[str, torch.Tensor]] = {}
        lags = 0
        if self.ps is not None:  # with staleness, the older versions the next steps need
            lags = staleness_of(int(source.read_json(ckpt.TRAIN_STATE)["step"]),
                                self.spec.parallel.ps.staleness)
            history = {str(lag): {name: torch.empty_like(p.detach())
                                  for name, p in self._checkpoint_params()}
                       for lag in range(1, lags + 1)}
            saved_keys = source.metadata.state_dict_metadata
            if all(f"ps_history.{lag}.{name}" in saved_keys
                   for lag, names in history.items() for name in names):
                states[0]["ps_history"] = history
            elif history:
                # Saved by another mode or staleness: the older versions are not there.
                # The next steps compute on the saved parameters (a new course from here).
                if dist.get_rank() == 0:
                    log.warning("the checkpoint %s holds no parameter versions for "
                                "parallel.ps.staleness=%d: the next %d steps compute on its "
                                "parameters", path, self.spec.parallel.ps.staleness, lags)
                history = {}
        source.load(states, process_group=self.groups.active)
        self._ps_history = {int(lag): v for lag, v in history.items()}
        for i, (m, opt, state) in enumerate(zip(self.plain, self.optimizers, states)):
            if self.tied_copy[i]:
                state = _rename(state, "tok_emb.weight", "lm_head.weight")
            if self.local_sgd is not None:
                self.local_sgd.load_state(i, {"anchor": state["model"], "outer": state["outer"]})
                own = f"replica{self.pm.coords.dp}."
                state = {part: {k[len(own) + len(part) + 1:]: v
                                for k, v in state["local"].items()
                                if k.startswith(f"{own}{part}.")} for part in ("model", "optim")}
            set_state_dict(m, opt, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=LOAD_OPTIONS)
        saved = source.read_json(ckpt.TRAIN_STATE)
        self._ps_norms = {int(u): float(n) for u, n in (saved.get("ps_norms") or {}).items()}
        self.step = int(saved["step"])
        if self.ps is not None and lags and not self._ps_history:
            self._ps_history = {lag: {name: p.detach().clone() for name, p in
                                      self._checkpoint_params()} for lag in range(1, lags + 1)}
        self.tokens_seen = int(saved["tokens"])
        # Checkpoints from before the position was recorded consumed step * global_batch.
        self.position = int(saved.get("position", self.step * int(saved.get(
            "global_batch", self.spec.train.global_batch))))
        if self.source_tokens is not None:
            self.source_tokens = self._saved_source_tokens(saved)
        if saved.get("order") != self._order_id() and dist.get_rank() == 0:
            log.warning("the checkpoint %s was saved by a run whose block order differs "
                        "(%s, now %s: another raypar version or another dataset): training "
                        "continues from step %d, on other blocks than that run would have read",
                        path, saved.get("order", "not recorded"), self._order_id(), self.step)
        same_layout = saved.get("layout") == self.layout()
        rng = source.rng_state(dist.get_rank()) if same_layout else None
        if rng is not None:
            ckpt.restore_rng_state(rng)
            self._load_extra_files(source)
        else:
            # A new layout has other ranks: dropout masks restart from a seed derived from
            # the step (the weights and data continue exactly; with dropout 0 nothing differs).
            torch.manual_seed(self.spec.train.seed + 1 + self.pm.coords.dp + 7919 * self.step)
        self.prefetch()  # from the restored position
        self.load_stats = source.stats
        return saved

    def _check_local_sgd(self, saved: dict[str, Any], path: str) -> None:
        """A local-SGD checkpoint holds one state per replica: it resumes only as the same
        number of replicas with the same sync_every (and only a local-SGD run reads it)."""
        p = self.spec.parallel
        problem = local_sgd_resume_problem(saved, p.dp, p.sync_every)
        if problem:  # (the driver refuses it before any worker starts; here for the rest)
            raise ValueError(f"checkpoint {path}: {problem}")

    def _source_draws(self) -> Optional[list[int]]:
        """A mixture's blocks read so far from each source (None: one dataset)."""
        if self.source_tokens is None:
            return None
        return [int(n) for n in self.order.draws_before(self.position)]

    def _saved_source_tokens(self, saved: dict[str, Any]) -> dict[str, int]:
        """A mixture's tokens per source at the checkpoint. Its draws per source are handed
        to the order (which needs them to continue each source's own order); a checkpoint
        without usable ones (another version, another mixture, one dataset, a damaged
        entry) has them counted again from the start of the stream, in O(position) time.
        The tokens the run did train on stay as saved when the sources are the same."""
        draws = saved.get("source_draws")
        same_order = saved.get("order") == self._order_id()
        remembered = False
        if same_order and isinstance(draws, list) and len(draws) == len(self.source_tokens):
            try:
                self.order.remember(self.position, draws)
                remembered = True
            except (TypeError, ValueError) as e:
                reason = f"its draws per source are unusable ({e})"
        else:
            reason = ("it was saved under another block order or mixture" if not same_order
                      else "it does not record the draws per source")
        if not remembered and dist.get_rank() == 0:
            log.warning("mixture: the checkpoint cannot continue each source's order as "
                        "saved: %s; counting the draws again from the start of the stream "
                        "(%d positions)", reason, self.position)
        counts = self.order.draws_before(self.position)
        have = saved.get("source_tokens")
        if isinstance(have, dict) and set(have) == set(self.source_tokens):
            return {name: int(have[name]) for name in self.source_tokens}
        return {name: int(c) * self.spec.data.seq_len
                for name, c in zip(self.train_data.names, counts)}
