"""The bench report's sections: each function turns what the runs and the probe recorded
into that section's rows (see stats.row), in the order the report lists them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from raypar.bench.stats import lost_after, median, ratio_row, row, windows
from raypar.parallel.timeline import pipeline_bubble, step_span, theoretical_bubble
from raypar.train import checkpoint as ckpt
from raypar.train.rundir import RunDir

TARGETS = {"overhead": 0.95, "launcher": 0.95, "scaling": 1.8, "bubble": 0.2,
           "data_wait": 0.02, "memory": 1.10, "driver_growth": 0.5,
           "startup": 2.0}

# The probe's pipeline layouts (schedule, virtual stages per rank, micro-batches), p = 2.
PIPELINE = [(schedule, v, m) for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2))
            for m in (2, 4, 8)]


def pipeline_job(schedule: str, m: int) -> str:
    """The probe job's name of a pipeline layout."""
    return f"pp2 {schedule} m={m}"


def throughput(r1: dict, r2: dict, bare: dict, pair: list[dict], torchrun: dict, steps: int,
               win: dict[str, Any]) -> tuple[list[dict], dict[str, list[float]]]:
    """The overhead, launcher and scaling rows; and each run's tokens/s windows.

    r1, r2: raypar at dp=1 and dp=2 (steps and 2 * steps of throughput before their saves);
    bare, pair, torchrun: the baselines' records (baseline.py); win: `windows`' arguments."""
    tokens_per_s = {"raypar_dp1": windows(r1["step_end"][:steps], **win),
                    "raypar_dp2": windows(r2["step_end"][:2 * steps], **win),
                    "bare": windows(bare["step_end"], **win),
                    "torchrun": windows(torchrun["step_end"], **win)}
    ours1, ours2, base, tr = tokens_per_s.values()
    both = [a + b for a, b in zip(*(windows(p["step_end"], **win) for p in pair))]
    rows = [
        ratio_row("overhead", "raypar dp=1 / bare PyTorch loop (tokens/s)", ours1, base,
                  TARGETS["overhead"]),
        ratio_row("launcher", "raypar dp=2 / torchrun dp=2 (tokens/s)", ours2, tr,
                  TARGETS["launcher"]),
        row("launcher", "start-up to first step: raypar (Ray Train)", r2["step_end"][0] - r2["t0"],
            "s", note="includes the driver's corpus load (cached) and Ray Train's "
                      "worker group start"),
        row("launcher", "start-up to first step: torchrun",
            torchrun["step_end"][0] - torchrun["launched"], "s"),
        ratio_row("scaling", "raypar dp=2 / dp=1 (tokens/s, 1 thread each)", ours2, ours1,
                  TARGETS["scaling"], ceiling=median([a / b for a, b in zip(both, base)])),
        ratio_row("scaling", "torchrun dp=2 / bare loop (tokens/s)", tr, base, None),
        ratio_row("scaling", "machine ceiling: 2 independent bare loops / 1 (tokens/s)", both,
                  base, None, note="two processes that never communicate: what 2 cores give here"),
    ]
    return rows, tokens_per_s


def command(cmd: dict, torchrun: dict) -> list[dict]:
    """The `raypar train` command's start-up to its first step (its phases in the detail)
    against torchrun's, both from the launch of the process."""
    ours = cmd["first_step"] - cmd["t0"]
    theirs = torchrun["step_end"][0] - torchrun["launched"]
    ratio = ours / theirs
    return [
        row("launcher", "start-up to first step: `raypar train` command", ours,
            "s", **{f"phase_{k.replace(' ', '_')}_s": v for k, v in cmd["startup"].items()}),
        row("launcher", "start-up to first step: raypar command / torchrun", ratio, "x",
            target=f"<= {TARGETS['startup']}", met=ratio <= TARGETS["startup"]),
    ]


def data(r1: dict, steps: int, warmup_s: float, consumed: float, tokens: int,
         seconds: float) -> list[dict]:
    """What Ray Data delivers (tokens prepared in `seconds`) against what training consumes
    (tokens/s), and the share of step time a step of r1 waits for its batch."""
    delivered = tokens / seconds
    ends, rows = r1["step_end"][:steps], r1["rows"][:steps]
    share = [rows[i]["data_s"] / (ends[i] - ends[i - 1]) for i in range(1, len(ends))
             if ends[i - 1] - ends[0] >= warmup_s]
    share_med = median(share)
    return [row("data", "Ray Data delivered / trainer consumed (tokens/s)", delivered / consumed,
                "x", delivered_tokens_per_s=delivered, consumed_tokens_per_s=consumed,
                corpus_seconds=seconds),
            row("data", "step time waiting for data (dp=1)", share_med, "fraction", share,
                target=f"< {TARGETS['data_wait']}", met=share_med < TARGETS["data_wait"])]


def data_prep(rates: dict[str, list[float]], peaks: dict[str, dict], startup_s: float
              ) -> list[dict]:
    """Preparation throughput (Ray Data held to 1 and 2 CPUs, against HF encode_batch in
    one process), the driver's peak memory on two corpora 4x apart, and start-up to the
    first step when the dataset is already prepared."""
    small, large = peaks["1x"], peaks["4x"]
    # Driver peak bytes per byte of extra corpus: the old path (every document collected
    # on the driver, packed, saved) took several; holding only manifests takes about none.
    per_byte = (large["peak_kb"] - small["peak_kb"]) * 1024 / (large["bytes"] - small["bytes"])
    # The same for a training worker (rank 0, dp=1, after its first steps); an in-memory
    # corpus would add 2 to 4 bytes (its uint16 or int32 tokens) per byte of text.
    worker_per_byte = ((large["worker_rss_bytes"] - small["worker_rss_bytes"])
                       / (large["bytes"] - small["bytes"]))
    return [
        row("data", "prepare: Ray Data, 1 CPU (tokens/s)", median(rates["ray_1cpu"]),
            "tokens/s", rates["ray_1cpu"]),
        row("data", "prepare: Ray Data, 2 CPUs (tokens/s)", median(rates["ray_2cpu"]),
            "tokens/s", rates["ray_2cpu"]),
        row("data", "HF tokenizers encode_batch, one process (tokens/s)", median(rates["hf"]),
            "tokens/s", rates["hf"], note="tokenizing only: no reading, no writing"),
        ratio_row("data", "prepare: Ray Data 2 CPUs / 1 CPU (tokens/s)", rates["ray_2cpu"],
                  rates["ray_1cpu"], None),
        ratio_row("data", "prepare: Ray Data 2 CPUs / HF encode_batch (tokens/s)",
                  rates["ray_2cpu"], rates["hf"], None),
        row("data", "driver peak RSS growth per byte of corpus (1x to 4x)", per_byte,
            "bytes/byte", target=f"< {TARGETS['driver_growth']}",
            met=per_byte < TARGETS["driver_growth"],
            peak_mb_1x=small["peak_kb"] / 1024, peak_mb_4x=large["peak_kb"] / 1024,
            corpus_mb_1x=small["bytes"] / 1e6, corpus_mb_4x=large["bytes"] / 1e6),
        row("data", "worker own RSS growth per byte of corpus (1x to 4x)", worker_per_byte,
            "bytes/byte", target=f"< {TARGETS['driver_growth']}",
            met=worker_per_byte < TARGETS["driver_growth"],
            note="anonymous RSS from the train loop's start to the first step's end: "
                 "the mapped shards' pages left out",
            growth_mb_1x=small["worker_rss_bytes"] / 2**20,
            growth_mb_4x=large["worker_rss_bytes"] / 2**20),
        row("data", "start-up to first step, dataset already prepared", startup_s, "s",
            note="the `raypar train` command, dp=2: from its launch to its first step's end"),
    ]


def _saves(run: dict) -> list[dict]:
    return [e for e in run["events"] if e["event"] == "checkpoint"]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def checkpoints(r1: dict, r2: dict, steps: int) -> list[dict]:
    """Save speed and the step time a save costs (r1's synchronous save after `steps`, r2's
    first background one), load speed on restart and recovery time after r2's worker kill."""
    [sync] = [e for e in _saves(r1) if e["step"] == steps]
    background = [e for e in _saves(r2) if e["mode"] == "async"]
    if not background:
        raise RuntimeError("bench: the dp=2 run made no background save")
    bg = background[0]
    sync_bytes = _dir_bytes(RunDir(r1["dir"]).checkpoints / ckpt.dir_name(sync["step"]))
    bg_bytes = _dir_bytes(RunDir(r2["dir"]).checkpoints / ckpt.dir_name(bg["step"]))
    mb = 2 ** 20
    rows = [row("checkpoint", "save, synchronous (dp=1)", sync_bytes / mb / sync["save_s"], "MB/s",
                bytes=sync_bytes, seconds=sync["save_s"]),
            row("checkpoint", "save, background (dp=2)", bg_bytes / mb / bg["save_s"], "MB/s",
                bytes=bg_bytes, seconds=bg["save_s"])]
    for run, event, label in ((r1, sync, "synchronous"), (r2, bg, "background")):
        rows.append(row(
            "checkpoint", f"step time lost to a {label} save",
            lost_after(run["step_end"], event["step"]), "s", loop_blocked_s=event["stall_s"],
            note="wall-clock time the 4 steps after the save took beyond the steady step "
                 "time (the write, Ray Train's upload of the checkpoint, and a background "
                 "write's share of the cores); loop_blocked_s: the loop's own wait"))
    recoveries = [e for e in r2["events"] if e["event"] == "recovery"]
    if not recoveries:
        raise RuntimeError("bench: the dp=2 run recorded no recovery after its worker was "
                           "killed (did the kill land after the last step?)")
    rec = recoveries[0]
    loaded = _dir_bytes(Path(rec["checkpoint"])) if rec.get("checkpoint") else 0
    if rec.get("load_s"):
        rows.append(row("checkpoint", "load on restart (dp=2)", loaded / mb / rec["load_s"],
                        "MB/s", bytes=loaded, seconds=rec["load_s"]))
    rows.append(row("checkpoint", "recovery after a worker kill (dp=2)", rec["recovery_s"], "s",
                    steps_redone=rec["steps_redone"],
                    note="from the failure to the first new step, Ray Train's "
                         "restart of the worker group included"))
    return rows


def pipeline(found: dict[str, list[dict]]) -> list[dict]:
    """Each PIPELINE layout's bubble, measured against theory, from the probe's timelines."""
    rows = []
    for schedule, v, m in PIPELINE:
        ranks = found[pipeline_job(schedule, m)]
        # One sample per timed step: that step's timeline from every rank.
        steps = [list(step) for step in zip(*(r["timelines"] for r in ranks))]
        per_step = [pipeline_bubble(step) for step in steps]
        theory = theoretical_bubble(schedule, 2, m, v)
        rel = [b / theory for b in per_step]
        value = median(rel)
        # What the idle time is made of, per F/B action: its compute, and the idle
        # time beside it (the schedule's waits, transfers and runtime overhead).
        actions = [sum(len(t["events"]) for t in step) for step in steps]
        # rank-seconds of each step: every rank over the step's whole span
        span = [len(step) * (end - start)
                for step, (start, end) in zip(steps, map(step_span, steps))]
        busy = [(1 - b) * s for b, s in zip(per_step, span)]
        rows.append(row(
            "pipeline", f"bubble {schedule} p=2 m={m}: measured / theory", value, "x",
            rel, target="0.8 .. 1.2", met=abs(value - 1) <= TARGETS["bubble"],
            measured=median(per_step), theory=theory,
            compute_ms_per_action=median([1e3 * b / n for b, n in zip(busy, actions)]),
            idle_ms_per_action=median([1e3 * (s - b) / n
                                       for b, s, n in zip(busy, span, actions)])))
    return rows


def tensor(found: dict[str, list[dict]]) -> list[dict]:
    """tp=2 against tp=1 step time (a tp=2 step lasts as long as its slower rank), and the
    share of a tp=2 step in communication."""
    tp1, tp2 = found["tp1"][0], found["tp2"]
    t1 = tp1["step_s"]
    t2 = [max(r["step_s"][i] for r in tp2) for i in range(len(tp2[0]["step_s"]))]
    per_step = [a / b for a, b in zip(t2, t1)]
    shares = [c / st for r in tp2 for c, st in zip(r["comm_s"], r["profiled_step_s"])]
    return [row("tensor", "tp=2 / tp=1 step time", median(per_step), "x", per_step,
                tp1_step_s=median(t1), tp2_step_s=median(t2)),
            row("tensor", "tp=2 share of step time in communication", median(shares),
                "fraction", shares, note="collectives and their waits, from torch.profiler")]


# How many ways each memory layout splits the model's parameters (tp * pp, or dp under FSDP).
MEMORY_SPLIT = {"dp=1": 1, "dp=2 ddp": 1, "tp=2": 2, "pp=2": 2, "fsdp dp=2": 2}


def memory(n_params: int, runs: dict[str, Any]) -> list[dict]:
    """Per-rank parameters + gradients + optimizer state (fp32 AdamW) of each layout in runs
    ({layout: its ranks' records}) against the ideal share of n_params' full footprint."""
    p_bytes = n_params * 4  # fp32
    full = {"param_bytes": p_bytes, "grad_bytes": p_bytes, "optim_bytes": 2 * p_bytes}
    rows = []
    for layout, ranks in runs.items():
        if not ranks:
            continue
        ways = MEMORY_SPLIT[layout]
        # Ideal per rank: everything / (tp*pp); under FSDP (ZeRO-3) also / dp.
        ideal = sum(v / ways for v in full.values())
        have = [sum(r.get("memory", r).get(k, 0) for k in full) for r in ranks]
        worst = max(have)
        rows.append(row(
            "memory", f"{layout}: params+grads+optimizer per rank / ideal", worst / ideal,
            "x", [h / ideal for h in have], target=f"<= {TARGETS['memory']}",
            met=worst / ideal <= TARGETS["memory"], ideal_bytes=ideal, per_rank_bytes=have))
    return rows
