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
import math
import time
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from raypar.config import RunSpec, from_dict
from raypar.data.packing import global_batch_indices, rank_slice
from raypar.model import GPT, GPTConfig, lm_loss, param_groups
from raypar.parallel.data import apply_data_parallel, unwrap
from raypar.parallel.mesh import ParallelMesh, build_mesh, device_type
from raypar.train import checkpoint as ckpt


def lr_at(step: int, spec: RunSpec) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step."""
    t = spec.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def model_config(spec: RunSpec, vocab_size: int) -> GPTConfig:
    m = spec.model
    return GPTConfig(vocab_size=vocab_size, seq_len=spec.data.seq_len, n_layer=m.n_layer,
                     n_head=m.n_head, d_model=m.d_model, d_ff=m.d_ff, dropout=m.dropout,
                     bias=m.bias, tie_embeddings=m.tie_embeddings, pos_encoding=m.pos_encoding)


class Worker:
    """One rank's state: mesh, model, optimizer and its view of the data."""

    def __init__(self, spec: RunSpec, vocab_size: int, train_blocks: np.ndarray,
                 val_blocks: np.ndarray):
        self.spec = spec
        torch.set_num_threads(spec.train.threads)
        p = spec.parallel
        self.pm: ParallelMesh = build_mesh(p.dp, p.pp, p.tp)
        self.device = torch.device(device_type(), torch.cuda.current_device()
                                   if torch.cuda.is_available() else None)
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        self.mcfg = model_config(spec, vocab_size)
        # Same seed on every rank: identical initial weights without a broadcast.
        torch.manual_seed(spec.train.seed)
        model = GPT(self.mcfg).to(self.device)
        self.model = apply_data_parallel(model, self.pm, p.dp_mode)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, spec.train.weight_decay), lr=spec.train.lr,
            betas=(spec.train.beta1, spec.train.beta2), foreach=False)
        # Dropout draws from the global RNG: reseed it per replica so masks differ.
        torch.manual_seed(spec.train.seed + 1 + self.pm.coords.dp)
        self.step = 0
        self.tokens_seen = 0

    # -- one optimizer step ------------------------------------------------------------
    def _autocast(self):
        if self.spec.train.dtype == "bf16":
            return torch.autocast(device_type(), dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _local_batch(self, blocks: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        mine = rank_slice(indices, self.pm.coords.dp, self.pm.dp)
        return torch.from_numpy(blocks[mine].astype(np.int64)).to(self.device)

    def _mean_over_dp(self, value: float) -> float:
        if self.pm.dp == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.pm.dp_group)
        return t.item() / self.pm.dp

    def train_step(self) -> dict[str, Any]:
        spec, t = self.spec, self.spec.train
        lr = lr_at(self.step, spec)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        indices = global_batch_indices(self.step, t.global_batch, len(self.train_blocks), t.seed)
        batch = self._local_batch(self.train_blocks, indices)
        micro = batch.split(t.micro_batch)
        self.model.train()
        loss_sum = 0.0
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            # DDP all-reduces gradients only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if last or self.pm.dp == 1 else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss = lm_loss(self.model(mb[:, :-1]), mb[:, 1:])
                (loss / len(micro)).backward()
            loss_sum += loss.item()
        params = [p for p in self.model.parameters() if p.grad is not None]
        # DDP leaves identical gradients on every replica, so the local norm is the global one.
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False).item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += t.global_batch * spec.data.seq_len
        return {"step": self.step, "loss": self._mean_over_dp(loss_sum / len(micro)),
                "lr": lr, "grad_norm": grad_norm,
                "first_block": int(indices[0]), "last_block": int(indices[-1])}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed set of validation blocks (the same at every evaluation)."""
        t = self.spec.train
        n_val = len(self.val_blocks)
        self.model.eval()
        total = 0.0
        for b in range(t.eval_batches):
            indices = np.arange(b * t.global_batch, (b + 1) * t.global_batch) % n_val
            batch = self._local_batch(self.val_blocks, indices)
            for mb in batch.split(t.micro_batch):
                with self._autocast():
                    total += lm_loss(self.model(mb[:, :-1]), mb[:, 1:]).item()
        n_micro = t.eval_batches * t.global_batch // (self.pm.dp * t.micro_batch)
        return self._mean_over_dp(total / n_micro)

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag on every rank: ray.train.report is a barrier, so all ranks must
        report at the same steps even when the decision depends on each rank's clock."""
        if dist.get_world_size() == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker."""
    spec = from_dict(config["spec"])
    worker = Worker(spec, config["vocab_size"], ray.get(config["train_ref"]),
                    ray.get(config["val_ref"]))
    meta = {"model": vars(worker.mcfg), "spec": config["spec"],
            "tokenizer": config["tokenizer_json"]}
    pending: list[dict[str, Any]] = []
    last_report = time.perf_counter()
    while worker.step < spec.train.steps:
        t0 = time.perf_counter()
        row = worker.train_step()
        row["tokens_per_s"] = spec.train.global_batch * spec.data.seq_len / (
            time.perf_counter() - t0)
        row["tokens"] = worker.tokens_seen
        if worker.eval_due():
            row["val_loss"] = worker.evaluate()
        pending.append(row)
        checkpoint = None
        if worker.checkpoint_due():
            checkpoint = ckpt.save(unwrap(worker.model), worker.optimizer,
                                   {"step": worker.step, "tokens": worker.tokens_seen}, meta)
        due = checkpoint is not None or worker.step == spec.train.steps or \
            time.perf_counter() - last_report >= REPORT_INTERVAL_S
        if worker.agree(due):
            ray.train.report({"rows": pending}, checkpoint=checkpoint,
                             checkpoint_dir_name=ckpt.dir_name(worker.step),
                             delete_local_checkpoint_after_upload=True)
            pending, last_report = [], time.perf_counter()
