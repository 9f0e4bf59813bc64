"""`raypar bench`: raypar against what a user would use instead, measured side by side in
one invocation on one machine, as ratios with their spread over repeats.

Every figure comes from this invocation: raypar's runs (Ray Train, its real training loop,
checkpoints and failure recovery), the baselines (a bare PyTorch loop, torchrun), and a
probe worker group that times raypar's per-rank RankTrainer under a dozen layouts (see
probe.py). Nothing here asserts a speed: the report says which targets hold.

How the figures are taken (steady state, windows, spread): stats.py; what each section
reports: sections.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import ray
import torch
from ray.data import DataContext
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raypar.bench import comm, dataprep, scale, sections
from raypar.bench.gpu import GPU_MODEL, mfu_rows
from raypar.bench.probe import run_probe
from raypar.bench.report import write_report
from raypar.bench.sections import _dir_bytes
from raypar.bench.stats import median
from raypar.cluster import connect
from raypar.config import ConfigError, RunSpec, load_spec, model_config
from raypar.data import prepare_corpus
from raypar.data.tokenizer import padded_vocab
from raypar.model import param_count
from raypar.parallel.footprint import plan as footprint_plan
from raypar.train import checkpoint as ckpt
from raypar.train.driver import run
from raypar.train.rundir import RunDir, checkpoint_root, read_metrics


@dataclass(frozen=True)
class Size:
    """How much the bench measures: --quick (CI, under 3 minutes on 2 cores) or full."""
    n_files: int  # standard-library source files in the corpus
    prep_mb: float  # MB of text the preparation throughput rows tokenize
    prep_repeats: int  # rounds of (Ray Data 1 CPU, 2 CPUs, HF) for those rows
    peak_mb: int  # MB of the smaller corpus of the memory-growth rows (the other is 4x):
    # 32 and 128 MB, 96 MB apart, so half a byte per byte is 48 MB, against the 10-22 MB by
    # which a worker's memory after its first step moves between identical runs (measured:
    # 8 and 32 MB put the bound at 12 MB, and the row failed on noise in 3 of 6 suites)
    warmup_s: float  # seconds of steps left out of steady state (see `windows`)
    steps: int  # steps of the throughput runs
    repeats: int  # windows the steady steps split into
    probe_steps: int  # timed steps per probe layout
    profile_steps: int
    scale: scale.ScaleSize  # the scale section's models and runs (scale.py)


QUICK = Size(n_files=40, prep_mb=3, prep_repeats=1, peak_mb=32, warmup_s=1.5, steps=24, repeats=3, probe_steps=2, profile_steps=1, scale=scale.QUICK)
FULL = Size(n_files=200, prep_mb=16, prep_repeats=3, peak_mb=32, warmup_s=8.0, steps=150, repeats=5, probe_steps=8, profile_steps=3, scale=scale.FULL)

# The sections `raypar bench --only` can pick, in the order they run (the data preparation
# that every one of them trains on always runs first).
SECTIONS = ("prepare", "throughput", "probe", "memory", "scale", "comm", "cuda")

# The benchmark model: small enough for 2 cores, big enough that a step's arithmetic,
# not Python overhead or communication, dominates (about 0.8 M parameters, 128 tokens).
MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.dropout=0.0"]
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 16, 8, 128


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


def _connect(address: Optional[str], scale_picked: bool) -> None:
    """Ray for the bench: two workers at once, each on one torch thread; with the scale
    section, whose layouts have 4 ranks, a local Ray gets 4 logical CPUs (its ranks
    time-share the cores, as a laptop's do). Only then: Ray Data's preparation runs as
    many tasks as there are CPUs, and the data rows are measured on 2."""
    if not connect(address, 4 if scale_picked else 2):
        return  # a cluster's size is its own (an autoscaling one grows on demand)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < 2:
        raise ConfigError(f"--address: the bench needs 2 CPUs for its 2-worker layouts; "
                          f"the cluster has {cpus:g}")


def _kill_rank(run_dir: Path, rank: int) -> None:
    """SIGKILL a training rank's process, on whichever node it runs (ranks.json names its
    node and pid), the way a crash or the OOM killer would end it."""
    deadline = time.time() + 60
    while True:
        try:
            info = RunDir(run_dir).read_ranks()[rank]
            break
        except (OSError, ValueError, IndexError, TypeError):  # not written yet
            if time.time() > deadline:
                raise RuntimeError(f"bench: no {RunDir(run_dir).ranks}") from None
            time.sleep(0.2)

    def kill(pid: int) -> None:
        os.kill(pid, 9)

    if info["node_id"] == ray.get_runtime_context().get_node_id():
        kill(info["pid"])  # this node's: at once (a Ray task may first start a process)
        return
    ray.get(ray.remote(kill).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        info["node_id"], soft=False)).remote(info["pid"]))


# --------------------------------------------------------------------------- measurements

class Bench:
    def __init__(self, out: Path, size: Size, say: Callable[[str], None]):
        self.out, self.size, self.say = out, size, say
        self.work = Path(tempfile.mkdtemp(prefix="work-", dir=out))
        self.rows: list[dict] = []
        self.context: dict[str, Any] = {}
        self.cluster = False  # joined a cluster (--address, RAY_ADDRESS), not a local Ray

    def spec(self, steps: Optional[int] = None, *overrides: str) -> RunSpec:
        return bench_spec(self.corpus_dir, self.work / "cache", steps or self.size.steps,
                          *overrides)

    @property
    def tokens_per_step(self) -> int:
        return GLOBAL_BATCH * SEQ_LEN

    # -- data ------------------------------------------------------------------------
    def prepare(self) -> None:
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

    def prepare_rates(self) -> None:
        """Preparation tokens/s (Ray Data at 1 and 2 CPUs, HF in one process) and the
        driver's peak memory on two corpora 4x apart (dataprep.py)."""
        s = self.size
        texts = [p.read_text() for p in sorted(self.corpus_dir.glob("*.txt"))]
        corpus = dataprep.source_jsonl(self.work / "prep" / "text", texts, s.prep_mb)
        self.say(f"data: preparing {s.prep_mb:g} MB with Ray Data at 1 and 2 CPUs, "
                 f"and with HF encode_batch")
        self.prep_rates = dataprep.prepare_rates(corpus, self.work / "prep" / "cache",
                                                 repeats=s.prep_repeats)
        self.say(f"data: the driver's peak memory preparing {s.peak_mb} and "
                 f"{4 * s.peak_mb} MB")
        address = ray.get_runtime_context().gcs_address
        self.prep_peaks = {
            name: dataprep.driver_peak(address, dataprep.random_jsonl(
                self.work / "peak" / name, mb, seed=i), self.work / "peak" / "cache")
            for i, (name, mb) in enumerate((("1x", s.peak_mb), ("4x", 4 * s.peak_mb)))}
        # A worker's own peak memory on each (2 steps at dp=1 over the datasets just
        # prepared): it reads the shards its blocks need, never the whole corpus.
        self.say("data: a worker's peak memory training on each")
        for name in self.prep_peaks:
            spec = bench_spec(self.work / "peak" / name, self.work / "peak" / "cache", 2)
            run(spec, self.work / "peak" / f"run-{name}", progress=False)
            [rank0] = [r for r in RunDir(self.work / "peak" / f"run-{name}").read_ranks()
                       if r.rank == 0]
            # What the worker's own memory grew by from the start of its train loop to the
            # end of its first step, without the pages of the shards it memory-maps (file
            # pages the kernel can drop; they count in ru_maxrss, which read 0.54-0.58
            # bytes/byte of "growth" in the suite and none alone). From the start, not in
            # absolute terms: a Ray worker process may be reused and keep what a preparation
            # task left in its heap, which moved the absolute figure by 13 MB between runs.
            if rank0.rss_anon_bytes is None or rank0.rss_anon_start_bytes is None:
                raise RuntimeError("bench: the worker memory rows need /proc/self/status "
                                   "(Linux): this system does not say a process's RssAnon")
            self.prep_peaks[name]["worker_rss_bytes"] = (rank0.rss_anon_bytes
                                                         - rank0.rss_anon_start_bytes)

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
    def _run(self, name: str, spec: RunSpec, kill_after_save: bool = False,
             kill_after: tuple[int, ...] = ()) -> dict:
        """A real raypar run (raypar.train.driver.run). kill_after_save: once the first
        background checkpoint is recorded, SIGKILL rank 1's process, as a crash would;
        kill_after: the same once each of these numbers of checkpoints is recorded ("kept":
        how many checkpoints were in storage at each kill)."""
        run_dir = self.work / name
        outcome: dict[str, Any] = {"kept": []}
        t0 = time.time()
        todo = list(kill_after) or ([0] if kill_after_save else [])

        def train() -> None:
            try:
                outcome["summary"] = run(spec, run_dir, progress=False)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                outcome["error"] = e

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.2)
            if todo:
                _, events = read_metrics(run_dir)
                saves = [e for e in events if e["event"] == "checkpoint"]
                if (len(saves) >= todo[0] if todo[0] else
                        any(e["mode"] == "async" for e in saves)):
                    outcome["kept"].append(len(ckpt.candidates(
                        checkpoint_root(spec, run_dir)[2])))
                    _kill_rank(run_dir, 1)
                    todo.pop(0)
        if "error" in outcome:
            raise outcome["error"]
        if todo:
            raise RuntimeError(f"bench: the {name} run ended before its worker could be killed")
        rows, events = read_metrics(run_dir)
        return {"dir": run_dir, "t0": t0, "summary": outcome["summary"], "rows": rows,
                "events": events, "step_end": [r["time"] for r in rows],
                "kept": outcome["kept"]}

    def throughput(self) -> None:
        """The baselines and raypar's two runs: overhead, launcher, scaling, data and
        checkpoint rows."""
        s = self.size
        self.say("baseline: bare PyTorch loop, 1 process")
        [bare] = self._baseline("bare", self.spec(s.steps))
        # What this machine gives two processes that never talk: the ceiling of dp=2.
        self.say("baseline: two bare PyTorch loops at once")
        pair = self._baseline("bare", self.spec(s.steps), nproc=2)
        self.say("baseline: raypar's RankTrainer under torchrun, 2 processes")
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
        win = dict(warmup_s=s.warmup_s, repeats=s.repeats, tokens_per_step=self.tokens_per_step)
        rows, tokens_per_s = sections.throughput(r1, r2, bare, pair, torchrun, s.steps, win)
        self.command()
        launcher = sum(r["section"] != "scaling" for r in rows)  # the command's rows join them
        self.rows += rows[:launcher] + sections.command(self.command_run, torchrun) + \
            rows[launcher:]
        self.rows += sections.data(r1, s.steps, s.warmup_s, median(tokens_per_s["raypar_dp1"]),
                                   self.data_tokens, self.data_s)
        self.rows += sections.data_prep(self.prep_rates, self.prep_peaks,
                                        self.command_run["first_step"] - self.command_run["t0"])
        self.rows += sections.checkpoints(r1, r2, s.steps)
        self.context["tokens_per_s"] = {k: median(v) for k, v in tokens_per_s.items()}
        self.memory_runs = {"dp=1": r1["summary"].get("ranks"),
                            "dp=2 ddp": r2["summary"].get("ranks")}

    def command(self) -> None:
        """`raypar train` as a user types it, in a process of its own, on torchrun's layout
        (dp=2) and the prepared dataset: seconds from the command to its first step, and
        its start-up profile (summary.json). On a laptop the command starts its own local
        Ray, as a user's does; on a cluster it joins the bench's."""
        where = ["--address", ray.get_runtime_context().gcs_address] if self.cluster else []
        self.say(f"raypar: the `raypar train` command, dp=2, "
                 f"{'on the cluster' if self.cluster else 'starting its own local Ray'}")
        run_dir, config = self.work / "command", self.work / "command.yaml"
        config.write_text(self.spec(4, "parallel.dp=2").to_yaml())
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "raypar.cli", "train", "--config",
                               str(config), "--run-dir", str(run_dir), "--no-progress",
                               *where], env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"bench: `raypar train` failed: {done.stderr[-2000:]}")
        rows, _ = read_metrics(run_dir)
        self.command_run = {"t0": t0, "first_step": rows[0]["time"],
                            "startup": json.loads((run_dir / "summary.json").read_text())
                            ["startup"]}

    # -- probe -----------------------------------------------------------------------
    def _probe_jobs(self) -> list[dict[str, Any]]:
        s = self.size
        jobs = []

        def job(name, *overrides, **kw):
            jobs.append({"name": name, "spec": self.spec(100, *overrides).to_dict(),
                         "warmup": 1, "steps": s.probe_steps, **kw})

        for schedule, v, m in sections.PIPELINE:
            job(sections.pipeline_job(schedule, m), "parallel.pp=2",
                f"parallel.schedule={schedule}", f"parallel.virtual_stages={v}",
                f"train.micro_batch={MICRO_BATCH}", f"train.global_batch={MICRO_BATCH * m}",
                timeline=True)
        job("tp1", profile=True, profile_steps=s.profile_steps)
        job("tp2", "parallel.tp=2", profile=True, profile_steps=s.profile_steps)
        job("fsdp dp=2", "parallel.dp=2", "parallel.dp_mode=fsdp")
        return jobs

    def probe(self) -> None:
        """Pipeline and tensor rows from the probe group (probe.py)."""
        jobs = self._probe_jobs()
        self.say(f"probe: {len(jobs)} layouts in one 2-worker group")
        results = run_probe(jobs, self.vocab, self.corpus.train, self.corpus.val,
                            str(self.work / "ray"))
        found = {r["name"]: r["ranks"] for r in results}
        self.context["probe_seconds"] = {r["name"]: round(r["seconds"], 2) for r in results}
        self.rows += sections.pipeline(found)
        self.rows += sections.tensor(found)
        self.memory_runs.update({"tp=2": found["tp2"],
                                 "pp=2": found[sections.pipeline_job("1f1b", 4)],
                                 "fsdp dp=2": found["fsdp dp=2"]})

    # -- memory ----------------------------------------------------------------------
    def memory(self) -> None:
        n_params = param_count(model_config(self.spec(), self.vocab))
        self.rows += sections.memory(n_params, self.memory_runs)

    # -- scale -----------------------------------------------------------------------
    def scale(self, s3: Optional[str]) -> None:
        """Memory per rank against its share for a model >= 8x the default under pp=2 x
        tp=2 and fsdp dp=4; checkpoint loads per rank for two models 4x apart; step time
        lost to a save (local disk, the local S3 server at s3); restart after a worker
        kill with 3 checkpoints kept against 1 (scale.py)."""
        z = self.size.scale
        if ray.cluster_resources().get("CPU", 0) < 4:
            self.context["scale"] = "skipped: the cluster has fewer than 4 CPUs"
            return
        if s3 is None and z.io:
            self.context["scale_s3"] = ("skipped: moto is not installed (pip install "
                                        "'moto[server]'), or the bench joined a cluster")

        def spec(model, steps, *overrides):
            return self.spec(steps, *model, *scale.COMMON, *overrides)

        def params(model) -> int:
            return param_count(model_config(spec(model, 1), self.vocab))

        big_n, small_n = params(z.big), params(z.small)
        # The full model's training state: fp32 parameters, gradients, AdamW's 2 moments.
        full_bytes = 16 * big_n
        for layout, fields in (("pp=2 x tp=2", scale.PP2_TP2), ("fsdp dp=4", scale.FSDP4)):
            self.say(f"scale: {big_n / 1e6:.1f} M parameters at {layout}, {z.steps} steps")
            name = "scale-" + layout.replace(" ", "").replace("=", "")
            s = spec(z.big, z.steps, *fields, "checkpoint.every=0", "checkpoint.keep=1")
            r = self._run(name, s)
            ranks = RunDir(r["dir"]).read_ranks()
            self.rows += scale.memory_rows(layout, ranks, footprint_plan(s, self.vocab),
                                           full_bytes, s.parallel)
            if fields is scale.PP2_TP2 and z.io:
                # Its final checkpoint, loaded by a --resume for one more step.
                self.say("scale: resuming it (each rank loads its share)")
                run(spec(z.big, z.steps + 1, *fields, "checkpoint.every=0",
                         "checkpoint.keep=1"), r["dir"], progress=False, resume=True)
                big_loads = RunDir(r["dir"]).read_ranks()

        if not z.io:
            self.context["scale"] = {"big_params": big_n, "full_model_bytes": full_bytes,
                                     "io": "checkpoint loads, saves and restarts: in the "
                                           "full bench only (raypar bench without --quick)"}
            return
        # Killed twice: after the first save (1 checkpoint kept), then once `saves` more
        # are made (keep=3 holds 3): the two restarts differ in nothing else. On S3 once.
        steps = z.every * (z.saves + 3)
        kills = {}
        for where, kill_after in (("local", (1, z.saves + 1)), ("s3", (z.saves,))):
            if where == "s3" and s3 is None:
                continue
            name = f"scale-kills-{where}"
            self.say(f"scale: {small_n / 1e6:.1f} M parameters at pp=2 x tp=2, a background "
                     f"save every {z.every} steps to {where}, keep=3, killed after saves "
                     f"{', '.join(map(str, kill_after))}")
            storage = [f"checkpoint.storage_path={s3}/{name}"] if where == "s3" else []
            kills[where] = self._run(name, spec(
                z.small, steps, *scale.PP2_TP2, f"checkpoint.every={z.every}",
                "checkpoint.keep=3", "checkpoint.async_save=true",
                f"checkpoint.max_failures={len(kill_after)}", *storage), kill_after=kill_after)
        local, on_s3 = kills["local"], kills.get("s3")
        self.rows += scale.load_rows(big_loads, RunDir(local["dir"]).read_ranks(), big_n,
                                     small_n, RunDir(on_s3["dir"]).read_ranks() if on_s3
                                     else None)
        ckpt_bytes = _dir_bytes(ckpt.candidates(RunDir(local["dir"]).checkpoints)[0])
        self.rows.append(scale.save_row("local disk", scale.save_losses(
            local["step_end"], z.every), ckpt_bytes))
        if on_s3:
            self.rows.append(scale.save_row("local S3 server", scale.save_losses(
                on_s3["step_end"], z.every), ckpt_bytes))
        self.rows += scale.restart_rows(local, on_s3)
        self.context["scale"] = {"big_params": big_n, "small_params": small_n,
                                 "full_model_bytes": full_bytes, "s3": s3 is not None}

    # -- communication strategies ----------------------------------------------------
    def comm(self, quick: bool) -> None:
        """Sync DDP, the parameter server, local SGD and compressed gradients on one model
        and global batch at dp=2 (comm.py), each also with a straggler (comm.STRAGGLERS)."""
        if quick:
            self.context["comm"] = ("full bench only (raypar bench without --quick, or "
                                    "--only comm): 22 worker groups of dp=2")
            return
        runs: dict[str, dict] = {}
        kinds = [kind for kind, _, _ in comm.STRAGGLERS]
        delayed: dict[str, dict[str, dict]] = {kind: {} for kind in kinds}
        bases: list[dict[str, dict]] = []
        # Sync DDP at the start and again at the end (its windows averaged), the others
        # between, each strategy's plain and slowed runs back to back: machine drift over
        # the section's minutes falls on both sides of every ratio.
        order = [comm.BASE, *[n for n, _ in comm.STRATEGIES[1:]], comm.BASE]
        overrides = dict(comm.STRATEGIES)
        for i, name in enumerate(order):
            spec = self.spec(comm.STEPS, "parallel.dp=2", *overrides[name])
            slug = name.replace(" ", "-").replace("(", "").replace(")", "").replace("=", "")
            mine = [k for k in kinds if comm.straggles(k, name)]
            self.say(f"comm: {name}, {comm.STEPS} steps at dp=2, then with a replica "
                     f"slowed {comm.DELAY_S:g} s a step ({', '.join(mine)})")
            got = {"": self._run(f"comm-{i}-{slug}", spec)}
            for kind in mine:
                with _env(RAYPAR_STEP_DELAY_S=str(comm.DELAY_S), RAYPAR_STEP_DELAY_REPLICA=kind):
                    got[kind] = self._run(f"comm-{i}-{slug}-slowed-{kind}", spec)
            if name == comm.BASE:
                bases.append(got)
            else:
                runs[name] = got[""]
                for kind in mine:
                    delayed[kind][name] = got[kind]
        runs[comm.BASE] = comm.merged([b[""] for b in bases])
        for kind in kinds:
            delayed[kind][comm.BASE] = comm.merged([b[kind] for b in bases])
        self.rows += comm.comm_rows(runs, delayed, comm.WARMUP_S, comm.REPEATS,
                                    self.tokens_per_step, comm.DELAY_S)
        self.context["comm"] = {"steps": comm.STEPS, "dp": 2, "delay_s": comm.DELAY_S,
                                "global_batch": GLOBAL_BATCH}

    # -- CUDA ------------------------------------------------------------------------
    def cuda(self) -> None:
        if ray.cluster_resources().get("GPU", 0) < 1:
            self.context["cuda"] = "skipped: the cluster has no GPU"
            return
        self.say("cuda: bf16 tokens/s and MFU, eager and torch.compile")
        spec = self.spec(None, *GPU_MODEL)
        corpus = prepare_corpus(spec.data, self.work / "cache")
        self.rows.extend(mfu_rows(spec, self.vocab, corpus.train, self.size.steps))


class _env:
    """Environment variables set for a block (the driver reads RAYPAR_STEP_DELAY_* as a
    run starts), and put back as they were after it."""

    def __init__(self, **values: str):
        self.values, self.saved = values, {}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "ray_cpus": ray.cluster_resources().get("CPU"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(out: Path, quick: bool = True, address: Optional[str] = None,
              say: Callable[[str], None] = lambda m: print(f"bench: {m}", file=sys.stderr),
              only: Optional[list[str]] = None) -> dict:
    """Measure everything (or the sections in `only`, of SECTIONS), write bench.json,
    bench.md and the PNGs to out, log them to MLflow; returns the report."""
    picked = set(only or SECTIONS)
    unknown = sorted(picked - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--only: unknown section {unknown[0]}; choose from "
                          f"{', '.join(SECTIONS)}")
    if "memory" in picked:  # its rows read the throughput and probe runs' ranks
        picked |= {"throughput", "probe"}
    if "probe" in picked:
        picked.add("throughput")
    if "throughput" in picked:  # its data rows take the preparation's
        picked.add("prepare")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = QUICK if quick else FULL
    t0 = time.time()
    # The local S3 server starts before Ray, so that Ray's workers inherit its endpoint; a
    # joined cluster's workers could not reach this machine's 127.0.0.1.
    with scale.local_s3(enabled="scale" in picked and size.scale.io and not (
            address or os.environ.get("RAY_ADDRESS"))) as s3:
        return _run_bench(out, size, address, say, picked, s3, t0, quick)


def _run_bench(out: Path, size: Size, address: Optional[str], say: Callable[[str], None],
               picked: set[str], s3: Optional[str], t0: float, quick: bool) -> dict:
    _connect(address, "scale" in picked)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    started = time.time()
    bench = Bench(out, size, lambda m: say(f"[{time.time() - started:5.0f} s] {m}"))
    bench.cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    try:
        bench.prepare()
        if "prepare" in picked:
            bench.prepare_rates()
        if "throughput" in picked:
            bench.throughput()
        if "probe" in picked:
            bench.probe()
        if "memory" in picked:
            bench.memory()
        if "scale" in picked:
            bench.scale(s3)
        if "comm" in picked:
            bench.comm(quick)
        if "cuda" in picked:
            bench.cuda()
    except BaseException:
        say(f"the runs' directories are kept in {bench.work}")
        raise
    shutil.rmtree(bench.work, ignore_errors=True)
    report = {
        "mode": "quick" if quick else "full", "seconds": round(time.time() - t0, 1),
        "sections": [name for name in SECTIONS if name in picked],
        "machine": _machine(),
        "model": {"fields": MODEL, "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH,
                  "micro_batch": MICRO_BATCH, "dtype": "fp32"},
        "rows": bench.rows, "context": bench.context}
    for row in report["rows"]:
        if not all(math.isfinite(x) for x in [row["value"], *row["spread"]]):
            raise RuntimeError(f"bench: {row['name']} has no finite value: {row}")
    write_report(report, out)
    return report
