"""Pipeline parallelism (raypar/parallel/pipeline.py, and timeline.py's bubble figures).

Pure functions (layout, placement, stage modules, bubble formulas) are tested in
this process. Everything that runs a schedule runs in two real processes (torch
multiprocessing spawn, gloo, pp = 2): one spawn executes every scenario in turn,
writing what it finished to disk, and each test below checks its scenario, so one
slow process start serves the whole file. A failure in a child is re-raised in the
test of the scenario it happened in, with the child's traceback.
"""
from __future__ import annotations

import itertools
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raypar.model import GPT, GPTConfig, lm_loss, param_groups
from raypar.parallel.pipeline import Pipeline
from raypar.parallel.schedules import NAMES as SCHEDULES
from raypar.parallel.schedules import stage_ids, stage_rank
from raypar.parallel.stages import (build_stage_modules, is_tied_copy, stage_costs, stage_layout,
                                    sync_tied_grads)
from raypar.parallel.timeline import (measured_bubble, pipeline_bubble, plot_timeline,
                                      theoretical_bubble, write_chrome_trace)
from conftest import check_chrome_trace

TINY = dict(vocab_size=128, seq_len=16, n_layer=4, n_head=4, d_model=32, dropout=0.0)
BATCH, SEQ, MICRO, STEPS = 8, 16, 4, 3
VIRTUAL = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "interleaved_zb": 2, "zbv": 2,
           "dualpipev": 2}

# name -> (schedule, tie_embeddings, extra GPTConfig fields)
PARITY = {f"{s}-{'tied' if tie else 'untied'}": (s, tie, {})
          for s in SCHEDULES for tie in (True, False)}
PARITY["1f1b-tied-learned-bias"] = ("1f1b", True, {"pos_encoding": "learned", "bias": True})
# Stage outputs that are views (as sequence-parallel stages emit) under a split backward.
PARITY["interleaved_zb-view-outputs"] = ("interleaved_zb", True, {}, True)
TIMELINE = ("gpipe", "interleaved_1f1b", "zbv")
SCENARIOS = [*PARITY, *(f"timeline-{s}" for s in TIMELINE), "pp1", "errors"]


# --------------------------------------------------------------------------- layout


def _brute_force_bottleneck(L, S, head, embed):
    best = float("inf")
    for cuts in itertools.combinations(range(1, L), S - 1):
        sizes = [b - a for a, b in zip((0, *cuts), (*cuts, L))]
        costs = [k + (embed if i == 0 else 0) + (head if i == S - 1 else 0)
                 for i, k in enumerate(sizes)]
        best = min(best, max(costs))
    return best


@pytest.mark.parametrize("head,embed", [(0.0, 0.0), (0.33, 0.05), (2.0, 0.05), (4.5, 0.0)])
def test_stage_layout_properties_and_optimal_bottleneck(head, embed):
    for L in range(1, 10):
        for S in range(1, L + 1):
            layout = stage_layout(L, S, head_cost=head, embed_cost=embed)
            assert len(layout) == S
            assert all(len(ids) >= 1 for ids in layout)
            assert [i for ids in layout for i in ids] == list(range(L))  # contiguous, once each
            costs = [len(ids) + (embed if s == 0 else 0) + (head if s == S - 1 else 0)
                     for s, ids in enumerate(layout)]
            assert max(costs) == pytest.approx(_brute_force_bottleneck(L, S, head, embed))


def test_stage_layout_examples():
    assert stage_layout(4, 2) == [[0, 1], [2, 3]]
    assert stage_layout(5, 2) == [[0, 1, 2], [3, 4]]  # leftovers go to the earlier stage
    # GPT-2 small shape: the head costs ~4.9 blocks, so the last stage keeps one block
    # and the (slightly costlier) first stage the smaller share of the rest.
    embed, head = stage_costs(GPTConfig(vocab_size=50257, seq_len=1024, n_layer=12, d_model=768,
                                        n_head=12))
    assert 4.0 < head < 5.0
    assert [len(x) for x in stage_layout(12, 4, head, embed)] == [3, 4, 4, 1]
    with pytest.raises(ValueError, match="cannot fill"):
        stage_layout(3, 4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [1, 2, 3, 4])
def test_stage_ids_cover_every_stage_once(schedule, pp):
    v = 1 if pp == 1 else VIRTUAL[schedule]
    n = 1 if pp == 1 else pp * v
    hosted = [s for r in range(pp) for s in stage_ids(r, pp, v, schedule)]
    assert sorted(hosted) == list(range(n))
    for r in range(pp):
        assert all(stage_rank(s, pp, n, schedule) == r for s in stage_ids(r, pp, v, schedule))
    if schedule in ("zbv", "dualpipev") and pp > 1:
        assert stage_ids(0, pp, 2, schedule) == [0, 2 * pp - 1]


def test_stage_ids_rejects_wrong_virtual():
    with pytest.raises(ValueError, match="one stage per rank"):
        stage_ids(0, 2, 2, "1f1b")
    with pytest.raises(ValueError, match="exactly 2"):
        stage_ids(0, 2, 3, "zbv")
    with pytest.raises(ValueError, match="unknown pipeline schedule"):
        stage_ids(0, 2, 1, "nope")


class _Wrapper(nn.Module):  # DDP-like: the real model under `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("tie", [True, False])
def test_build_stage_modules_keeps_global_names(tie):
    torch.manual_seed(0)
    full = GPT(GPTConfig(**TINY, tie_embeddings=tie))
    dense = {n: p for n, p in full.named_parameters(remove_duplicate=False)}
    a, = build_stage_modules(full, 0, 2, 1, "gpipe")
    b, = build_stage_modules(full, 1, 2, 1, "gpipe")
    assert list(a.layers) == ["0", "1"] and list(b.layers) == ["2", "3"]
    assert a.tok_emb is not None and a.norm is None and a.lm_head is None
    assert b.tok_emb is None and b.pos_emb is None and b.norm is not None and b.lm_head is not None
    names = [n for m in (a, b) for n, _ in m.named_parameters()]
    assert sorted(names) == sorted(dense)  # the tied head appears as its own FQN on stage 1
    for m in (a, b):
        for n, p in m.named_parameters():
            torch.testing.assert_close(p, dense[n], rtol=0, atol=0)
            assert p is not dense[n]
    assert is_tied_copy("lm_head.weight", b) is tie
    assert is_tied_copy("module.lm_head.weight", _Wrapper(b)) is tie
    assert not is_tied_copy("tok_emb.weight", a) and not is_tied_copy("norm.weight", b)
    # pp == 1: the model itself, its tie intact.
    assert build_stage_modules(full, 0, 1, 1, "1f1b") == [full]
    assert not is_tied_copy("lm_head.weight", full)


def test_build_stage_modules_v_shape():
    full = GPT(GPTConfig(**TINY))
    first, last = build_stage_modules(full, 0, 2, 2, "zbv")
    mid1, mid2 = build_stage_modules(full, 1, 2, 2, "zbv")
    assert [list(m.layers) for m in (first, mid1, mid2, last)] == [["0"], ["1"], ["2"], ["3"]]
    assert first.tok_emb is not None and last.lm_head is not None
    assert last.lm_head.weight is not first.tok_emb.weight  # separate copies, synced locally
    assert mid1.tok_emb is None and mid1.lm_head is None


def test_theoretical_bubble():
    assert theoretical_bubble("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble("interleaved_1f1b", 4, 8, v=2) == pytest.approx(3 / 19)
    assert theoretical_bubble("interleaved_zb", 4, 8, v=2) == pytest.approx(3 / 51)
    assert theoretical_bubble("zbv", 4, 8, v=2) == 0.0
    assert theoretical_bubble("1f1b", 1, 8) == 0.0


def test_measured_bubble_unions_overlaps():
    ev = [dict(stage=0, microbatch=0, kind="F", start=1.0, end=3.0),
          dict(stage=0, microbatch=1, kind="F", start=2.0, end=4.0),
          dict(stage=0, microbatch=0, kind="B", start=6.0, end=7.0)]
    assert measured_bubble(ev, 0.0, 10.0) == pytest.approx(1 - 4 / 10)
    assert measured_bubble([], 0.0, 1.0) == 1.0


def _ev(kind, mb, start, end):
    return dict(stage=0, microbatch=mb, kind=kind, start=float(start), end=float(end))


def test_pipeline_bubble_measures_every_rank_over_the_whole_step():
    """1F1B, p=2, m=2, F = 1 and B = 2 time units, no transfer time: the ideal timeline.
    Each rank computes 6 of the step's 9 units, so both idle 1/3, the theory's
    (p-1)/(m+p-1). The last stage's own schedule returns at 7, two units before the
    first stage's last backward: over its own window it would seem to idle only 1/7."""
    first = {"events": [_ev("F", 0, 0, 1), _ev("F", 1, 1, 2), _ev("B", 0, 4, 6),
                        _ev("B", 1, 7, 9)], "start": 0.0, "end": 9.0}
    last = {"events": [_ev("F", 0, 1, 2), _ev("B", 0, 2, 4), _ev("F", 1, 4, 5),
                       _ev("B", 1, 5, 7)], "start": 0.0, "end": 7.0}
    assert pipeline_bubble([first, last]) == pytest.approx(theoretical_bubble("1f1b", 2, 2))
    assert measured_bubble(last["events"], last["start"], last["end"]) == pytest.approx(1 / 7)
    with pytest.raises(ValueError):
        pipeline_bubble([])


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(module: nn.Module) -> list[dict]:
    """param_groups, with a stage's copy of the tied embedding kept out of weight decay
    like the embedding it mirrors (what the training loop does)."""
    groups = param_groups(module, 0.1)
    copies = {id(p) for n, p in module.named_parameters() if is_tied_copy(n, module)}
    groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in copies]
    groups[1]["params"] += [p for n, p in module.named_parameters() if id(p) in copies]
    return groups


def _batch(gen):
    b = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ + 1), generator=gen)
    return b[:, :-1], b[:, 1:]


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")


def _as_view(module, args, output):
    return output.view(output.shape)


def _parity(rank, group, schedule, tie, extra, view_outputs=False):
    """3 AdamW steps through the pipeline against the single-process model: the same
    loss at every step, the same gradient of every parameter at the first, tied copies
    still identical after, and the same eval loss."""
    cfg = GPTConfig(**TINY, tie_embeddings=tie, **extra)
    v = VIRTUAL[schedule]
    torch.manual_seed(0)
    dense = GPT(cfg)
    torch.manual_seed(0)
    mods = build_stage_modules(GPT(cfg), rank, 2, v, schedule)
    ids = stage_ids(rank, 2, v, schedule)
    if view_outputs:
        for m, s in zip(mods, ids):
            if s != 2 * v - 1:
                m.register_forward_hook(_as_view)
    pipe = Pipeline(mods, ids, 2 * v, group, "cpu", schedule, MICRO, lm_loss)
    opt = torch.optim.AdamW(param_groups(dense, 0.1), lr=1e-2)
    opts = [torch.optim.AdamW(_groups(m), lr=1e-2) for m in mods]
    ref = dict(dense.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(1)
    out = {"losses": []}
    for step in range(STEPS):
        x, y = _batch(gen)
        loss_ref = lm_loss(dense(x), y)
        loss_ref.backward()
        if step == 1:  # only what each rank's stages need; others pass None
            hosts_first, hosts_last = 0 in ids, 2 * v - 1 in ids
            loss = pipe.step(x if hosts_first else None, y if hosts_last else None)
        else:
            loss = pipe.step(x, y)
        sync_tied_grads(mods, group)
        _close(torch.tensor(loss), loss_ref.detach(), f"step {step} loss")
        out["losses"].append(loss)
        if step == 0:
            # Gradients of the first step, before AdamW's normalisation can blow a
            # rounding difference in a near-zero gradient up to a visible weight change.
            for m in mods:
                for n, p in m.named_parameters():
                    _close(p.grad, ref[n].grad, f"step {step} grad {n}")
        for o in (opt, *opts):
            o.step()
            o.zero_grad(set_to_none=True)
    if tie:  # the two copies of the tied embedding are still bitwise equal
        mine = {n: p.detach().clone() for m in mods for n, p in m.named_parameters()
                if n in ("tok_emb.weight", "lm_head.weight")}
        both: list = [None, None]
        dist.all_gather_object(both, mine, group=group)
        copies = {**both[0], **both[1]}
        assert set(copies) == {"tok_emb.weight", "lm_head.weight"}
        assert torch.equal(copies["tok_emb.weight"], copies["lm_head.weight"])
    x, y = _batch(gen)
    with torch.no_grad():
        val_ref = lm_loss(dense(x), y)
        val = pipe.eval(x, y)
        val_again = pipe.eval(x, y)
    _close(torch.tensor(val), val_ref, "eval loss")
    assert val == val_again
    assert all(m.training for m in mods)  # eval restored the train mode
    # A training step after eval still matches (eval has its own stages and buffers).
    x, y = _batch(gen)
    loss_ref = lm_loss(dense(x), y)
    _close(torch.tensor(pipe.step(x, y)), loss_ref.detach(), "step after eval")
    return out


def _timeline(rank, group, schedule):
    v = VIRTUAL[schedule]
    torch.manual_seed(0)
    mods = build_stage_modules(GPT(GPTConfig(**TINY)), rank, 2, v, schedule)
    ids = stage_ids(rank, 2, v, schedule)
    pipe = Pipeline(mods, ids, 2 * v, group, "cpu", schedule, MICRO, lm_loss, record_timeline=True)
    x, y = _batch(torch.Generator().manual_seed(1))
    pipe.step(x, y)
    pipe.step(x, y)  # the second step's timeline replaces the first's
    ev = pipe.timeline
    counts = {k: sum(e["kind"] == k for e in ev) for k in "FBW"}
    expect = len(ids) * MICRO
    assert counts == {"F": expect, "B": expect, "W": expect if schedule == "zbv" else 0}, counts
    for s in ids:
        for k in "FB":
            assert sorted(e["microbatch"] for e in ev if e["stage"] == s and e["kind"] == k) \
                == list(range(MICRO))
    assert all(pipe.step_start <= e["start"] <= e["end"] <= pipe.step_end for e in ev)
    bubble = measured_bubble(ev, pipe.step_start, pipe.step_end)
    assert 0.0 <= bubble < 1.0
    pipe.eval(x, y)
    assert pipe.timeline is ev  # eval records nothing
    return {"events": ev, "bubble": bubble, "start": pipe.step_start, "end": pipe.step_end}


def _pp1(rank, group):
    """pp == 1 (a group of one): the model itself, one stage, still the dense math."""
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**TINY))
    torch.manual_seed(0)
    mods = build_stage_modules(GPT(GPTConfig(**TINY)), 0, 1, 1, "1f1b")
    pipe = Pipeline(mods, [0], 1, group, "cpu", "1f1b", MICRO, lm_loss)
    x, y = _batch(torch.Generator().manual_seed(1))
    loss_ref = lm_loss(dense(x), y)
    loss_ref.backward()
    _close(torch.tensor(pipe.step(x, y)), loss_ref.detach(), "pp1 loss")
    ref = dict(dense.named_parameters())
    for n, p in mods[0].named_parameters():
        _close(p.grad, ref[n].grad, f"pp1 grad {n}")
    return {}


def _errors(rank, group, single):
    """Bad calls raise a clear error on every pp rank (none is left waiting)."""
    torch.manual_seed(0)
    zb = build_stage_modules(GPT(GPTConfig(**TINY)), rank, 2, 2, "interleaved_zb")
    ddp = [nn.parallel.DistributedDataParallel(m, process_group=single) for m in zb]
    with pytest.raises(ValueError, match="DDP does not see"):
        Pipeline(ddp, stage_ids(rank, 2, 2, "interleaved_zb"), 4, group, "cpu", "interleaved_zb",
                 MICRO, lm_loss)
    mods = build_stage_modules(GPT(GPTConfig(**TINY)), rank, 2, 1, "1f1b")
    with pytest.raises(ValueError, match="greater than"):  # torch: 1f1b needs m >= stages
        Pipeline(mods, [rank], 2, group, "cpu", "1f1b", 1, lm_loss)
    with pytest.raises(ValueError, match="should host"):
        Pipeline(mods, [1 - rank], 2, group, "cpu", "1f1b", 2, lm_loss)
    pipe = Pipeline(mods, [rank], 2, group, "cpu", "1f1b", MICRO, lm_loss)
    x, y = _batch(torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="must pass inputs"):
        pipe.step(None, y)  # the first stage's rank has no inputs
    with pytest.raises(ValueError, match="not divisible"):
        pipe.step(x[:6], y[:6])
    with pytest.raises(ValueError, match="different shapes"):
        pipe.step(x[: 4 * (rank + 1)], y[: 4 * (rank + 1)])
    _close(torch.tensor(pipe.step(x, y)), torch.tensor(pipe.step(x, y)), "usable after errors")
    return {}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    done: dict = {}
    path = Path(out_dir) / f"rank{rank}.pkl"
    current = None
    try:
        world = dist.group.WORLD
        singles = [dist.new_group([0]), dist.new_group([1])]
        for name in SCENARIOS:
            current = name
            t = time.perf_counter()
            if name in PARITY:
                result = _parity(rank, world, *PARITY[name])
            elif name.startswith("timeline-"):
                result = _timeline(rank, world, name.removeprefix("timeline-"))
            elif name == "pp1":
                result = _pp1(rank, singles[rank])
            else:
                result = _errors(rank, world, singles[rank])
            result["seconds"] = time.perf_counter() - t
            done[name] = result
            path.write_bytes(pickle.dumps({"done": done}))
            dist.barrier()
    except BaseException:
        path.write_bytes(pickle.dumps({"done": done, "failed": current,
                                       "error": traceback.format_exc()}))
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario in one 2-process spawn; {rank: {'done': ..., 'failed', 'error'}}."""
    out = tmp_path_factory.mktemp("pipeline")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    spawn_error = None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                spawn_error = "timed out after 240 s (a pipeline hang?)"
                break
    except Exception as e:  # a child raised: its traceback is in its file too
        spawn_error = f"{type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = {}
    for r in range(2):
        f = out / f"rank{r}.pkl"
        results[r] = pickle.loads(f.read_bytes()) if f.exists() else {"done": {}}
    results["spawn_error"] = spawn_error
    return results


def _result(runs, name):
    """Both ranks' results of scenario `name`, or the failure that stopped it."""
    if all(name in runs[r]["done"] for r in range(2)):
        return [runs[r]["done"][name] for r in range(2)]
    errors = [f"rank {r} failed in {runs[r].get('failed')}:\n{runs[r].get('error')}"
              for r in range(2) if runs[r].get("error")]
    pytest.fail(f"scenario {name} did not finish. {runs['spawn_error'] or ''}\n"
                + "\n".join(errors))


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_single_process(runs, name):
    r0, r1 = _result(runs, name)
    assert r0["losses"] == r1["losses"]  # every pp rank gets the same mean loss


def test_pp1_single_stage(runs):
    _result(runs, "pp1")


def test_bad_calls_raise_on_every_rank(runs):
    _result(runs, "errors")


@pytest.mark.parametrize("schedule", TIMELINE)
def test_timeline_recorded_and_plotted(runs, schedule, tmp_path):
    r0, r1 = _result(runs, f"timeline-{schedule}")
    path = tmp_path / "timeline.png"
    plot_timeline({0: r0["events"], 1: r1["events"]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = tmp_path / "timeline.trace.json"
    timelines = [{k: r[k] for k in ("events", "start", "end")} for r in (r0, r1)]
    write_chrome_trace(timelines, trace, {0: "first", 1: "second"}, schedule)
    got = check_chrome_trace(trace.read_text(), timelines)
    assert [e["args"]["name"] for e in got["traceEvents"] if e["name"] == "thread_name"] \
        == ["first", "second"]
