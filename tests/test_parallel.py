"""Parallelism never changes the math: every layout reproduces the single-process run.

Each layout trains the same 4-layer model for 10 steps through the real path (Ray
Train workers, the mesh, tensor/pipeline/data parallel wrappers) and its per-step
loss, gradient norm and validation loss must equal the dp=pp=tp=1 run's.

Tolerance: rtol 1e-5 (fp32, dropout 0). The layouts add the same numbers in a
different order (row-parallel matmuls sum partial products across ranks, data
parallel sums per-replica gradients), so bit equality is not expected; a
difference in the math (a wrong shard, a missed gradient, a double-counted
parameter) shows up at the 1e-2 level within a step or two.
"""
import json

import pytest

from raypar.config import ConfigError, load_spec
from raypar.train.driver import run
from raypar.train.rundir import read_metrics

from conftest import ROOT

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
COMMON = ["model.n_layer=4", "model.n_head=4", "model.d_model=32", "train.steps=10",
          "train.global_batch=8", "train.micro_batch=2", "train.eval_every=5",
          "tracking.enabled=false"]

# dp2 x pp2 (schedule 1f1b) and plain tp2 are checked in test_resume.py against a dp2
# run (the run resumed there, and the resume at tp2 and at dp1, rtol 1e-5), and plain
# DDP at dp 2 and 3 against one process in test_elastic.py, so they are not repeated here.
LAYOUTS = {
    "pp2-gpipe": ["parallel.dp=1", "parallel.pp=2", "parallel.schedule=gpipe"],
    "pp2-interleaved": ["parallel.dp=1", "parallel.pp=2", "parallel.schedule=interleaved_1f1b",
                        "parallel.virtual_stages=2"],
    "dp2-fsdp": ["parallel.dp=2", "parallel.dp_mode=fsdp"],
    "dp2-tp2": ["parallel.dp=2", "parallel.tp=2"],
    "tp2-pp2-ac": ["parallel.dp=1", "parallel.tp=2", "parallel.pp=2",
                   "train.activation_checkpointing=true"],
    "dp2-tp2-pp2": ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"],
}


def rows_of(run_dir):
    return read_metrics(run_dir)[0]  # the step rows (events aside)


def spec_for(corpus, cache, *overrides):
    return load_spec(TINY, [f"data.path={corpus}", f"data.cache_dir={cache}", *COMMON,
                            *overrides])


@pytest.fixture(scope="module")
def reference(ray_local, small_corpus, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(spec_for(small_corpus, cache_dir, "parallel.dp=1"), run_dir, progress=False)
    return rows_of(run_dir)


def assert_same_curve(rows, ref, rtol=1e-5):
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 11))
    assert [(r["first_block"], r["last_block"]) for r in rows] == \
           [(r["first_block"], r["last_block"]) for r in ref]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in ref], rel=rtol), key
    assert [r["val_loss"] for r in rows if "val_loss" in r] == \
           pytest.approx([r["val_loss"] for r in ref if "val_loss" in r], rel=rtol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_reproduces_single_process(layout, reference, small_corpus, cache_dir, tmp_path):
    run_dir = tmp_path / layout
    summary = run(spec_for(small_corpus, cache_dir, *LAYOUTS[layout]), run_dir, progress=False)
    assert_same_curve(rows_of(run_dir), reference)
    ranks = summary["ranks"]
    assert sorted(r["rank"] for r in ranks) == list(range(len(ranks)))
    # every layer is hosted by exactly one pipeline stage
    by_pp = {r["pp"]: sorted(l for ls in r["layers"] for l in ls) for r in ranks}
    assert sorted(l for ls in by_pp.values() for l in ls) == [0, 1, 2, 3]
    if "tp2" in layout and "pp2" in layout:
        # Measured in the workers: each rank holds a quarter of the blocks' parameters.
        from raypar.model import GPT, GPTConfig
        cfg = GPTConfig(vocab_size=320, seq_len=32, n_layer=4, n_head=4, d_model=32)
        total_block_bytes = 4 * sum(p.numel() for n, p in GPT(cfg).named_parameters()
                                    if n.startswith("layers."))
        for r in ranks:
            assert r["block_param_bytes"] == pytest.approx(total_block_bytes / 4, rel=0.10), r
            assert r["param_bytes"] > 0 and r["optim_bytes"] == 2 * r["param_bytes"]
            assert r["activation_peak_bytes"] > 0
    if "pp2" in layout:
        timeline = json.loads((run_dir / "timeline.json").read_text())
        assert len(timeline) == len(ranks)
        assert 0 < summary["bubble_measured"] < 1 and 0 < summary["bubble_theory"] < 1
        assert (run_dir / "pipeline_timeline.png").stat().st_size > 1000


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3", "model.n_head=4"], r"^model.n_head: 4 must be divisible by parallel.tp=3"),
    (["parallel.pp=4", "model.n_layer=2"], r"^model.n_layer: 2 layers cannot fill"),
    (["parallel.pp=2", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2",
      "model.n_layer=3"], r"^model.n_layer: 3 layers cannot fill .* = 4 pipeline stages"),
    (["parallel.dp=2", "train.global_batch=6", "train.micro_batch=2"],
     r"^train.global_batch: 6 must be divisible by parallel.dp \* train.micro_batch"),
    (["parallel.schedule=zigzag"], r"^parallel.schedule: expected one of gpipe, 1f1b"),
    (["parallel.dp_mode=zero9"], r"^parallel.dp_mode: expected one of ddp, fsdp"),
    (["parallel.virtual_stages=2"], r"^parallel.virtual_stages: only the interleaved"),
])
def test_impossible_layouts_are_refused_before_any_worker(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(TINY, overrides)
