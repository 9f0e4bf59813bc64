"""The parameter server (parallel.dp_mode=ps, raypar/parallel/ps.py) on a real local Ray.

- Synchronous (staleness 0): dp=2 replicas of pp=2 stages push to 4 shards (the token
  table, larger than a shard's fair share, is split into row slices across two of them;
  both pipeline ends push its tied gradient) and reproduce the single process, loss and
  grad_norm at rtol 1e-5, through the driver as `raypar train` runs it.
- Synchronous dp=2 x tp=2 (each tp rank pushes and pulls its own blocks of the pieces)
  reproduces the single process too.
- Bounded staleness 2: the run is deterministic: a run whose shard actor is killed mid-run
  (Ray restarts the actor; the workers restart from the last checkpoint, which holds the
  shards' state and the older parameter versions) equals the uninterrupted run bit for bit,
  and it is not the synchronous curve.
- Compressed pushes (parallel.grad_compression): bf16 stays near the synchronous curve;
  PowerSGD pushes exactly the bytes its factors take, and a run killed mid-run resumes
  bit for bit (each rank's error feedback and warm-start Q come back from the checkpoint).
The shard's own arithmetic (row slices, clipping, AdamW, versions) and PowerSGD's error
feedback are checked without Ray.
"""
import asyncio
import json
import math

import pytest
import torch

from raypar.config import ConfigError, load_spec
from raypar.parallel import ps
from raypar.train.driver import run
from raypar.train.rundir import read_metrics
from raypar.train.trainer import lr_at

from conftest import ROOT, single_process_rows

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
STEPS, EVERY = 8, 4
COMMON = [f"train.steps={STEPS}", "train.eval_every=4", "tracking.enabled=false",
          "parallel.dp=1"]
PS_PP = ["parallel.dp=2", "parallel.dp_mode=ps", "parallel.ps.shards=4", "parallel.pp=2",
         "parallel.schedule=1f1b"]
PS_TP = ["parallel.dp=2", "parallel.dp_mode=ps", "parallel.ps.shards=4", "parallel.tp=2"]
STALE = ["parallel.dp=2", "parallel.dp_mode=ps", "parallel.ps.shards=2",
         "parallel.ps.staleness=2", f"checkpoint.every={EVERY}"]
POWERSGD = ["parallel.dp_mode=ps", "parallel.ps.shards=2",
            "parallel.grad_compression=powersgd", "parallel.powersgd_rank=2",
            f"checkpoint.every={EVERY}"]


def spec_for(corpus, cache, *overrides):
    return load_spec(TINY, [f"data.path={corpus}", f"data.cache_dir={cache}", *COMMON,
                            *overrides])


@pytest.fixture(scope="module")
def reference(ray_local, small_corpus, cache_dir, tmp_path_factory):
    return single_process_rows(spec_for(small_corpus, cache_dir), cache_dir,
                               tmp_path_factory.mktemp("ref"))


def assert_matches(rows, reference):
    """A synchronous run's rows against one process: loss, grad_norm, val_loss at 1e-5."""
    for key in ("loss", "grad_norm", "val_loss"):
        got = [r[key] for r in rows if key in r]
        want = [r[key] for r in reference if key in r]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=1e-5), key


@pytest.fixture(scope="module")
def stale_run(ray_local, small_corpus, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stale") / "run"
    run(spec_for(small_corpus, cache_dir, *STALE), run_dir, progress=False)
    ranks = json.loads((run_dir / "ranks.json").read_text())
    return read_metrics(run_dir)[0], {r["rank"]: r["meetings"] for r in ranks}


def test_sync_ps_with_pp_reproduces_single_process(reference, small_corpus, cache_dir,
                                                   tmp_path):
    spec = spec_for(small_corpus, cache_dir, *PS_PP)
    plan = ps.plan_shards(spec, 320)
    assert sum(p.name == "tok_emb.weight" for shard in plan for p in shard) == 2, \
        "the token table is split into row slices"
    run(spec, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")[0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_matches(rows, reference)
    assert all(r["staleness"] == 0 for r in rows)
    # Replica 0's two ranks push every gradient and pull every parameter once a step: the
    # whole model in fp32, twice, the tied table once more (both pipeline ends hold it).
    from raypar.model import GPT
    from raypar.config import model_config
    model = GPT(model_config(spec, 320))
    params = sum(p.numel() for p in model.parameters())
    table = model.tok_emb.weight.numel()
    assert all(r["comm_bytes"] == 2 * 4 * (params + table) for r in rows), rows[0]


def test_sync_ps_with_tp_reproduces_single_process(reference, small_corpus, cache_dir,
                                                   tmp_path):
    """dp=2 x tp=2: each tp rank pushes and pulls its own blocks of the pieces. (The run's
    last checkpoint gathers the shards' state into the tp ranks' DTensors.)"""
    from raypar.parallel.tensor import tp_shard_dim
    spec = spec_for(small_corpus, cache_dir, *PS_TP)
    table = [p for shard in ps.plan_shards(spec, 320) for p in shard if p.name == "tok_emb.weight"]
    # The token table's two row slices are the two tp shards' rows: each tp rank pushes
    # and pulls one of them and holds nothing of the other.
    assert sorted((p.r0, p.r1) for p in table) == [(0, 160), (160, 320)]
    run(spec, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")[0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_matches(rows, reference)
    # Replica 0's two tp ranks push their shards' gradients (a replicated parameter's from
    # tp rank 0 alone) and pull their shards, a replicated parameter each.
    shapes = _model_shapes(spec)
    params = sum(math.prod(s) for s in shapes.values())
    replicated = sum(math.prod(s) for n, s in shapes.items() if tp_shard_dim(n) is None)
    assert all(r["comm_bytes"] == 4 * (2 * params + replicated) for r in rows), rows[0]


def test_stale_ps_resumes_exactly_after_a_shard_is_killed(stale_run, reference, small_corpus,
                                                          cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPAR_FAULT", "rank=1,step=6,phase=ps")
    run_dir = tmp_path / "run"
    run(spec_for(small_corpus, cache_dir, *STALE, "checkpoint.max_failures=1"), run_dir,
        progress=False)
    assert (run_dir / ".fault-fired").read_text().split() == ["ps", "6"]
    rows, events = read_metrics(run_dir)
    [recovery] = [e for e in events if e["event"] == "recovery"]
    assert recovery["cause"] == "failure" and recovery["step"] == EVERY
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    uninterrupted, met = stale_run
    # The replicas met only every staleness + 1 steps and at the save: after steps 3, 4, 6
    # and 8. In between, a replica waited for no other (only for the versions it needs).
    assert met == {0: 4, 1: 4}
    for r, e in zip(rows, uninterrupted):  # the same run: bit for bit
        for key in ("loss", "grad_norm", "val_loss", "staleness"):
            assert r.get(key) == e.get(key), (r["step"], key)
    # Step t computed on the parameters after update max(0, t - 2): the first three
    # gradients all on the initial weights, and the first step equals the sync one.
    assert [r["staleness"] for r in rows] == [0, 1, 2, 2, 2, 2, 2, 2]
    assert rows[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in rows[3:]] != pytest.approx([r["loss"] for r in reference[3:]],
                                                          rel=1e-4)
    # The norm a row shows is that of update t - 2, the newest the replica pulled.
    assert "grad_norm" not in rows[0] and "grad_norm" not in rows[1]
    assert all(r["grad_norm"] > 0 for r in rows[2:])


@pytest.fixture(scope="module")
def powersgd_rows(ray_local, small_corpus, cache_dir, tmp_path_factory):
    """PowerSGD pushes from one process (its shards on this module's Ray): the run the
    killed one must equal."""
    rows = single_process_rows(spec_for(small_corpus, cache_dir, *POWERSGD), cache_dir,
                               tmp_path_factory.mktemp("powersgd"))
    return [r.to_json() for r in rows]


def _model_shapes(spec):
    from raypar.config import model_config
    from raypar.model import GPT
    with torch.device("meta"):
        model = GPT(model_config(spec, 320))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_bf16_pushes_stay_near_the_synchronous_curve(reference, small_corpus, cache_dir,
                                                    tmp_path):
    spec = spec_for(small_corpus, cache_dir, "parallel.dp_mode=ps", "parallel.ps.shards=2",
                    "parallel.grad_compression=bf16")
    rows = [r.to_json() for r in single_process_rows(spec, cache_dir, tmp_path)]
    # bf16 keeps 8 bits of mantissa in each pushed gradient (the shard sums in fp32): the
    # tolerances of ddp's bf16 all-reduce (tests/test_comm.py), loss 2e-3, norm 3e-2.
    for key, rel in (("loss", 2e-3), ("grad_norm", 3e-2), ("val_loss", 2e-3)):
        got = [r[key] for r in rows if key in r]
        want = [r[key] for r in reference if key in r]
        assert len(got) == len(want) > 0 and got == pytest.approx(want, rel=rel), key
    assert [r["loss"] for r in rows] != [r["loss"] for r in reference], "not compressed"
    # The rank pushes every gradient in bf16 and pulls every parameter in fp32.
    params = sum(math.prod(s) for s in _model_shapes(spec).values())
    assert all(r["comm_bytes"] == (2 + 4) * params for r in rows), rows[0]


def test_powersgd_pushes_the_bytes_of_its_factors(powersgd_rows, reference, small_corpus,
                                                  cache_dir):
    spec = spec_for(small_corpus, cache_dir, *POWERSGD)
    shapes = _model_shapes(spec)
    # Per piece of the plan (its rows x the rest of its tensor): rank-2 factors P (n x 2)
    # and Q (m x 2) where they take less than half of the n x m matrix, else the piece.
    pushed = pulled = 0
    for piece in (p for shard in ps.plan_shards(spec, 320) for p in shard):
        n, m = piece.r1 - piece.r0, piece.numel // (piece.r1 - piece.r0)
        matrix = len(shapes[piece.name]) > 1
        pushed += 4 * ((n + m) * 2 if matrix and (n + m) * 2 * 2 < n * m else n * m)
        pulled += 4 * piece.numel
    assert pushed < pulled / 3, "most of the model travels as factors"
    assert all(r["comm_bytes"] == pushed + pulled for r in powersgd_rows), powersgd_rows[0]
    # Its first step computes on the initial weights (nothing compressed yet shows); later
    # steps follow a low-rank approximation of the gradient, close to the exact curve.
    assert powersgd_rows[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in powersgd_rows] == pytest.approx(
        [r["loss"] for r in reference], rel=1e-2)  # measured 1.8e-3
    assert powersgd_rows[-1]["loss"] != pytest.approx(reference[-1]["loss"], rel=1e-5)


def test_powersgd_ps_resumes_exactly_after_the_worker_is_killed(powersgd_rows, small_corpus,
                                                                 cache_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("RAYPAR_FAULT", "rank=0,step=6,phase=step")
    run_dir = tmp_path / "run"
    run(spec_for(small_corpus, cache_dir, *POWERSGD, "checkpoint.max_failures=1"), run_dir,
        progress=False)
    rows, events = read_metrics(run_dir)
    [recovery] = [e for e in events if e["event"] == "recovery"]
    assert recovery["cause"] == "failure" and recovery["step"] == EVERY
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, e in zip(rows, powersgd_rows):  # the same run: bit for bit
        for key in ("loss", "grad_norm", "val_loss", "comm_bytes"):
            assert r.get(key) == e.get(key), (r["step"], key)


# -- the shard's arithmetic, without Ray ----------------------------------------------------

def test_powersgd_codec_feeds_its_error_back_and_restores_from_its_state():
    gen = torch.Generator().manual_seed(1)
    key, shape = "w/0/24", (24, 16)
    grads = [torch.randn(shape, generator=gen) for _ in range(5)]
    codec = ps.PushCodec("powersgd", rank=2, seed=3)
    like = torch.empty(shape)
    sent = []
    for g in grads[:3]:
        payload, nbytes = codec.encode(key, g)
        p, q = payload
        assert p.shape == (24, 2) and q.shape == (16, 2) and nbytes == 4 * (24 + 16) * 2
        torch.testing.assert_close(p.T @ p, torch.eye(2), rtol=0, atol=1e-5)  # orthonormal
        sent.append(ps.decode(payload, like))
    # Error feedback: what was sent plus what is still owed is every gradient so far.
    torch.testing.assert_close(sum(sent) + codec.error[key], sum(grads[:3]), rtol=1e-5,
                               atol=1e-5)
    # A codec restored from the state continues exactly as the original.
    restored = ps.PushCodec("powersgd", rank=2, seed=3)
    restored.load(codec.state())
    for g in grads[3:]:
        a, b = codec.encode(key, g)[0], restored.encode(key, g)[0]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Vectors and matrices the factors would not shrink 2x travel whole; bf16 halves.
    assert ps.powersgd_rank_of((16,), 2) == 0 and ps.powersgd_rank_of((4, 4), 2) == 0
    g = torch.randn(8, generator=gen)
    whole, nbytes = codec.encode("b/0/8", g)
    assert whole is g and nbytes == 32
    half, nbytes = ps.PushCodec("bf16").encode("b/0/8", g)
    assert half.dtype == torch.bfloat16 and nbytes == 16
    assert ps.decode(half, g).dtype == torch.float32



def _shard_updates(pieces, spec, values, grads_per_step, tp=1):
    """Run one ParamShard (a single shard: its own norm) over the steps' gradients; returns
    the whole tensors after every step, assembled from the pieces, and the norms. tp=2: two
    senders, as two tp ranks of one replica, each with its column half of every matrix
    (a row-parallel weight's shard), rank 0 alone with the vectors (replicated)."""
    def blocks(rank, piece):
        if len(piece.shape) < 2:
            return [()] if rank == 0 else []
        if tp == 1:
            return [()]
        half = piece.shape[1] // 2
        return [(slice(None), slice(0, half) if rank == 0 else slice(half, None))]

    async def go():
        shard = ps.ParamShard(0, 1, pieces, spec.to_dict(), tp)
        for rank in range(tp):
            parts = [(p.key, b, values[p.name][p.r0:p.r1][b].clone())
                     for p in pieces for b in blocks(rank, p)]
            await shard.reset("g", [shard], rank, tp, 0, parts, [], {}, {})
        out, norms = [], []
        for t, grads in enumerate(grads_per_step):
            await asyncio.gather(*(shard.push(
                "g", t, rank, lr_at(t, spec),
                [(p.key, b, grads[p.name][p.r0:p.r1][b].clone())
                 for p in pieces for b in blocks(rank, p)]) for rank in range(tp)))
            wanted = [(p.key, ()) for p in pieces]
            norm, got = await shard.pull("g", t + 1, wanted)
            norms.append(norm)
            whole = {n: torch.empty_like(v) for n, v in values.items()}
            for ((name, r0, r1), _), v in zip(wanted, got):
                whole[name][r0:r1] = v
            out.append(whole)
        return out, norms
    return asyncio.run(go())


@pytest.mark.parametrize("tp", [1, 2])
def test_a_shard_of_row_slices_steps_like_adamw_on_whole_tensors(tp):
    spec = load_spec(TINY, ["train.grad_clip=0.5", "train.weight_decay=0.1"])
    gen = torch.Generator().manual_seed(0)
    values = {"w": torch.randn(10, 4, generator=gen), "b": torch.randn(6, generator=gen)}
    params = [("w", (10, 4), True), ("b", (6,), False)]
    [pieces] = [sum(ps.plan_pieces(params, 3), [])]  # the three shards' pieces, in one
    assert len(pieces) > 2, "w is cut into row slices"
    grads = [{n: torch.randn(v.shape, generator=gen) for n, v in values.items()}
             for _ in range(3)]
    got, norms = _shard_updates(pieces, spec, values, grads, tp)
    # The trainer's way: whole tensors, global-norm clipping, AdamW over two groups.
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in values.items()}
    opt = torch.optim.AdamW([{"params": [ref["w"]], "weight_decay": 0.1},
                             {"params": [ref["b"]], "weight_decay": 0.0}],
                            betas=(spec.train.beta1, spec.train.beta2), foreach=False)
    for t, g in enumerate(grads):
        norm = sum(float(x.double().square().sum()) for x in g.values()) ** 0.5
        coef = min(1.0, 0.5 / (norm + 1e-6))
        for n, p in ref.items():
            p.grad = g[n] * coef
        for group in opt.param_groups:
            group["lr"] = lr_at(t, spec)
        opt.step()
        assert norms[t] == pytest.approx(norm, rel=1e-12)
        for n in values:
            torch.testing.assert_close(got[t][n], ref[n].detach(), rtol=1e-6, atol=1e-7)


def test_plan_balances_by_bytes_and_covers_every_row_once():
    params = [("emb", (1000, 8), False), ("a", (8, 8), True), ("b", (8,), False),
              ("c", (8, 8), True)]
    plan = ps.plan_pieces(params, 4)
    loads = [sum(p.numel for p in shard) for shard in plan]
    assert max(loads) <= 1.1 * sum(loads) / 4
    rows = sorted((p.name, r) for shard in plan for p in shard for r in range(p.r0, p.r1))
    assert rows == sorted((n, r) for n, s, _ in params for r in range(s[0]))
    assert ps.plan_pieces(params, 4) == plan  # deterministic


@pytest.mark.parametrize("overrides, message", [
    (["parallel.dp_mode=ps", "parallel.ps.shards=0"], r"^parallel.ps.shards: must be > 0"),
    (["parallel.dp_mode=ps", "parallel.ps.shards=19"],
     r"^parallel.ps.shards: 19 shards for 18 parameter tensors; at most 18"),
    (["parallel.dp_mode=ps", "parallel.ps.staleness=-1"], r"^parallel.ps.staleness: must be >= 0"),
    (["parallel.ps.shards=2"], r"^parallel.ps: only with parallel.dp_mode=ps"),
    (["parallel.dp_mode=ps", "parallel.dp_shard=2"],
     r"^parallel.dp_shard: only with parallel.dp_mode=hsdp"),
    (["parallel.dp_mode=ps", "parallel.grad_compression=powersgd", "parallel.powersgd_rank=0"],
     r"^parallel.powersgd_rank: must be"),
    (["parallel.dp_mode=ps", "parallel.elastic.max_replicas=4"],
     r"^parallel.elastic: not with parallel.dp_mode=ps"),
])
def test_bad_parameter_server_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(TINY, overrides)
