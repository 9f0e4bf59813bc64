"""The memory plan and the stage split are arithmetic, and agree with what they replace.

`raypar plan` and the local memory check used to build the whole GPT on the meta device
once per pipeline rank, cut it with the workers' own build_stage_modules, and walk every
rank of the world; the stage split was a dynamic program over every cut. Both are kept
here as references: the arithmetic must give the same bytes and the same cuts, and any
size (100k layers, a million workers, a batch beyond int64) must be answered at once.
"""
import contextlib
import io
import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raypar import cli
from raypar.cluster import WORKER_BASE_BYTES, layout_memory_bytes
from raypar.config import load_spec, model_config
from raypar.data import packing
from raypar.model import GPT
from raypar.parallel import schedules
from raypar.parallel.footprint import _in_flight, activation_bytes, plan
from raypar.parallel.mesh import coords_of
from raypar.parallel.stages import build_stage_modules, stage_layout, stage_sizes
from raypar.parallel.tensor import tp_shard_dim
from raypar.plan import MAX_ROWS, format_plan, place_on_nodes

VOCAB = 320

# --------------------------------------------------------------------------- references


_META_MODELS = {}


def meta_gpt(cfg):
    """The GPT of cfg on the meta device, built once per config (stages are copies cut
    from it, which leave it as it is)."""
    key = repr(cfg)
    if key not in _META_MODELS:
        with torch.device("meta"):
            _META_MODELS[key] = GPT(cfg)
    return _META_MODELS[key]


def meta_reference(spec, vocab_size):
    """Every rank's footprint as the meta-device implementation computed it:
    [(rank, dp, pp, tp, stages, layers, param, block, grad, optim, activation bytes)]."""
    spec = spec.with_dp(spec.max_dp)
    p = spec.parallel
    virtual = schedules.stages_per_rank(p.pp, p.virtual_stages)
    full = meta_gpt(model_config(spec, vocab_size))
    per_pp = {}
    for r in range(p.pp):
        per_pp[r] = (schedules.stage_ids(r, p.pp, virtual, p.schedule),
                     build_stage_modules(full, r, p.pp, virtual, p.schedule))
    out = []
    for rank in range(spec.world_size):
        c = coords_of(rank, p.dp, p.pp, p.tp)
        ids, modules = per_pp[c.pp]
        params = block = 0
        seen = set()
        for m in modules:
            for name, prm in m.named_parameters():
                if id(prm) in seen:
                    continue
                seen.add(id(prm))
                n = prm.numel()
                if p.tp > 1 and tp_shard_dim(name) is not None:
                    n //= p.tp
                if p.shard_size > 1:
                    n = -(-n // p.shard_size)
                params += 4 * n
                if name.startswith("layers."):
                    block += 4 * n
        n_layers = sum(len(m.layers) for m in modules)
        last = any(m.lm_head is not None for m in modules)
        saved = 1 if spec.train.activation_checkpointing else n_layers
        act = activation_bytes(spec, saved, vocab_size, last, _in_flight(spec))
        out.append((rank, c.dp, c.pp, c.tp, ids,
                    [sorted(int(k) for k in m.layers.keys()) for m in modules],
                    params, block, params, 2 * params, act))
    return out


def dp_stage_layout(n_layer, n_stages, head_cost=0.0, embed_cost=0.0):
    """The dynamic program stage_layout was, O(S * L^2): least bottleneck, then least
    sum of squared costs under it, ties to the larger earlier stage."""
    L, S, eps = n_layer, n_stages, 1e-9

    def cost(s, k):
        return k + (embed_cost if s == 0 else 0.0) + (head_cost if s == S - 1 else 0.0)

    def sizes(s, i):
        return range(L - i - (S - 1 - s), 0, -1)

    inf = math.inf
    best = [[inf] * (L + 1) for _ in range(S + 1)]
    best[S][L] = 0.0
    for s in range(S - 1, -1, -1):
        for i in range(s, L - (S - 1 - s)):
            best[s][i] = min(max(cost(s, k), best[s + 1][i + k]) for k in sizes(s, i))
    bound = best[0][0] + eps
    sq = [[inf] * (L + 1) for _ in range(S + 1)]
    pick = [[0] * (L + 1) for _ in range(S + 1)]
    sq[S][L] = 0.0
    for s in range(S - 1, -1, -1):
        for i in range(s, L - (S - 1 - s)):
            for k in sizes(s, i):
                c = cost(s, k)
                if c > bound:
                    continue
                v = c * c + sq[s + 1][i + k]
                if v < sq[s][i] - eps:
                    sq[s][i], pick[s][i] = v, k
    layout, i = [], 0
    for s in range(S):
        layout.append(list(range(i, i + pick[s][i])))
        i += pick[s][i]
    return layout


def reference_stream_indices(start, count, n_blocks, seed):
    """stream_indices as it was: one boolean pass over the whole batch per epoch."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(pos, n_blocks)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = packing._permutation(int(n_blocks), int(seed), int(epoch))[offsets[sel]]
    return out


# --------------------------------------------------------------------------- footprint

# (pp, schedule, virtual_stages): every placement, one and several stages per rank.
LAYOUTS = [(1, "1f1b", 1), (2, "1f1b", 1), (2, "gpipe", 1), (4, "1f1b", 1),
           (2, "interleaved_1f1b", 2), (2, "interleaved_zb", 2), (2, "zbv", 2),
           (4, "dualpipev", 2), (4, "interleaved_1f1b", 2)]
# (pos_encoding, bias, tie_embeddings, d_ff): every model option.
MODELS = list(itertools.product(("rope", "learned"), (False, True), (True, False), (0, 52)))


def spec_for(pp, schedule, virtual, dp_mode, dp, tp, model, ac):
    pos, bias, tie, d_ff = model
    micro = 8  # micro-batches per replica: enough for every schedule's rule at pp <= 4
    # hsdp: two shard groups of dp / 2 (dp 6: groups of 3, which 40 and 52 do not divide).
    shard = [f"parallel.dp_shard={dp // 2}"] if dp_mode == "hsdp" else []
    return load_spec(None, [*shard,
        f"parallel.pp={pp}", f"parallel.schedule={schedule}",
        f"parallel.virtual_stages={virtual}", f"parallel.dp_mode={dp_mode}",
        f"parallel.dp={dp}", f"parallel.tp={tp}", "model.n_layer=11", "model.n_head=4",
        "model.d_model=40", f"model.d_ff={d_ff}", f"model.pos_encoding={pos}",
        f"model.bias={bias}", f"model.tie_embeddings={tie}", "data.seq_len=24",
        "train.micro_batch=2", f"train.global_batch={2 * micro * dp}",
        f"train.activation_checkpointing={ac}"])


def as_rows(plans):
    return [(r.rank, r.dp, r.pp, r.tp, r.stages, r.layers, r.param_bytes,
             r.block_param_bytes, r.grad_bytes, r.optim_bytes, r.activation_bytes)
            for r in plans]


@pytest.mark.parametrize("pp, schedule, virtual", LAYOUTS)
@pytest.mark.parametrize("dp_mode", ["ddp", "fsdp", "hsdp"])
def test_plan_equals_the_meta_device_plan(pp, schedule, virtual, dp_mode):
    """Bytes, stages and layers of every rank, over every model option, tp 1 and 2,
    dp 3 (FSDP's ceil(n / dp) rounds: d_model 40 and d_ff 52 do not divide by 3), hsdp
    over dp 6 in shard groups of 3."""
    for i, model in enumerate(MODELS):
        tp, ac = (1, 2)[i % 2], i % 3 == 0
        spec = spec_for(pp, schedule, virtual, dp_mode, 6 if dp_mode == "hsdp" else 3, tp,
                        model, ac)
        ref = meta_reference(spec, VOCAB)
        assert as_rows(plan(spec, VOCAB)) == ref, (model, tp, ac)
        assert layout_memory_bytes(spec, VOCAB) == sum(
            WORKER_BASE_BYTES + row[6] + row[8] + row[9] + row[10] for row in ref)


def test_plan_of_an_elastic_run_is_its_largest_layout():
    spec = load_spec(None, ["parallel.elastic={min_replicas: 1, max_replicas: 4}"])
    plans = plan(spec, VOCAB)
    assert len(plans) == 8 and as_rows(plans) == meta_reference(spec, VOCAB)


def test_a_plan_hands_out_one_object_per_rank():
    plans = plan(load_spec(None, ["parallel.tp=2"]), VOCAB)
    plans[5].node = "10.0.0.2"
    assert plans[5] is plans[-3] and plans[5].node == "10.0.0.2"
    assert [r.rank for r in plans[2:5]] == [2, 3, 4]
    with pytest.raises(IndexError):
        plans[8]


def test_a_million_workers_are_planned_per_pipeline_rank():
    spec = load_spec(None, ["parallel.dp=5000", "parallel.pp=50", "parallel.tp=4",
                            "model.n_layer=100", "train.global_batch=1000000"])
    plans = plan(spec, VOCAB)
    assert len(plans) == 1_000_000
    last = plans[len(plans) - 1]
    assert (last.dp, last.pp, last.tp) == (4999, 49, 3)
    # every rank of a pp coordinate holds the same: the total is per pp rank times dp*tp
    per_pp = sum(WORKER_BASE_BYTES + plans[p * 4].total_bytes for p in range(50))
    assert layout_memory_bytes(spec, VOCAB) == 5000 * 4 * per_pp


# --------------------------------------------------------------------------- stage split


@pytest.mark.parametrize("embed", [0.0, 0.05])
@pytest.mark.parametrize("head", [0.0, 0.33, 1.0, 2.0, 4.9, 12.5])
def test_stage_layout_equals_the_dynamic_program(head, embed):
    for n_layer in range(1, 41):
        for n_stages in range(1, min(n_layer, 8) + 1):
            assert stage_layout(n_layer, n_stages, head, embed) == \
                dp_stage_layout(n_layer, n_stages, head, embed), (n_layer, n_stages)


def test_stage_layout_equals_the_dynamic_program_at_random_costs():
    rng = random.Random(13)
    for _ in range(400):
        n_layer = rng.randint(1, 30)
        n_stages = rng.randint(1, min(8, n_layer))
        head = rng.choice([rng.uniform(0, 12), round(rng.uniform(0, 12), 1), rng.randint(0, 9)])
        embed = rng.choice([0.0, 0.05, rng.uniform(0, 2), 1.0])
        assert stage_layout(n_layer, n_stages, head, embed) == \
            dp_stage_layout(n_layer, n_stages, head, embed), (n_layer, n_stages, head, embed)


@pytest.mark.parametrize("n_stages", [2, 8, 1000, 100_000])
def test_stage_sizes_of_100k_layers(n_stages):
    head, embed = 4.9, 0.05
    sizes = stage_sizes(100_000, n_stages, head, embed)
    assert len(sizes) == n_stages and sum(sizes) == 100_000 and min(sizes) >= 1
    costs = [k + (embed if s == 0 else 0) + (head if s == n_stages - 1 else 0)
             for s, k in enumerate(sizes)]
    # No cheaper bottleneck exists: below the worst cost, the stages hold too few blocks.
    worst = max(costs)
    caps = [math.ceil(worst - (c - k) - 1e-9) - 1 for c, k in zip(costs, sizes)]
    assert min(caps) < 1 or sum(caps) < 100_000
    assert stage_layout(100_000, n_stages, head, embed)[-1][-1] == 99_999


# --------------------------------------------------------------------------- plan table


def test_a_large_layout_shows_replica_zero_and_says_what_the_rest_hold():
    spec = load_spec(None, ["parallel.dp=100", "train.global_batch=400"])
    text = format_plan(spec, plan(spec, VOCAB), VOCAB)
    rows = [l for l in text.splitlines() if l.split() and l.split()[0].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [0, 1]
    assert "dp replicas 1..99 (ranks 2..199) hold the same as replica 0" in text
    assert text.splitlines()[-1].startswith("all 200 ranks: ")


def test_a_replica_larger_than_the_table_is_cut():
    spec = load_spec(None, ["parallel.dp=1", "parallel.pp=100", "model.n_layer=200",
                            "train.global_batch=200", "parallel.schedule=gpipe"])
    text = format_plan(spec, plan(spec, VOCAB), VOCAB)
    rows = [l for l in text.splitlines() if l.split() and l.split()[0].isdigit()]
    assert len(rows) == MAX_ROWS
    assert f"... ranks {MAX_ROWS}..99 of replica 0 not shown" in text
    assert "dp replicas" not in text


def test_a_small_layout_shows_every_rank():
    spec = load_spec(None, ["parallel.dp=16", "train.global_batch=64"])  # 32 ranks
    text = format_plan(spec, plan(spec, VOCAB), VOCAB)
    rows = [l for l in text.splitlines() if l.split() and l.split()[0].isdigit()]
    assert len(rows) == 32 and "..." not in text and "all " not in text


# --------------------------------------------------------------------------- data order


def test_stream_indices_equal_the_old_computation():
    rng = np.random.default_rng(5)
    for _ in range(300):
        n, start = int(rng.integers(1, 40)), int(rng.integers(0, 400))
        count, seed = int(rng.integers(0, 200)), int(rng.integers(0, 3))
        got = packing.stream_indices(start, count, n, seed)
        assert got.dtype == np.int64
        assert np.array_equal(got, reference_stream_indices(start, count, n, seed))


def test_a_batch_of_many_epochs_costs_one_pass_per_epoch():
    # 2000 epochs of a 3-block corpus: the old computation made 2000 passes over the batch
    out = packing.stream_indices(3 * 10**14, 6000, 3, 1)
    assert sorted(out[:3]) == [0, 1, 2] and np.bincount(out).tolist() == [2000] * 3


# --------------------------------------------------------------------------- the command


def raypar(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raypar: error: "), proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.fixture
def free_memory(monkeypatch):
    """This machine's free memory, as the local memory check sees it."""
    def set_free(n):
        monkeypatch.setattr("raypar.cluster.available_memory_bytes", lambda: n)
    return set_free


def test_plan_of_100k_layers_is_answered(free_memory):
    free_memory(64 * 2**30)  # ~1.4 TiB of fp32 training state: refused
    one_line_error(raypar("plan", "--set", "model.n_layer=100000"), "parallel", "GiB")
    free_memory(2**50)
    proc = raypar("plan", "--set", "model.n_layer=100000")
    assert proc.returncode == 0, proc.stderr
    assert "0-50000" in proc.stdout and "50001-99999" in proc.stdout  # the head costs 2.5


@pytest.mark.parametrize("overrides, fragments", [
    (["parallel.dp=1000000000", "train.global_batch=2000000000"],
     ["parallel: dp*pp*tp = 1000000000*2*1", "at most 1,000,000"]),
    (["train.global_batch=10000000000"], ["train.global_batch", "16,777,216"]),
    (["model.n_layer=1000000"], ["model.n_layer", "100,000"]),
])
def test_absurd_sizes_are_refused_in_one_line(overrides, fragments):
    one_line_error(raypar("plan", *(a for o in overrides for a in ("--set", o))), *fragments)


def test_plan_of_a_large_world_prints_a_short_table(free_memory):
    free_memory(2**60)
    proc = raypar("plan", "--set", "parallel.dp=200000", "--set", "train.global_batch=800000",
                  "--set", "parallel.tp=2")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) < 12
    assert "dp replicas 1..199999 (ranks 4..799999)" in proc.stdout


def _nodes(*cpus):
    return [{"Alive": True, "NodeManagerAddress": f"10.0.0.{i + 1}", "Resources": {"CPU": c}}
            for i, c in enumerate(cpus)]


def test_plan_places_threads_per_worker_and_warns_of_a_tp_group_across_nodes():
    # 2 replicas x pp 1 x tp 2 = 4 workers of 2 threads; nodes of 6 and 8 CPUs hold 3 + 4
    # workers: ranks 0-2 on the first, so tp group 2-3 spans both nodes.
    spec = load_spec(None, ["parallel.dp=2", "parallel.pp=1", "parallel.tp=2",
                            "train.threads=2", "train.global_batch=8"])
    plans = plan(spec, VOCAB)
    place_on_nodes(plans, _nodes(6, 8), "CPU", spec.train.threads)
    assert [plans[r].node for r in range(4)] == ["10.0.0.1"] * 3 + ["10.0.0.2"]
    text = format_plan(spec, plans, VOCAB)
    assert text.splitlines()[-1] == (
        "warning: tensor-parallel group of ranks 2-3 spans nodes 10.0.0.1, 10.0.0.2: its "
        "all-reduces cross the network; give each node a multiple of parallel.tp workers")
    # Whole groups per node: nothing to say.
    plans = plan(spec, VOCAB)
    place_on_nodes(plans, _nodes(4, 4), "CPU", spec.train.threads)
    assert "warning" not in format_plan(spec, plans, VOCAB)


def test_workers_reserve_their_threads_with_ray():
    from raypar.cluster import scaling_config
    spec = load_spec(None, ["train.threads=3"])
    assert scaling_config(spec, False).resources_per_worker == {"CPU": 3}
    assert scaling_config(spec, True).resources_per_worker == {"CPU": 3, "GPU": 1}
    elastic = load_spec(None, ["train.threads=2",
                               "parallel.elastic={min_replicas: 1, max_replicas: 2}"])
    assert scaling_config(elastic, False).resources_per_worker == {"CPU": 2}
