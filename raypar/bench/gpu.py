"""The bench's CUDA rows: raypar's RankTrainer on one GPU in bf16, eager and with every
transformer block compiled (torch.compile), as tokens/s and MFU (model FLOPs
utilisation: achieved model FLOPs per second over the device's peak).

Runs as a Ray task that asks for one GPU, so it measures wherever the cluster has one.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist

from raypar.bench.stats import row
from raypar.config import RunSpec, from_dict, model_config
from raypar.model import flops_per_token
from raypar.train.trainer import RankTrainer

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, by device name.
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
             "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}

# GPT-2 small at 1024 tokens: a model that keeps a GPU busy.
GPU_MODEL = ["model.n_layer=12", "model.n_head=12", "model.d_model=768", "model.dropout=0.0",
             "data.seq_len=1024", "train.global_batch=16", "train.micro_batch=8",
             "train.dtype=bf16"]


def peak_flops(name: str) -> Optional[float]:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None


def _measure(spec_dict: dict, vocab: int, blocks, compiled: bool, steps: int) -> dict:
    spec = from_dict(spec_dict)
    cuda = torch.cuda.is_available()  # always, in the GPU task; a CPU run tests the wiring
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    store = dist.HashStore()
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1)
    try:
        worker = RankTrainer(spec, vocab, blocks, blocks[:0])
        if compiled:
            for m in worker.plain:
                for block in m.layers.values():
                    block.compile()
        for _ in range(3):  # warm-up (and compilation)
            worker.train_step()
        sync()
        t0 = time.perf_counter()
        losses = [worker.train_step()["loss"] for _ in range(steps)]
        sync()
        seconds = time.perf_counter() - t0
        return {"tokens_per_s": steps * spec.train.global_batch * spec.data.seq_len / seconds,
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                "losses": losses}
    finally:
        dist.destroy_process_group()


def mfu_rows(spec: RunSpec, vocab: int, blocks, steps: int) -> list[dict[str, Any]]:
    """The cuda rows of spec (the bench's spec with GPU_MODEL) on the packed blocks."""
    fpt = flops_per_token(model_config(spec, vocab))
    task = ray.remote(num_gpus=1)(_measure)
    rows = []
    for compiled in (False, True):
        r = ray.get(task.remote(spec.to_dict(), vocab, blocks, compiled, steps))
        label = "torch.compile" if compiled else "eager"
        rows.append(row("cuda", f"bf16 tokens/s per GPU, {label}", r["tokens_per_s"],
                        "tokens/s", device=r["device"]))
        peak = peak_flops(r["device"])
        if peak:
            rows.append(row("cuda", f"MFU, {label}", r["tokens_per_s"] * fpt / peak,
                            "fraction", device=r["device"], peak_flops=peak,
                            flops_per_token=fpt))
    return rows
