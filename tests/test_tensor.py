"""Tensor parallelism parity tests: python -m pytest -q tests/test_tensor.py

Real processes on gloo (torch.multiprocessing, spawn). Starting processes is
most of the cost on a small machine, so one group of 4 runs every case in turn
(the tp=2 cases on ranks 0-1's tp sub-mesh, then the 4-rank cases) and writes
each case's outcome (None or a traceback) to a file per rank; the tests below
report case by case. A crashed or hung child fails the fixture (mp.spawn with
join=True raises; collectives time out). TP_TEST_TIMES=1 with -s prints timings.

Every case checks the sharded model against the dense model built from the same
seed: loss / outputs, and every parameter's gradient gathered with
`full_tensor()`, with torch.testing.assert_close in fp32 with dropout 0.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing import assert_close

from raypar.model import GPT, GPTConfig, lm_loss, param_groups, rope_cos_sin
from raypar.parallel.tensor import (apply_tensor_parallel, grad_sq_norm, loss_context,
                                    tp_compatible, tp_shard_dim)

V, T, D, H, L, B = 128, 16, 32, 4, 2, 2


# --------------------------------------------------------------------------- helpers (children)

def cfg(**kw) -> GPTConfig:
    base = dict(vocab_size=V, seq_len=T, n_layer=L, n_head=H, d_model=D, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def build(c: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(c)


def pair(c: GPTConfig, mesh, sp: bool = False, edit=None) -> tuple[GPT, GPT]:
    """(dense, tensor-parallel) copies of the same model; `edit` turns both into a stage."""
    dense, tp = build(c), build(c)
    if edit is not None:
        edit(dense)
        edit(tp)
    assert apply_tensor_parallel(tp, mesh, sequence_parallel=sp) is tp
    return dense, tp


def tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def randn(*shape, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_grads_match(tp: nn.Module, dense: nn.Module, prefix: str = "") -> None:
    ref = {n: p for n, p in dense.named_parameters() if n.startswith(prefix)}
    mine = [(n, p) for n, p in tp.named_parameters() if n.startswith(prefix)]
    assert [n for n, _ in mine] == list(ref), "parameter names differ from the dense model"
    assert mine, f"no parameters under {prefix!r}"
    for n, p in mine:
        assert p.grad is not None, n
        if isinstance(p, DTensor):
            # Gradients keep their parameter's layout (optimizer state, dp all-reduce).
            assert p.grad.placements == p.placements, (n, p.grad.placements, p.placements)
        assert_close(full(p.grad), ref[n].grad, msg=lambda m, n=n: f"{n}: {m}")


def assert_shard_dims_as_declared(tp: nn.Module) -> None:
    """tp_shard_dim (what raypar plan counts) says what apply_tensor_parallel did."""
    for n, p in tp.named_parameters():
        dim = tp_shard_dim(n)
        placements = p.placements if isinstance(p, DTensor) else (Replicate(),)
        assert placements == ((Replicate(),) if dim is None else (Shard(dim),)), (n, placements)


def dense_sq_norm(model: nn.Module) -> torch.Tensor:
    return sum(p.grad.double().square().sum() for p in model.parameters()).float()


# --------------------------------------------------------------------------- cases (children)

def case_linear_layers(ctx):
    """A column-parallel linear (mlp.fc) and a row-parallel one (mlp.proj), each on its own."""
    mesh, r, n = ctx["mesh"], ctx["rank"], ctx["tp"]
    dense, tp = pair(cfg(bias=True), mesh)
    d_fc, t_fc = dense.layers["0"].mlp.fc, tp.layers["0"].mlp.fc
    d_pr, t_pr = dense.layers["0"].mlp.proj, tp.layers["0"].mlp.proj
    assert t_fc.weight.placements == (Shard(0),) and t_pr.weight.placements == (Shard(1),)
    assert t_pr.bias.placements == (Replicate(),)

    # column: replicated input in, this rank's slice of the output features out
    x = randn(B, T, D).requires_grad_()
    xs = x.detach().clone().requires_grad_()
    ref, out = d_fc(x), t_fc(xs)
    assert not isinstance(out, DTensor) and out.shape == (B, T, 4 * D // n)
    assert_close(out, ref.chunk(n, -1)[r])
    g = randn(*ref.shape, seed=3)
    ref.backward(g)
    out.backward(g.chunk(n, -1)[r])
    assert_close(xs.grad, x.grad)  # the column-parallel input gradient is all-reduced
    assert_grads_match(tp, dense, "layers.0.mlp.fc.")

    # row: this rank's slice of the input features in, the full (all-reduced) output out
    h = randn(B, T, 4 * D, seed=4).requires_grad_()
    hs = h.detach().chunk(n, -1)[r].clone().requires_grad_()
    ref, out = d_pr(h), t_pr(hs)
    assert not isinstance(out, DTensor) and out.shape == (B, T, D)
    assert_close(out, ref)
    g = randn(B, T, D, seed=5)
    ref.backward(g)
    out.backward(g)
    assert_close(hs.grad, h.grad.chunk(n, -1)[r])
    assert_grads_match(tp, dense, "layers.0.mlp.proj.")


def _module_parity(ctx, name, call, **kw):
    mesh = ctx["mesh"]
    dense, tp = pair(cfg(**kw), mesh)
    x = randn(B, T, D).requires_grad_()
    xs = x.detach().clone().requires_grad_()
    ref, out = call(dense.get_submodule(name), x), call(tp.get_submodule(name), xs)
    assert not isinstance(out, DTensor) and out.shape == ref.shape
    assert_close(out, ref)
    g = randn(*ref.shape, seed=3)
    ref.backward(g)
    out.backward(g)
    assert_close(xs.grad, x.grad)
    assert_grads_match(tp, dense, name + ".")


def case_attention(ctx):
    """Attention with n_head / tp heads per rank, rotary tables applied to the local heads."""
    rope = rope_cos_sin(T, D // H)
    _module_parity(ctx, "layers.1.attn", lambda m, x: m(x, rope))
    _module_parity(ctx, "layers.0.attn", lambda m, x: m(x, None), bias=True,
                   pos_encoding="learned")


def case_mlp(ctx):
    _module_parity(ctx, "layers.0.mlp", lambda m, x: m(x))
    _module_parity(ctx, "layers.1.mlp", lambda m, x: m(x), bias=True, d_ff=48)


def case_embedding(ctx):
    """Vocab-parallel embedding: weight rows sharded, the masked lookups summed."""
    mesh, n = ctx["mesh"], ctx["tp"]
    dense, tp = pair(cfg(tie_embeddings=False), mesh)
    w = tp.tok_emb.weight
    assert w.placements == (Shard(0),) and w.to_local().shape == (V // n, D)
    x, _ = tokens()
    ref, out = dense.tok_emb(x), tp.tok_emb(x)
    assert not isinstance(out, DTensor)
    assert_close(out, ref)
    g = randn(B, T, D, seed=3)
    ref.backward(g)
    out.backward(g)
    assert_grads_match(tp, dense, "tok_emb.")


def case_loss_parallel(ctx):
    """Cross-entropy on vocab-sharded logits, alone and behind the column-parallel LM head."""
    mesh, n = ctx["mesh"], ctx["tp"]
    _, y = tokens()
    logits = randn(B, T, V).requires_grad_()
    ref = lm_loss(logits, y)
    ref.backward()
    sharded = distribute_tensor(logits.detach(), mesh, [Shard(2)]).requires_grad_()
    with loss_parallel():
        loss = lm_loss(sharded, y)
        loss.backward()
    assert_close(full(loss), ref)
    assert_close(full(sharded.grad), logits.grad)
    low = randn(B, T, V, seed=6).bfloat16()  # lm_loss upcasts bf16 logits: .float() on a DTensor
    with loss_parallel():
        loss = lm_loss(distribute_tensor(low, mesh, [Shard(2)]), y)
    assert_close(full(loss), lm_loss(low, y))

    dense, tp = pair(cfg(tie_embeddings=False), mesh)
    assert isinstance(loss_context(dense), contextlib.nullcontext)
    assert not isinstance(loss_context(tp), contextlib.nullcontext)
    assert not isinstance(loss_context([dense, tp]), contextlib.nullcontext)
    h = randn(B, T, D, seed=4).requires_grad_()
    hs = h.detach().clone().requires_grad_()
    ref = lm_loss(dense.lm_head(h), y)
    ref.backward()
    with loss_context(tp):
        out = tp.lm_head(hs)
        assert isinstance(out, DTensor) and out.placements == (Shard(2),)
        assert out.shape == (B, T, V) and out.to_local().shape == (B, T, V // n)
        loss = lm_loss(out, y)
        loss.backward()
    assert_close(full(loss), ref)
    assert_close(hs.grad, h.grad)
    assert_grads_match(tp, dense, "lm_head.")


def _whole(ctx, sp, mesh=None, batch_seed=1, **kw):
    mesh = mesh or ctx["mesh"]
    n = mesh.size()
    c = cfg(**kw)
    dense, tp = pair(c, mesh, sp)
    tied = c.tie_embeddings
    if tied:
        assert tp.lm_head.weight is tp.tok_emb.weight
    assert len(list(tp.parameters())) == len(list(dense.parameters()))
    assert tp.num_params() == dense.num_params()
    assert_shard_dims_as_declared(tp)

    seen = []  # what each block hands to the next: plain tensors, sequence-sharded with sp
    for block in tp.layers.values():
        block.register_forward_hook(lambda m, a, out: seen.append((type(out), tuple(out.shape))))
    x, y = tokens(batch_seed)
    ref = lm_loss(dense(x), y)
    ref.backward()
    with loss_context(tp):
        logits = tp(x)
        assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
        assert logits.to_local().shape == (B, T, V // n)
        loss = lm_loss(logits, y)
        loss.backward()
    assert seen == [(torch.Tensor, (B, T // n if sp else T, D))] * L
    assert_close(full(loss), ref)
    assert_grads_match(tp, dense)
    if tied:
        assert tp.lm_head.weight is tp.tok_emb.weight
    params = list(tp.parameters())
    sq = grad_sq_norm(params + params[::2])  # repeats are counted once
    assert type(sq) is torch.Tensor and sq.ndim == 0
    assert_close(sq, dense_sq_norm(dense))


def case_model_tied(ctx):
    _whole(ctx, sp=False)


def case_model_untied(ctx):
    _whole(ctx, sp=False, tie_embeddings=False, bias=True, pos_encoding="learned")


def case_model_sp_tied(ctx):
    _whole(ctx, sp=True)


def case_model_sp_untied(ctx):
    _whole(ctx, sp=True, tie_embeddings=False, bias=True, pos_encoding="learned")


def _stage(ctx, sp, layers, emb, norm, head, **kw):
    """A pipeline-stage-like model: some of the blocks, with or without the ends."""
    mesh = ctx["mesh"]

    def edit(m):
        for name in list(m.layers.keys()):
            if name not in layers:
                del m.layers[name]
        if not emb:
            m.tok_emb, m.pos_emb = None, None
        if not norm:
            m.norm = None
        if not head:
            m.lm_head = None

    dense, tp = pair(cfg(**kw), mesh, sp, edit)
    if emb:
        x, y = tokens()
        xs = x
    else:  # hidden states from the previous stage: full and replicated
        x, (_, y) = randn(B, T, D).requires_grad_(), tokens()
        xs = x.detach().clone().requires_grad_()
    ref = dense(x)
    if head:
        ref = lm_loss(ref, y)
        ref.backward()
        with loss_context(tp):
            out = lm_loss(tp(xs), y)
            out.backward()
        out = full(out)
    else:
        out = tp(xs)
        assert type(out) is torch.Tensor and out.shape == (B, T, D)  # the stage boundary
        g = randn(B, T, D, seed=3)
        ref.backward(g)
        out.backward(g)
    assert_close(out, ref)
    if not emb:
        assert_close(xs.grad, x.grad)
    assert_grads_match(tp, dense)


STAGES = [  # (layers, tok_emb, norm, lm_head)
    (["0"], True, False, False),   # first stage
    (["1"], False, False, False),  # middle stage
    (["1"], False, True, False),   # norm but no head
    (["1"], False, True, True),    # last stage
    ([], False, True, True),       # head only
]


def case_stages(ctx):
    for sp in (False, True):
        for layers, emb, norm, head in STAGES:
            _stage(ctx, sp, layers, emb, norm, head)
    _stage(ctx, True, ["0"], True, False, False, pos_encoding="learned", bias=True)


def _adamw(ctx, sp, steps=3, max_norm=0.5, **kw):
    """Training steps with global-norm clipping: the loss sequence matches the dense run."""
    dense, tp = pair(cfg(**kw), ctx["mesh"], sp)
    opts = [torch.optim.AdamW(param_groups(m, 0.1), lr=1e-2, foreach=False) for m in (dense, tp)]
    ref_losses, losses, clipped = [], [], 0
    for step in range(steps):
        x, y = tokens(10 + step)
        for o in opts:
            o.zero_grad()
        ref = lm_loss(dense(x), y)
        ref.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm)
        with loss_context(tp):
            loss = lm_loss(tp(x), y)
            loss.backward()
        norm = grad_sq_norm(tp.parameters()).sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in tp.parameters():
            p.grad.mul_(coef)
        assert_close(norm, ref_norm)
        clipped += int(ref_norm > max_norm)
        for o in opts:
            o.step()
        ref_losses.append(ref.item())
        losses.append(full(loss).item())
    assert clipped > 0, "the test should exercise clipping"
    assert_close(torch.tensor(losses), torch.tensor(ref_losses))
    ref = dict(dense.named_parameters())
    for n, p in tp.named_parameters():
        # Adam divides by sqrt(v): an entry with a near-zero gradient turns a 1e-9
        # rounding difference into a visible one, so the weights get a looser bound.
        assert_close(full(p.detach()), ref[n].detach(), atol=1e-4, rtol=1e-3,
                     msg=lambda m, n=n: f"{n}: {m}")


def case_adamw_steps(ctx):
    _adamw(ctx, sp=False)
    _adamw(ctx, sp=True, tie_embeddings=False, bias=True, pos_encoding="learned")


def case_grad_sq_norm(ctx):
    """Shard (uneven) counted across shards, Replicate once, Partial resolved, plain, repeats."""
    mesh, r, n = ctx["mesh"], ctx["rank"], ctx["tp"]
    g1, g2, g3, g4 = (randn(5, 3, seed=s) for s in (1, 2, 3, 4))
    a = nn.Parameter(distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)]))
    a.grad = distribute_tensor(g1, mesh, [Shard(0)])
    b = nn.Parameter(distribute_tensor(torch.zeros(5, 3), mesh, [Replicate()]))
    b.grad = distribute_tensor(g2, mesh, [Replicate()])
    c = nn.Parameter(distribute_tensor(torch.zeros(5, 3), mesh, [Replicate()]))
    c.grad = DTensor.from_local(g3 * (r + 1) / (n * (n + 1) / 2), mesh, [Partial()])
    d = nn.Parameter(torch.zeros(5, 3))
    d.grad = g4.clone()
    e = nn.Parameter(torch.zeros(2))  # no gradient: skipped
    expect = sum(g.square().sum() for g in (g1, g2, g3, g4))
    got = grad_sq_norm([a, b, c, d, e, a, c, d])
    assert type(got) is torch.Tensor and got.ndim == 0
    assert_close(got, expect)
    assert_close(grad_sq_norm([d]), g4.square().sum())
    assert_close(grad_sq_norm([a]), g1.square().sum())
    assert_close(grad_sq_norm([]), torch.tensor(0.0))


def case_tp1_unchanged(ctx):
    tp_mesh = ctx["tp1"]
    assert tp_mesh.size() == 1
    model = build(cfg())
    before = {n: p for n, p in model.named_parameters()}
    assert apply_tensor_parallel(model, tp_mesh) is model
    assert {n: p for n, p in model.named_parameters()} == before
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert isinstance(loss_context(model), contextlib.nullcontext)


def case_tp4_model_sp(ctx):
    _whole(ctx, sp=True)  # one head and 32 vocab rows per rank


def case_dp2_tp2(ctx):
    """The tp sub-mesh of a (dp, tp) mesh, as the trainer builds it; replicas see different data."""
    mesh = ctx["mesh22"]
    dp_rank = mesh.get_local_rank("dp")
    _whole(ctx, sp=False, mesh=mesh["tp"], batch_seed=100 + dp_rank)
    _whole(ctx, sp=True, mesh=mesh["tp"], batch_seed=200 + dp_rank, tie_embeddings=False)


def case_grad_sq_norm_2d(ctx):
    """Gradients on a 2-D mesh: each mesh dim's placement handled on its own."""
    mesh = ctx["mesh22"]
    coord = mesh.get_coordinate()
    g1, g2, g3 = (randn(6, 4, seed=s) for s in (1, 2, 3))
    specs = [(g1, [Shard(0), Shard(1)]), (g2, [Replicate(), Shard(0)])]
    params = []
    for g, placements in specs:
        p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, placements))
        p.grad = distribute_tensor(g, mesh, placements)
        params.append(p)
    # Partial over dp, sharded over tp: the dp halves sum to g3.
    p = nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Replicate(), Shard(0)]))
    half = g3.chunk(2, 0)[coord[1]] * (0.25 if coord[0] == 0 else 0.75)
    p.grad = DTensor.from_local(half, mesh, [Partial(), Shard(0)], run_check=False)
    params.append(p)
    got = grad_sq_norm(params + params)
    assert_close(got, sum(g.square().sum() for g in (g1, g2, g3)))


WORLD2 = ["linear_layers", "attention", "mlp", "embedding", "loss_parallel", "model_tied",
          "model_untied", "model_sp_tied", "model_sp_untied", "stages", "adamw_steps",
          "grad_sq_norm", "tp1_unchanged"]
WORLD4 = ["tp4_model_sp", "dp2_tp2", "grad_sq_norm_2d"]


def _run_cases(names, ctx, results):
    for name in names:
        try:
            t0 = time.perf_counter()
            globals()["case_" + name](ctx)
            if ctx["rank"] == 0 and os.environ.get("TP_TEST_TIMES"):
                print(f"{name}: {time.perf_counter() - t0:.2f}s", flush=True)
            results[name] = None
        except Exception:  # recorded here, reported by the test of that name
            results[name] = traceback.format_exc()


def _worker(rank, world, port, out_dir):
    """One of 4 processes: ranks 0-1 run the tp=2 cases on their tp sub-mesh while
    ranks 2-3 wait (starting one group of processes is most of this file's time),
    then all four run the 4-rank cases."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    mesh4 = init_device_mesh("cpu", (world,))
    mesh22 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp1 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))["tp"]
    results: dict[str, str | None] = {}
    if mesh22.get_local_rank("dp") == 0:
        ctx = {"mesh": mesh22["tp"], "rank": mesh22.get_local_rank("tp"), "tp": 2, "tp1": tp1}
        _run_cases(WORLD2, ctx, results)
    dist.barrier()
    _run_cases(WORLD4, {"mesh": mesh4, "rank": rank, "tp": world, "mesh22": mesh22}, results)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str | None]:
    """Case name -> None, or the first failing rank's traceback."""
    out_dir = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(4, _free_port(), str(out_dir)), nprocs=4, join=True,
             start_method="spawn")
    merged: dict[str, str | None] = {}
    for rank in range(4):
        with open(out_dir / f"rank{rank}.json") as f:
            for name, err in json.load(f).items():
                merged[name] = merged.get(name) or (f"rank {rank}:\n{err}" if err else None)
    assert sorted(merged) == sorted(WORLD2 + WORLD4)
    return merged


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", WORLD2)
def test_tp2(outcomes, name):
    err = outcomes[name]
    assert err is None, err


@pytest.mark.parametrize("name", WORLD4)
def test_tp4(outcomes, name):
    err = outcomes[name]
    assert err is None, err


def test_tp_compatible():
    assert tp_compatible(8, 4096, 4) is None
    assert tp_compatible(6, 4096, 1) is None
    assert tp_compatible(6, 4096, 4) == "model.n_head (6) must be divisible by parallel.tp (4)"
    msg = tp_compatible(6, 4160, 4)
    assert msg is not None and msg.startswith("model.n_head (6)")
    msg = tp_compatible(6, 4160, 3)
    assert msg is not None and "parallel.tp (3)" in msg and "4160" in msg and "64" in msg
    assert "\n" not in msg
    assert "parallel.tp (0)" in tp_compatible(4, 128, 0)


def test_tp_shard_dim_names_what_the_plan_shards():
    model = build(cfg(bias=True, pos_encoding="learned", tie_embeddings=False))
    dims = {n: tp_shard_dim(n) for n, _ in model.named_parameters()}
    assert dims["tok_emb.weight"] == 0 and dims["lm_head.weight"] == 0  # vocab rows
    for i in range(L):
        for m in ("attn.wq", "attn.wk", "attn.wv", "mlp.fc"):  # column-parallel: out features
            assert dims[f"layers.{i}.{m}.weight"] == 0 and dims[f"layers.{i}.{m}.bias"] == 0
        for m in ("attn.wo", "mlp.proj"):  # row-parallel: in features; the bias is whole
            assert dims[f"layers.{i}.{m}.weight"] == 1 and dims[f"layers.{i}.{m}.bias"] is None
    replicated = {n for n, d in dims.items() if d is None}
    assert replicated == {"pos_emb.weight", "norm.weight", "norm.bias",
                          *(f"layers.{i}.{m}" for i in range(L)
                            for m in ("attn_norm.weight", "attn_norm.bias", "mlp_norm.weight",
                                      "mlp_norm.bias", "attn.wo.bias", "mlp.proj.bias"))}
    assert tp_shard_dim("layers.attn.wq.weight") is None  # not a block's parameter


class _FakeMesh:
    """Enough of a 1-D DeviceMesh for apply_tensor_parallel's checks, which come first."""
    ndim, device_type = 1, "cpu"

    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_apply_rejects_incompatible_sizes():
    msg = r"model.n_head \(4\) must be divisible by parallel.tp \(3\)"
    with pytest.raises(ValueError, match=msg):
        apply_tensor_parallel(build(cfg()), _FakeMesh(3))
