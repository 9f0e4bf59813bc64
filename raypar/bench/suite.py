"""`raypar bench`: raypar against what a user would use instead, measured side by side in
one invocation on one machine, as ratios with their spread over repeats.

Every figure comes from this invocation: raypar's runs (Ray Train, its real training loop,
checkpoints and failure recovery), the baselines (a bare PyTorch loop, torchrun), and a
probe worker group that times raypar's per-rank Worker under a dozen layouts (see
probe.py). Nothing here asserts a speed: the report says which targets hold.

Steady state: the first steps of every run (start-up, allocator warm-up) are left out; the
steps after are split into `repeats` windows of equal size, and each ratio is taken
window by window (window i of raypar against window i of the baseline), which gives the
spread. Raypar's step times are the wall-clock gaps between its metrics rows, so they
include everything its loop does per step (control exchange, reports); steps that
wrote a checkpoint are left out of throughput and measured on their own.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import ray

from raypar.cluster import connect
from raypar.config import ConfigError, RunSpec, load_spec

log = logging.getLogger("raypar")


@dataclass(frozen=True)
class Size:
    """How much the bench measures: --quick (CI, under 3 minutes on 2 cores) or full."""
    n_files: int  # standard-library source files in the corpus
    warmup_s: float  # seconds of steps left out of steady state (see `windows`)
    steps: int  # steps of the throughput runs
    repeats: int  # windows the steady steps split into
    probe_steps: int  # timed steps per probe layout
    profile_steps: int


QUICK = Size(n_files=40, warmup_s=1.5, steps=16, repeats=3, probe_steps=2, profile_steps=1)
FULL = Size(n_files=200, warmup_s=8.0, steps=150, repeats=5, probe_steps=8, profile_steps=3)

# The benchmark model: small enough for 2 cores, big enough that a step's arithmetic,
# not Python overhead or communication, dominates (about 0.8 M parameters, 128 tokens).
MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.dropout=0.0"]
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 16, 8, 128
TARGETS = {"overhead": 0.95, "launcher": 0.95, "scaling": 1.8, "bubble": 0.2,
           "data_wait": 0.02, "memory": 1.10}


# --------------------------------------------------------------------------- rows

def _row(section: str, name: str, value: float, unit: str, samples: Optional[list] = None,
         target: Optional[str] = None, met: Optional[bool] = None, **detail: Any) -> dict:
    """One line of the report: a value (the median of its samples) and its spread."""
    samples = [float(x) for x in samples] if samples else [float(value)]
    return {"section": section, "name": name, "value": float(value), "unit": unit,
            "spread": [min(samples), max(samples)], "samples": samples,
            "target": target, "met": met, "detail": detail}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def windows(step_end: list[float], warmup_s: float, repeats: int, tokens_per_step: int,
            exclude: frozenset = frozenset()) -> list[float]:
    """Tokens/s in `repeats` equal windows of the step intervals that start warmup_s or
    more after the first step ended. step_end[i] is the wall-clock end of step i+1; an
    interval ending at step s is left out when s is in exclude (it held a checkpoint write).

    Why seconds and not steps: as a Ray Train run starts, Ray starts its controller and
    helper actors (new Python processes) beside the workers, and on 2 cores they slow the
    first seconds of training whatever the step time."""
    gaps = [(i + 1, step_end[i] - step_end[i - 1]) for i in range(1, len(step_end))
            if step_end[i - 1] - step_end[0] >= warmup_s]
    gaps = [g for s, g in gaps if s not in exclude]
    if len(gaps) < repeats:
        raise RuntimeError(f"bench: {len(gaps)} steady steps for {repeats} windows; "
                           f"the run was too short")
    size = len(gaps) // repeats
    return [size * tokens_per_step / sum(gaps[i * size:(i + 1) * size]) for i in range(repeats)]


def ratio_row(section: str, name: str, ours: list[float], theirs: list[float],
              target: Optional[float], **detail: Any) -> dict:
    ratios = [a / b for a, b in zip(ours, theirs)]
    value = _median(ratios)
    return _row(section, name, value, "x", ratios,
                target=None if target is None else f">= {target}",
                met=None if target is None else value >= target,
                ours_tokens_per_s=_median(ours), theirs_tokens_per_s=_median(theirs), **detail)


# --------------------------------------------------------------------------- set-up

def stdlib_corpus(dest: Path, n_files: int) -> Path:
    """The first n_files mid-sized standard-library modules (every machine has them)."""
    dest.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(stdlib.glob("*.py")) if 2_000 < p.stat().st_size < 60_000]
    for p in picked[:n_files]:
        shutil.copy(p, dest / (p.name + ".txt"))
    return dest


def bench_spec(corpus: Path, cache: Path, steps: int, *overrides: str) -> RunSpec:
    return load_spec(None, [
        "name=bench", *MODEL, f"data.path={corpus}", f"data.cache_dir={cache}",
        f"data.seq_len={SEQ_LEN}", "data.tokenizer=byte", "data.val_fraction=0.05",
        f"train.steps={steps}", f"train.global_batch={GLOBAL_BATCH}",
        f"train.micro_batch={MICRO_BATCH}", "train.lr=0.001", "train.min_lr=0.0001",
        "train.warmup_steps=2", "train.eval_every=0", "train.threads=1",
        "checkpoint.every=0", "checkpoint.keep=3", "tracking.enabled=false",
        "parallel.dp=1", "parallel.pp=1", "parallel.tp=1", *overrides])


def _connect(address: Optional[str]) -> None:
    """Ray for the bench: at most two workers run at once, each on one torch thread."""
    connect(address, 2)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < 2:
        raise ConfigError(f"--address: the bench needs 2 CPUs for its 2-worker layouts; "
                          f"the cluster has {cpus:g}")


def _kill_rank(run_dir: Path, rank: int) -> None:
    """SIGKILL a training rank's process, on whichever node it runs (ranks.json names its
    node and pid), the way a crash or the OOM killer would end it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    deadline = time.time() + 60
    while True:
        try:
            info = json.loads((run_dir / "ranks.json").read_text())[rank]
            break
        except (OSError, ValueError, IndexError):
            if time.time() > deadline:
                raise RuntimeError(f"bench: no ranks.json in {run_dir}") from None
            time.sleep(0.2)

    def kill(pid: int) -> None:
        os.kill(pid, 9)

    if info["node_id"] == ray.get_runtime_context().get_node_id():
        kill(info["pid"])  # this node's: at once (a Ray task may first start a process)
        return
    ray.get(ray.remote(kill).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        info["node_id"], soft=False)).remote(info["pid"]))


def _lost(run: dict, step: int, after: int = 4) -> float:
    """Seconds the `after` steps following `step` took beyond the run's median step time
    (a gap ten times the median is a restart, not a save, and ends the count)."""
    ends = run["step_end"]
    median = _median(list(np.diff(ends[:step])))
    lost = 0.0
    for i in range(step, min(step + after, len(ends))):
        gap = ends[i] - ends[i - 1]
        if gap > 10 * median:
            break
        lost += max(0.0, gap - median)
    return lost


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- measurements

class Bench:
    def __init__(self, out: Path, size: Size, say: Callable[[str], None]):
        self.out, self.size, self.say = out, size, say
        self.work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
        self.rows: list[dict] = []
        self.context: dict[str, Any] = {}

    def spec(self, steps: Optional[int] = None, *overrides: str) -> RunSpec:
        return bench_spec(self.corpus_dir, self.work / "cache", steps or self.size.steps,
                          *overrides)

    @property
    def tokens_per_step(self) -> int:
        return GLOBAL_BATCH * SEQ_LEN

    # -- data ------------------------------------------------------------------------
    def prepare(self) -> None:
        from raypar.data import prepare_corpus
        from raypar.data.tokenizer import padded_vocab
        self.corpus_dir = stdlib_corpus(self.work / "corpus", self.size.n_files)
        self.say(f"data: tokenizing {self.size.n_files} files with Ray Data")
        t0 = time.perf_counter()
        corpus = prepare_corpus(self.spec().data, self.work / "cache")  # cold: nothing cached
        self.data_s = time.perf_counter() - t0
        self.corpus = corpus
        self.data_tokens = corpus.stats["train_tokens"] + corpus.stats["val_tokens"]
        self.vocab = padded_vocab(corpus.tokenizer.vocab_size)
        np.save(self.work / "train.npy", corpus.train)
        np.save(self.work / "val.npy", corpus.val)
        self.context["corpus"] = corpus.stats

    # -- baselines -------------------------------------------------------------------
    def _baseline(self, mode: str, spec: RunSpec, nproc: int = 1) -> list[dict]:
        """Run a baseline (baseline.py): `bare` as nproc independent processes at once,
        `torchrun` as one job of nproc ranks. Returns each process's (rank 0's) record."""
        job = self.work / f"{mode}.job.json"
        job.write_text(json.dumps({
            "spec": spec.to_dict(), "vocab_size": self.vocab, "steps": spec.train.steps,
            "blocks": str(self.work / "train.npy"), "val": str(self.work / "val.npy"),
            "launched": time.time()}))
        if mode == "bare":
            cmds = [[sys.executable, "-m", "raypar.bench.baseline", "bare"]] * nproc
        else:
            cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={nproc}", "-m", "raypar.bench.baseline", "torchrun"]]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.train.threads)}
        env.pop("RAY_ADDRESS", None)
        outs = [self.work / f"{mode}-{nproc}.{i}.out.json" for i in range(len(cmds))]
        procs = [subprocess.Popen([*cmd, "--job", str(job), "--out", str(out)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for cmd, out in zip(cmds, outs)]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"bench: the {mode} baseline failed: "
                                   f"{(err.strip().splitlines() or ['?'])[-1]}")
        return [json.loads(out.read_text()) for out in outs]

    # -- raypar runs -----------------------------------------------------------------
    def _run(self, name: str, spec: RunSpec, kill_after_save: bool = False) -> dict:
        """A real raypar run (raypar.train.trainer.run). kill_after_save: once the first
        background checkpoint is recorded, SIGKILL rank 1's process, as a crash would."""
        import threading

        from raypar.train.trainer import read_metrics, run
        run_dir = self.work / name
        outcome: dict[str, Any] = {}
        t0 = time.time()

        def train() -> None:
            try:
                outcome["summary"] = run(spec, run_dir, progress=False)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                outcome["error"] = e

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        killed = not kill_after_save
        while thread.is_alive():
            thread.join(timeout=0.2)
            if not killed:
                _, events = read_metrics(run_dir)
                if any(e["event"] == "checkpoint" and e["mode"] == "async" for e in events):
                    _kill_rank(run_dir, 1)
                    killed = True
        if "error" in outcome:
            raise outcome["error"]
        if not killed:
            raise RuntimeError(f"bench: the {name} run ended before its worker could be killed")
        rows, events = read_metrics(run_dir)
        return {"dir": run_dir, "t0": t0, "summary": outcome["summary"], "rows": rows,
                "events": events, "step_end": [r["time"] for r in rows]}

    def _saves(self, run: dict) -> list[dict]:
        return [e for e in run["events"] if e["event"] == "checkpoint"]

    def throughput(self) -> None:
        s = self.size
        tps = self.tokens_per_step
        win = dict(warmup_s=s.warmup_s, repeats=s.repeats, tokens_per_step=tps)
        self.say("baseline: bare PyTorch loop, 1 process")
        [bare] = self._baseline("bare", self.spec(s.steps))
        # What this machine gives two processes that never talk: the ceiling of dp=2.
        self.say("baseline: two bare PyTorch loops at once")
        pair = self._baseline("bare", self.spec(s.steps), nproc=2)
        self.say("baseline: raypar's Worker under torchrun, 2 processes")
        # dp=2 steps take about half as long: twice as many fill the same seconds.
        [torchrun] = self._baseline("torchrun", self.spec(2 * s.steps, "parallel.dp=2"),
                                    nproc=2)
        # Both runs save a checkpoint after the throughput steps: synchronously at dp=1; in
        # the background at dp=2, whose rank 1 is then killed to time the recovery.
        self.say("raypar: dp=1 (Ray Train), synchronous checkpoint")
        r1 = self._run("raypar-dp1", self.spec(
            s.steps + 2, f"checkpoint.every={s.steps}", "checkpoint.async_save=false"))
        self.say("raypar: dp=2 (Ray Train), background checkpoint, then a worker killed")
        r2 = self._run("raypar-dp2", self.spec(
            2 * s.steps + 24, "parallel.dp=2", f"checkpoint.every={2 * s.steps}",
            "checkpoint.async_save=true", "checkpoint.max_failures=1"), kill_after_save=True)
        ours1 = windows(r1["step_end"][:s.steps], **win)
        ours2 = windows(r2["step_end"][:2 * s.steps], **win)
        base = windows(bare["step_end"], **win)
        tr = windows(torchrun["step_end"], **win)
        self.rows.append(ratio_row("overhead", "raypar dp=1 / bare PyTorch loop (tokens/s)",
                                   ours1, base, TARGETS["overhead"]))
        self.rows.append(ratio_row("launcher", "raypar dp=2 / torchrun dp=2 (tokens/s)",
                                   ours2, tr, TARGETS["launcher"]))
        self.rows.append(_row("launcher", "start-up to first step: raypar (Ray Train)",
                              r2["step_end"][0] - r2["t0"], "s",
                              note="includes the driver's corpus load (cached) and Ray Train's "
                                   "worker group start"))
        self.rows.append(_row("launcher", "start-up to first step: torchrun",
                              torchrun["step_end"][0] - torchrun["launched"], "s"))
        both = [a + b for a, b in zip(*(windows(p["step_end"], **win) for p in pair))]
        self.rows.append(ratio_row("scaling", "raypar dp=2 / dp=1 (tokens/s, 1 thread each)",
                                   ours2, ours1, TARGETS["scaling"],
                                   ceiling=_median([a / b for a, b in zip(both, base)])))
        self.rows.append(ratio_row("scaling", "torchrun dp=2 / bare loop (tokens/s)", tr, base,
                                   None))
        self.rows.append(ratio_row(
            "scaling", "machine ceiling: 2 independent bare loops / 1 (tokens/s)", both, base,
            None, note="two processes that never communicate: what 2 cores give here"))
        # Data: what Ray Data delivers against what training consumes, and the share of
        # step time a step waits for its batch.
        consumed = _median(ours1)
        delivered = self.data_tokens / self.data_s
        self.rows.append(_row("data", "Ray Data delivered / trainer consumed (tokens/s)",
                              delivered / consumed, "x", delivered_tokens_per_s=delivered,
                              consumed_tokens_per_s=consumed, corpus_seconds=self.data_s))
        ends, rows = r1["step_end"][:s.steps], r1["rows"][:s.steps]
        share = [rows[i]["data_s"] / (ends[i] - ends[i - 1]) for i in range(1, len(ends))
                 if ends[i - 1] - ends[0] >= s.warmup_s]
        share_med = _median(share)
        self.rows.append(_row("data", "step time waiting for data (dp=1)", share_med, "fraction",
                              share, target=f"< {TARGETS['data_wait']}",
                              met=share_med < TARGETS["data_wait"]))
        self._checkpoints(r1, r2)
        self.context["tokens_per_s"] = {k: _median(v) for k, v in (
            ("raypar_dp1", ours1), ("raypar_dp2", ours2), ("bare", base), ("torchrun", tr))}
        self.memory_runs = {"dp=1": r1["summary"].get("ranks"),
                            "dp=2 ddp": r2["summary"].get("ranks")}

    def _checkpoints(self, r1: dict, r2: dict) -> None:
        [sync] = [e for e in self._saves(r1) if e["step"] == self.size.steps]
        background = [e for e in self._saves(r2) if e["mode"] == "async"]
        if not background:
            raise RuntimeError("bench: the dp=2 run made no background save")
        bg = background[0]
        sync_bytes = _dir_bytes(r1["dir"] / "checkpoints" / f"step_{sync['step']:08d}")
        bg_bytes = _dir_bytes(r2["dir"] / "checkpoints" / f"step_{bg['step']:08d}")
        mb = 2 ** 20
        self.rows.append(_row("checkpoint", "save, synchronous (dp=1)",
                              sync_bytes / mb / sync["save_s"], "MB/s", bytes=sync_bytes,
                              seconds=sync["save_s"]))
        self.rows.append(_row("checkpoint", "save, background (dp=2)",
                              bg_bytes / mb / bg["save_s"], "MB/s", bytes=bg_bytes,
                              seconds=bg["save_s"]))
        for run, event, label in ((r1, sync, "synchronous"), (r2, bg, "background")):
            self.rows.append(_row(
                "checkpoint", f"step time lost to a {label} save", _lost(run, event["step"]),
                "s", loop_blocked_s=event["stall_s"],
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
            self.rows.append(_row("checkpoint", "load on restart (dp=2)",
                                  loaded / mb / rec["load_s"], "MB/s", bytes=loaded,
                                  seconds=rec["load_s"]))
        self.rows.append(_row("checkpoint", "recovery after a worker kill (dp=2)",
                              rec["recovery_s"], "s", steps_redone=rec["steps_redone"],
                              note="from the failure to the first new step, Ray Train's "
                                   "restart of the worker group included"))

    # -- probe -----------------------------------------------------------------------
    def probe(self) -> None:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from raypar.bench.probe import Mailbox, probe_loop
        from raypar.parallel.pipeline import pipeline_bubble, step_span, theoretical_bubble

        s = self.size
        jobs = []

        def job(name, *overrides, **kw):
            jobs.append({"name": name, "spec": self.spec(100, *overrides).to_dict(),
                         "warmup": 1, "steps": s.probe_steps, **kw})

        for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
            for m in (2, 4, 8):
                job(f"pp2 {schedule} m={m}", "parallel.pp=2", f"parallel.schedule={schedule}",
                    f"parallel.virtual_stages={v}", f"train.micro_batch={MICRO_BATCH}",
                    f"train.global_batch={MICRO_BATCH * m}",
                    timeline=True)
        job("tp1", profile=True, profile_steps=s.profile_steps)
        job("tp2", "parallel.tp=2", profile=True, profile_steps=s.profile_steps)
        job("fsdp dp=2", "parallel.dp=2", "parallel.dp_mode=fsdp")
        self.say(f"probe: {len(jobs)} layouts in one 2-worker group")
        mailbox = Mailbox.remote()
        trainer = TorchTrainer(
            probe_loop,
            train_loop_config={"jobs": jobs, "vocab_size": self.vocab, "mailbox": mailbox,
                               "train_ref": ray.put(self.corpus.train),
                               "val_ref": ray.put(self.corpus.val)},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name="probe", storage_path=str(self.work / "ray")))
        trainer.fit()
        results = ray.get(mailbox.get.remote())
        found = {r["name"]: r["ranks"] for r in results}
        self.context["probe_seconds"] = {r["name"]: round(r["seconds"], 2) for r in results}
        ray.kill(mailbox)
        self.probe_results = found
        for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)):
            for m in (2, 4, 8):
                ranks = found[f"pp2 {schedule} m={m}"]
                # One sample per timed step: that step's timeline from every rank.
                steps = [list(step) for step in zip(*(r["timelines"] for r in ranks))]
                per_step = [pipeline_bubble(step) for step in steps]
                theory = theoretical_bubble(schedule, 2, m, v)
                rel = [b / theory for b in per_step]
                value = _median(rel)
                # What the idle time is made of, per F/B action: its compute, and the idle
                # time beside it (the schedule's waits, transfers and runtime overhead).
                actions = [sum(len(t["events"]) for t in step) for step in steps]
                # rank-seconds of each step: every rank over the step's whole span
                span = [len(step) * (end - start)
                        for step, (start, end) in zip(steps, map(step_span, steps))]
                busy = [(1 - b) * s_ for b, s_ in zip(per_step, span)]
                self.rows.append(_row(
                    "pipeline", f"bubble {schedule} p=2 m={m}: measured / theory", value, "x",
                    rel, target="0.8 .. 1.2", met=abs(value - 1) <= TARGETS["bubble"],
                    measured=_median(per_step), theory=theory,
                    compute_ms_per_action=_median([1e3 * b / n for b, n in zip(busy, actions)]),
                    idle_ms_per_action=_median([1e3 * (s_ - b) / n
                                                for b, s_, n in zip(busy, span, actions)])))
        tp1, tp2 = found["tp1"][0], found["tp2"]
        t1 = tp1["step_s"]
        t2 = [max(r["step_s"][i] for r in tp2) for i in range(len(tp2[0]["step_s"]))]
        per_step = [a / b for a, b in zip(t2, t1)]
        self.rows.append(_row("tensor", "tp=2 / tp=1 step time", _median(per_step), "x",
                              per_step, tp1_step_s=_median(t1), tp2_step_s=_median(t2)))
        shares = [c / st for r in tp2 for c, st in zip(r["comm_s"], r["profiled_step_s"])]
        self.rows.append(_row("tensor", "tp=2 share of step time in communication",
                              _median(shares), "fraction", shares,
                              note="collectives and their waits, from torch.profiler"))
        self.memory_runs.update({"tp=2": tp2, "pp=2": found["pp2 1f1b m=4"],
                                 "fsdp dp=2": found["fsdp dp=2"]})

    # -- memory ----------------------------------------------------------------------
    def memory(self) -> None:
        from raypar.model import param_count
        from raypar.config import model_config
        p_bytes = param_count(model_config(self.spec(), self.vocab)) * 4  # fp32
        full = {"param_bytes": p_bytes, "grad_bytes": p_bytes, "optim_bytes": 2 * p_bytes}
        split = {"dp=1": 1, "dp=2 ddp": 1, "tp=2": 2, "pp=2": 2, "fsdp dp=2": 2}
        for layout, ranks in self.memory_runs.items():
            if not ranks:
                continue
            ways = split[layout]
            # Ideal per rank: everything / (tp*pp); under FSDP (ZeRO-3) also / dp.
            ideal = sum(v / ways for k, v in full.items())
            have = [sum(r.get("memory", r).get(k, 0) for k in full) for r in ranks]
            worst = max(have)
            self.rows.append(_row(
                "memory", f"{layout}: params+grads+optimizer per rank / ideal", worst / ideal,
                "x", [h / ideal for h in have], target=f"<= {TARGETS['memory']}",
                met=worst / ideal <= TARGETS["memory"], ideal_bytes=ideal,
                per_rank_bytes=have))

    # -- CUDA ------------------------------------------------------------------------
    def cuda(self) -> None:
        import ray
        if ray.cluster_resources().get("GPU", 0) < 1:
            self.context["cuda"] = "skipped: the cluster has no GPU"
            return
        from raypar.bench.gpu import GPU_MODEL, mfu_rows
        from raypar.data import prepare_corpus
        self.say("cuda: bf16 tokens/s and MFU, eager and torch.compile")
        corpus = prepare_corpus(self.spec(None, *GPU_MODEL).data, self.work / "cache")
        self.rows.extend(mfu_rows(lambda *o: self.spec(None, *o), self.vocab, corpus.train,
                                  self.size.steps, _row))


def run_bench(out: Path, quick: bool = True, address: Optional[str] = None,
              say: Callable[[str], None] = lambda m: print(f"bench: {m}", file=sys.stderr)
              ) -> dict:
    """Measure everything, write bench.json, bench.md and the PNGs to out, log them to
    MLflow; returns the report."""
    from raypar.bench.report import write_report
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = QUICK if quick else FULL
    t0 = time.time()
    _connect(address)
    import ray
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    started = time.time()
    bench = Bench(out, size, lambda m: say(f"[{time.time() - started:5.0f} s] {m}"))
    try:
        bench.prepare()
        bench.throughput()
        bench.probe()
        bench.memory()
        bench.cuda()
    except BaseException:
        say(f"the runs' directories are kept in {bench.work}")
        raise
    shutil.rmtree(bench.work, ignore_errors=True)
    import platform
    import torch
    report = {
        "mode": "quick" if quick else "full", "seconds": round(time.time() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__,
                    "ray_cpus": ray.cluster_resources().get("CPU"),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "model": {"fields": MODEL, "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH,
                  "micro_batch": MICRO_BATCH, "dtype": "fp32"},
        "rows": bench.rows, "context": bench.context}
    for row in report["rows"]:
        if not all(math.isfinite(x) for x in [row["value"], *row["spread"]]):
            raise RuntimeError(f"bench: {row['name']} has no finite value: {row}")
    write_report(report, out)
    return report
