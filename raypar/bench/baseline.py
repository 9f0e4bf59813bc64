"""What a user would run instead of raypar, for `raypar bench` to measure against.

    python -m raypar.bench.baseline bare  --job JOB.json --out OUT.json
    torchrun --standalone --nproc_per_node=N -m raypar.bench.baseline torchrun --job ... --out ...

`bare` is a single-process PyTorch training loop in the style of nanoGPT's train.py: the
same GPT module, AdamW, gradient accumulation, global-norm clipping and warmup/cosine LR,
on the same packed blocks, with none of raypar's machinery (no Ray, no mesh, no
checkpoint or metrics plumbing). `torchrun` runs raypar's own per-rank `RankTrainer` (the
same model code and layout as a raypar run) in processes that torchrun launches and
torch.distributed connects, without Ray.

JOB.json: {"spec": RunSpec.to_dict(), "vocab_size": int, "blocks": "train.npy",
"val": "val.npy", "steps": int, "launched": time.time() when the launcher was started}.
OUT.json (rank 0): {"step_end": [time.time() after each step], "launched": ...,
"loss": [...]}. Each process keeps to spec.train.threads torch threads.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from raypar.config import from_dict, model_config
from raypar.model import GPT, lm_loss, param_groups
from raypar.train.trainer import RankTrainer, lr_at


def _load(job_path: str):
    with open(job_path) as f:
        job = json.load(f)
    return job, from_dict(job["spec"])


def bare(job_path: str, out_path: str) -> None:
    job, spec = _load(job_path)
    t = spec.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    blocks = np.load(job["blocks"])
    model = GPT(model_config(spec, job["vocab_size"]))
    model.train()
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                            betas=(t.beta1, t.beta2), foreach=False)
    n_micro = t.global_batch // t.micro_batch
    step_end, losses = [], []
    for step in range(job["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        rows = (step * t.global_batch + np.arange(t.global_batch)) % len(blocks)
        batch = torch.from_numpy(blocks[rows].astype(np.int64))
        total = 0.0
        for micro in batch.split(t.micro_batch):
            loss = lm_loss(model(micro[:, :-1]), micro[:, 1:])
            (loss / n_micro).backward()
            total += loss.item()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n_micro)
        step_end.append(time.time())
    _write(out_path, {"step_end": step_end, "loss": losses, "launched": job["launched"]})


def under_torchrun(job_path: str, out_path: str) -> None:
    job, spec = _load(job_path)
    dist.init_process_group("gloo")  # rank, world and rendezvous from torchrun's env
    try:
        worker = RankTrainer(spec, job["vocab_size"], np.load(job["blocks"]), np.load(job["val"]))
        step_end, losses = [], []
        while worker.step < job["steps"]:
            row = worker.train_step()
            step_end.append(time.time())
            losses.append(row["loss"])
        if dist.get_rank() == 0:
            _write(out_path, {"step_end": step_end, "loss": losses, "launched": job["launched"],
                              "world": dist.get_world_size()})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m raypar.bench.baseline")
    parser.add_argument("mode", choices=["bare", "torchrun"])
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    (bare if args.mode == "bare" else under_torchrun)(args.job, args.out)


if __name__ == "__main__":
    main()
