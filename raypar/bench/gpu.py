"""The bench's CUDA rows: raypar's Worker on one GPU in bf16, eager and with every
transformer block compiled (torch.compile), as tokens/s and MFU (model FLOPs
utilisation: achieved model FLOPs per second over the device's peak).

Runs as a Ray task that asks for one GPU, so it measures wherever the cluster has one.
"""
from __future__ import annotations

import time
from typing import Any, Optional

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


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
    score and value products, 12 * layers * d_model * seq_len (Chowdhery et al. 2022, B)."""
    return 6 * n_params + 12 * n_layer * d_model * seq_len


def _measure(spec_dict: dict, vocab: int, blocks, compiled: bool, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from raypar.config import from_dict
    from raypar.train.loop import Worker

    spec = from_dict(spec_dict)
    cuda = torch.cuda.is_available()  # always, in the GPU task; a CPU run tests the wiring
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    store = dist.HashStore()
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1)
    try:
        worker = Worker(spec, vocab, blocks, blocks[:0])
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


def mfu_rows(bench_spec, vocab: int, blocks, steps: int, row) -> list[dict[str, Any]]:
    import ray

    from raypar.model import param_count
    from raypar.config import model_config

    spec = bench_spec(*GPU_MODEL)
    cfg = model_config(spec, vocab)
    fpt = flops_per_token(param_count(cfg), cfg.n_layer, cfg.d_model, cfg.seq_len)
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
