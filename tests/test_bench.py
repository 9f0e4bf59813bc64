"""`raypar bench`: its arithmetic, and one real `--quick` run whose outputs must be complete
(every row a finite value with its spread, the table, the charts, the MLflow run). Speed is
never asserted: the machines are shared."""
import json
import math
import os
import subprocess
import sys

import pytest

from raypar.bench.gpu import _measure, peak_flops
from raypar.bench.report import markdown
from raypar.bench.stats import ratio_row, row, windows

from conftest import ROOT

SECTIONS = {"overhead": 1, "launcher": 5, "scaling": 3, "pipeline": 9, "tensor": 2,
            "data": 10, "checkpoint": 6, "memory": 5, "scale": 6}


def test_windows_leave_out_the_warm_up_seconds_and_checkpoint_steps():
    # Steps end at 0, 1, 2, ... s: one second per step, except step 6, which took 10 s.
    ends = [0.0, 1, 2, 3, 4, 14, 15, 16, 17]
    # Step 2 ends within the first second of steady state: left out, like step 6 (a save).
    assert windows(ends, warmup_s=1, repeats=2, tokens_per_step=100,
                   exclude=frozenset({6})) == [100.0, 100.0]
    slow = windows(ends, warmup_s=1, repeats=2, tokens_per_step=100)
    assert slow == pytest.approx([100.0, 25.0])  # steps 3-5, then 6-8 with the 10 s step
    with pytest.raises(RuntimeError, match="too short"):
        windows(ends, warmup_s=16, repeats=3, tokens_per_step=100)


def test_comm_rows_count_bytes_speed_and_convergence_against_sync_ddp():
    from raypar.bench import comm

    def fake(step_s, sent, loss, steps=40):
        # comm_bytes as the worker records it: None on steps that sent nothing (local SGD).
        return {"step_end": [i * step_s for i in range(steps)],
                "rows": [{"step": i + 1, "loss": loss + (steps - i) * 0.01,
                          "comm_bytes": sent[i % len(sent)]} for i in range(steps)]}
    runs = {"sync DDP": fake(0.2, [1000], 2.0),
            "local SGD H=4": fake(0.1, [None, None, None, 1000], 2.2),
            "bf16 compression": fake(0.2, [500], 2.0)}
    delayed = {"1": {"sync DDP": fake(0.4, [1000], 2.0),
                     "local SGD H=4": fake(0.25, [None, None, None, 1000], 2.2)},
               "rotate": {"sync DDP": fake(0.4, [1000], 2.0),
                          "local SGD H=4": fake(0.2, [None, None, None, 1000], 2.2)}}
    rows = {r["name"]: r for r in comm.comm_rows(runs, delayed, warmup_s=0.5, repeats=2,
                                                  tokens_per_step=100, delay_s=0.2)}
    assert rows["sync DDP: bytes each replica moves per step"]["value"] == 1000
    local = rows["local SGD H=4: bytes each replica moves per step"]
    assert local["value"] == 250 and local["detail"]["of_sync_ddp"] == 0.25  # 1000 every 4th
    assert rows["bf16 compression: bytes each replica moves per step"]["detail"][
        "of_sync_ddp"] == 0.5
    assert rows["local SGD H=4 / sync DDP (tokens/s)"]["value"] == pytest.approx(2.0)
    assert rows["bf16 compression / sync DDP (tokens/s)"]["value"] == pytest.approx(1.0)
    assert rows["local SGD H=4: loss after the same tokens / sync DDP's"]["value"] == \
        pytest.approx(1.1, rel=0.01)
    assert rows["local SGD H=4 / sync DDP, replica 1 slowed 0.2 s a step (tokens/s)"][
        "value"] == pytest.approx(1.6)
    assert rows["sync DDP with replica 1 slowed 0.2 s a step / without (tokens/s)"][
        "value"] == pytest.approx(0.5)
    assert rows["local SGD H=4 / sync DDP, one replica a step slowed 0.2 s, in turn "
                "(tokens/s)"]["value"] == pytest.approx(2.0)
    assert rows["sync DDP with one replica a step slowed 0.2 s, in turn / without "
                "(tokens/s)"]["value"] == pytest.approx(0.5)
    assert not any(name.startswith("bf16") and "slowed" in name for name in rows)  # not run
    # Which strategies meet the moving straggler: those that can gain, and ps sync.
    assert comm.straggles("rotate", "local SGD H=16") and comm.straggles("rotate", "sync DDP")
    assert not comm.straggles("rotate", "bf16 compression") and comm.straggles("1", "bf16 compression")
    # Sync DDP runs first and last; its two runs count as one, step by step.
    both = comm.merged([fake(0.2, [1000], 2.0), fake(0.4, [1000], 2.0)])
    assert both["step_end"][:3] == pytest.approx([0.0, 0.3, 0.6])


def test_ratio_row_takes_the_median_and_says_whether_the_target_holds():
    row = ratio_row("overhead", "a / b", [90, 100, 96], [100, 100, 100], 0.95)
    assert row["value"] == pytest.approx(0.96) and row["spread"] == [0.9, 1.0]
    assert row["met"] is True and row["target"] == ">= 0.95"
    assert ratio_row("x", "y", [90], [100], 0.95)["met"] is False
    assert ratio_row("x", "y", [90], [100], None)["met"] is None


def test_markdown_has_one_line_per_row():
    rows = [row("memory", "dp=1", 1.02, "x", [1.0, 1.04], target="<= 1.1", met=True),
            row("checkpoint", "save", 250.0, "MB/s")]
    report = {"mode": "quick", "seconds": 100, "rows": rows, "context": {"cuda": "skipped"},
              "machine": {"cpus": 2, "torch": "2", "ray": "2"}}
    text = markdown(report)
    assert "| memory | dp=1 | 1.02x | 1.00 .. 1.04 | <= 1.1 | yes |" in text
    assert "| checkpoint | save | 250 MB/s | 250 .. 250 |  |  |" in text
    assert text.rstrip().endswith("CUDA: skipped")


def test_mfu_arithmetic():
    # FLOPs per token: raypar.model.flops_per_token, pinned in test_model.py.
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future GPU") is None


def test_gpu_measurement_runs_the_worker_in_bf16():
    """The CUDA rows' measurement, run here on the CPU (gloo, no device sync): raypar's
    Worker in bf16 autocast, warm-up, timed steps. The GPU task runs this same function."""
    import numpy as np

    from raypar.config import load_spec
    spec = load_spec(None, ["model.n_layer=2", "model.n_head=2", "model.d_model=32",
                            "data.seq_len=16", "train.global_batch=4", "train.micro_batch=2",
                            "train.dtype=bf16", "parallel.dp=1", "parallel.pp=1",
                            "tracking.enabled=false"])
    blocks = np.random.default_rng(0).integers(0, 64, size=(64, 17)).astype(np.uint16)
    r = _measure(spec.to_dict(), 64, blocks, compiled=False, steps=4)
    assert r["device"] == "cpu" and len(r["losses"]) == 4
    assert all(math.isfinite(x) and 0 < x < 10 for x in r["losses"])
    assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raypar.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.ray
def test_quick_bench_writes_every_row(tmp_path):
    out = tmp_path / "bench"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = _cli("bench", "--quick", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["mode"] == "quick"
    rows = report["rows"]
    counts = {s: sum(r["section"] == s for r in rows) for s in SECTIONS}
    assert counts == SECTIONS, counts
    for r in rows:
        lo, hi = r["spread"]
        assert all(math.isfinite(x) for x in (r["value"], lo, hi)), r
        assert lo <= r["value"] <= hi and r["samples"], r
        assert r["unit"] and r["name"]
        # A row with a target says whether it holds; a row without one does not pretend.
        assert (r["target"] is None) == (r["met"] is None), r
    # Memory is no speed: the driver of a preparation holds manifests, never the corpus,
    # so its own peak RSS (a process of its own) stays flat from a 32 MB corpus to 128 MB.
    [growth] = [r for r in rows if r["name"].startswith("driver peak RSS growth")]
    assert growth["met"] and growth["detail"]["corpus_mb_4x"] > 3.5 * growth["detail"][
        "corpus_mb_1x"], growth
    # And a training worker's: it memory-maps the shards its blocks need, nothing more (its
    # growth from the train loop's start holds its model, its optimizer state and a step).
    [worker] = [r for r in rows if r["name"].startswith("worker own RSS growth")]
    assert worker["met"] and worker["detail"]["growth_mb_1x"] > 0, worker
    # The command's start-up to its first step comes with its phases (the profile).
    [command] = [r for r in rows if r["name"].startswith("start-up to first step: `raypar")]
    assert {"phase_imports_s", "phase_ray_s", "phase_workers_s", "phase_total_s"} <= set(
        command["detail"]), command
    ratios = {r["section"]: r for r in rows if r["unit"] == "x"}
    assert ratios["overhead"]["detail"]["ours_tokens_per_s"] > 0
    # gpipe and 1f1b idle (p-1)/(m+p-1) of a step; interleaved with 2 stages per rank
    # (p-1)/(2m+p-1); at p=2 and m = 2, 4, 8:
    assert [r["detail"]["theory"] for r in rows if r["section"] == "pipeline"] == \
        pytest.approx([1 / 3, 1 / 5, 1 / 9] * 2 + [1 / 5, 1 / 9, 1 / 17])
    # The table: one line per row; the charts are PNG files.
    table = (out / "bench.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1
    for name in ("bench_ratios.png", "bench_pipeline.png", "bench_memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # One MLflow run in the output directory's store: every row a metric, every file kept.
    from mlflow.tracking import MlflowClient
    assert report["mlflow"]["uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=report["mlflow"]["uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and len(run.data.metrics) == len(rows)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "bench.json", "bench.md", "bench_ratios.png", "bench_pipeline.png", "bench_memory.png"}
    # The command prints the table and where the report is.
    assert "| section | measurement |" in done.stdout and str(out / "bench.json") in done.stdout

    again = _cli("bench", "--quick", "--out", str(out), env=env)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"raypar: error: --out: {out} already holds a bench report; choose another directory"]


def test_scale_rows_from_ranks_records():
    """The scale section's arithmetic, on records as ranks.json holds them: memory against
    the planned share, loads paired rank by rank, and a save's cost per window."""
    from types import SimpleNamespace as NS

    from raypar.bench import scale
    MB = scale.MB
    plans = [NS(param_bytes=10 * MB, grad_bytes=10 * MB, optim_bytes=20 * MB,
                activation_bytes=MB)] * 2
    ranks = [NS(rank=r, rss_base_bytes=400 * MB, rss_init_bytes=412 * MB,
                rss_end_bytes=460 * MB) for r in (1, 0)]
    init, steady, whole = scale.memory_rows("pp=2 x tp=2", ranks, plans, full_bytes=160 * MB)
    assert init["value"] == pytest.approx(412 / 410) and init["met"]
    assert steady["value"] == pytest.approx(460 / 441) and steady["met"]
    assert whole["value"] == pytest.approx(460 / 560) and whole["met"]
    # fsdp dp=4 without a pipeline: 2 blocks of 4 MB (1 MB each rank's), 2 MB of root
    # parameters (embedding, norm, head; 0.5 MB each rank's): FSDP gathers at most the
    # root's, the current and the prefetched block's parameters and one block's gradients.
    fsdp = NS(dp=4, pp=1, shard_size=4)
    plans = [NS(param_bytes=5 * MB // 2, block_param_bytes=2 * MB, grad_bytes=5 * MB // 2,
                optim_bytes=5 * MB, activation_bytes=MB, layers=[[0, 1]])] * 2
    assert scale.fsdp_gathered_bytes(fsdp, plans[0]) == 2 * MB + 3 * 4 * MB
    assert scale.fsdp_gathered_bytes(NS(dp=4, pp=2, shard_size=4), plans[0]) == 10 * MB + 4 * MB
    assert scale.fsdp_gathered_bytes(NS(dp=4, pp=1, shard_size=1), plans[0]) == 0
    _, steady, _ = scale.memory_rows("fsdp dp=4", ranks, plans, 160 * MB, fsdp)
    assert steady["value"] == pytest.approx(460 / (400 + 10 + 1 + 14)) and steady["met"]
    assert steady["detail"]["fsdp_gathered_mb"] == 14
    # Loads: rank 1 did not load in the small run; only rank 0 is compared.
    big = [NS(rank=0, load_s=2.0, load_bytes=40 * MB), NS(rank=1, load_s=2.0, load_bytes=40 * MB)]
    small = [NS(rank=0, load_s=1.0, load_bytes=10 * MB), NS(rank=1, load_s=None,
                                                             load_bytes=None)]
    rows = scale.load_rows(big, small, 4_000_000, 1_000_000, None)
    assert [r["value"] for r in rows[:2]] == [20.0, 10.0]
    assert rows[2]["value"] == pytest.approx((2.0 / 1.0) / 4.0) and rows[2]["met"]
    # Saves after steps 3 and 6 cost their next two steps 0.5 s more than the clean step.
    ends, t = [], 0.0
    for step in range(1, 10):
        t += 1.0 + (0.5 if step in (4, 5, 7, 8) else 0.0)
        ends.append(t)
    assert scale.save_losses(ends, 3) == pytest.approx([1.0, 1.0])
