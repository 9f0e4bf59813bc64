"""Sharded initialisation: a rank builds its stages on the meta device and materializes only
its own shards (raypar/parallel/parallelize.py), each parameter's values keyed by the seed
and its global name (raypar/model.py keyed_init_).

One 4-process spawn (gloo) checks, for several layouts, that every rank's shards put
together are bit-for-bit the single-process model's weights, and that under pp=2 x tp=2 a
rank's peak memory grows by about its quarter of the model while building it, not by the
whole model (the way raypar built models before: whole, then cut down).
"""
import os
import resource
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypar.config import ParallelConfig
from raypar.model import GPT, GPTConfig

SMALL = dict(vocab_size=72, seq_len=16, n_layer=4, n_head=4, d_model=32)
# ~29M parameters (117 MB in fp32): large enough that a whole copy stands out of a
# process's own noise.
LARGE = dict(vocab_size=8192, seq_len=64, n_layer=8, n_head=8, d_model=512)
LAYOUTS = [  # (name, ParallelConfig fields)
    ("fsdp dp2 x tp2", dict(dp=2, tp=2, pp=1, dp_mode="fsdp")),
    ("hsdp dp4 (2 x 2)", dict(dp=4, tp=1, pp=1, dp_mode="hsdp", dp_shard=2)),
    ("ddp dp2 x tp2", dict(dp=2, tp=2, pp=1, dp_mode="ddp")),
    ("tp2 x pp2 interleaved", dict(dp=1, tp=2, pp=2, schedule="interleaved_1f1b",
                                   virtual_stages=2)),
    ("fsdp dp2 x pp2", dict(dp=2, tp=1, pp=2, dp_mode="fsdp")),
]


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from raypar.parallel.mesh import build_mesh
    from raypar.parallel.parallelize import parallelize
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=4)
    results = {}
    ref = GPT(GPTConfig(**SMALL))
    ref.init_weights(seed=11)
    want = ref.state_dict()
    for name, fields in LAYOUTS:
        p = ParallelConfig(**fields)
        pm = build_mesh(p.dp, p.pp, p.tp, p.dp_shard or 1)
        modules = parallelize(GPTConfig(**SMALL), 11, pm, p, torch.device("cpu")).modules
        wrong = []
        for m in modules:
            for pname, param in m.named_parameters():
                full = param.full_tensor() if isinstance(param, DTensor) else param
                if not torch.equal(full.detach(), want[pname]):
                    wrong.append(pname)
        results[name] = wrong
    # bf16 over dp: the modules compute in bf16 from fp32 master weights, and the
    # gradients come back fp32 (FSDP2's MixedPrecisionPolicy).
    p = ParallelConfig(dp=2, tp=2, pp=1, dp_mode="fsdp")
    model = parallelize(GPTConfig(**SMALL), 11, build_mesh(2, 1, 2), p, torch.device("cpu"),
                        dtype="bf16").modules[0]
    logits = model(torch.randint(0, SMALL["vocab_size"], (2, 8)))
    logits.float().sum().backward()
    results["bf16"] = {"logits": logits.dtype,
                       "params": {q.dtype for q in model.parameters()},
                       "grads": {q.grad.dtype for q in model.parameters()}}
    before = _peak_bytes()
    p = ParallelConfig(dp=1, tp=2, pp=2)
    pm = build_mesh(1, 2, 2)
    modules = parallelize(GPTConfig(**LARGE), 11, pm, p, torch.device("cpu")).modules
    mine = sum((q.to_local() if isinstance(q, DTensor) else q).nbytes
               for m in modules for q in m.parameters())
    results["memory"] = {"growth": _peak_bytes() - before, "share": mine}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=4, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("layout", [name for name, _ in LAYOUTS])
def test_shards_put_together_are_the_single_process_weights(ranks, layout):
    for r, result in enumerate(ranks):
        assert result[layout] == [], f"rank {r}: {result[layout]}"




def test_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradients(ranks):
    for result in ranks:
        assert result["bf16"] == {"logits": torch.bfloat16, "params": {torch.float32},
                                  "grads": {torch.float32}}


def test_peak_memory_while_building_follows_the_rank_share(ranks):
    whole = 4 * GPT(GPTConfig(**LARGE)).num_params()  # bytes of the whole model in fp32
    for r, result in enumerate(ranks):
        mem = result["memory"]
        # Each rank holds about a quarter (the tied embedding's last-stage copy and the
        # replicated norms make it a little more); the build adds at most one keyed draw
        # (_INIT_CHUNK values) and the allocator's slack on top.
        assert 0.2 * whole < mem["share"] < 0.4 * whole, (r, mem)
        assert mem["growth"] < mem["share"] + 0.15 * whole, (r, mem, whole)
