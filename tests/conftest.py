"""Shared fixtures: one local Ray per test module, a small real corpus, isolated caches."""
import json
import os
import shutil
import signal
import socket
import sysconfig
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
# Ray Train's controller polls its workers every 2 s by default, and a run's start and end
# each wait for a poll; the tests' many short runs poll faster (a Ray started from here, or
# from a process started here, passes this on to its controller).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The local Rays that `raypar train` subprocesses start go without the dashboard (8 more
# processes, about 0.7 GB each time); the test of the dashboard turns it back on.
os.environ.setdefault("RAYPAR_DASHBOARD", "0")
# Ray Train starts a PreemptionWatcher actor (a Python process of its own, about 1.4 s of
# CPU to start) with every worker group; only test_elastic.py drains a node with notice,
# and it turns the watcher back on (its RAY_ENV). A run without one never gets a notice
# (ray.train.get_preemption_info() stays None); everything else is the same.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

ROOT = Path(__file__).resolve().parent.parent

# Fixtures that start Ray (directly, or through fixtures of their own, or in a subprocess):
# a test that uses one, even indirectly, is marked `ray`.
RAY_FIXTURES = {"ray_local", "killed_pp_run"}


def pytest_collection_modifyitems(config, items):
    """`python -m pytest -m "not ray"` runs the unit tests alone, in under a minute: a test
    is marked `ray` by hand (the module's pytestmark, or its own decorator) or here, when it
    uses a fixture that starts Ray."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request, monkeypatch):
    """Keep the marker honest: a test that is not marked `ray` fails at once if it starts
    a Ray instance in this process (it would make the unit run slow, or hang)."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray")

    monkeypatch.setattr(ray, "init", refuse)
    yield


def raypar_records(caplog, level: int = 0) -> list:
    """The log records raypar itself wrote (loggers "raypar" and "raypar.*") at level or above:
    what a test asserts on. Other libraries (torch's DCP logs at DEBUG, Ray, pytest's own
    capture settings) may add records of their own at any level, in any version."""
    return [r for r in caplog.records if r.levelno >= level
            and (r.name == "raypar" or r.name.startswith("raypar."))]


class Payload:
    """What an attacker pickles into a checkpoint: unpickling it runs a shell command that
    creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refresh_manifests(folder: Path, *names: str) -> None:
    """Fix up the manifest entries of files an attacker rewrote, so the checkpoint still
    passes raypar's size and hash check: the forgery is caught by what is read, not how."""
    import hashlib
    import json

    from raypar.train import checkpoint as ckpt
    for path in folder.glob("manifest-*.json"):
        manifest = json.loads(path.read_text())
        for name in set(names) & set(manifest["files"]):
            data = (folder / name).read_bytes()
            manifest["files"][name] = {"size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
        path.write_text(json.dumps(manifest))
    assert ckpt.verify(folder) is None, "the forgery must pass the manifest check"


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with more logical CPUs than cores, so multi-worker layouts schedule."""
    import ray
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """About 400 KB of real Python source: the first 40 small standard-library modules."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    small = [p for p in sorted(stdlib.glob("*.py")) if 2_000 < p.stat().st_size < 20_000]
    for p in small[:40]:
        shutil.copy(p, out / (p.name + ".txt"))
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes():
    """{pid: (parent pid, command line)} of every process, from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (ppid, cmdline)
    return out


def _running(pid: int) -> bool:
    """Whether pid is a process that has not exited: a zombie (exited, not yet reaped by
    its parent, which may be this process) has exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_cluster(dirs):
    """Stop exactly this cluster's processes and their children (`ray stop` would stop
    every Ray on the machine)."""
    procs = _processes()
    mine, pid = set(), os.getpid()  # this process and its parents stay
    while pid in procs and pid not in mine:
        mine.add(pid)
        pid = procs[pid][0]
    doomed = {pid for pid, (_, cmd) in procs.items() if any(d in cmd for d in dirs)} - mine
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in doomed} - doomed
        doomed |= children - mine
        grew = bool(children)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in doomed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(_running(pid) for pid in doomed):
            time.sleep(0.2)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def force_reservation_refresh():
    """Ray Train's elastic policy sizes the group from Ray Data's AutoscalingCoordinator,
    which re-reads the nodes every 20 s; ask it to re-read now (a test only saves time)."""
    import ray
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    ray.get(coordinator.get_reserved_resources.remote("raypar-tests", recompute=True))


def start_run(spec, run_dir):
    """raypar's run() on a thread of its own, so the test can change the cluster meanwhile
    (from the main thread: Ray's node start-up registers signal handlers, which only the
    main thread may do). Returns (thread, outcome): outcome gets "summary" or "error"."""
    import threading

    from raypar.train.driver import run
    outcome = {}

    def train():
        try:
            outcome["summary"] = run(spec, run_dir, progress=False)
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            outcome["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(run_dir, predicate, what, thread, timeout=300):
    """Poll the run's metrics.jsonl until predicate(rows, events) holds; the run (in
    `thread`) must not end first."""
    from raypar.train.rundir import read_metrics
    deadline = time.time() + timeout
    while True:
        rows, events = read_metrics(run_dir)
        if predicate(rows, events):
            return rows, events
        assert thread.is_alive(), f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def layouts(events):
    return [e["dp"] for e in events if e["event"] == "layout"]


def check_chrome_trace(text: str, timelines: list[dict]) -> dict:
    """timeline.trace.json's text against the Trace Event Format's rules (the subset that
    Perfetto's and chrome://tracing's JSON importers read: a strict-JSON object whose
    traceEvents are complete "X" events with a name, pid, tid and non-negative ts/dur in
    microseconds, named by "M" process_name/thread_name events; slices on one thread
    nest) and against the recorded timelines it was made from (timelines[rank] = {"events",
    "start", "end"}): one process with one named thread per rank, a "step" slice holding
    every recorded event once, with its time, in time order. Returns the parsed trace."""
    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")
    trace = json.loads(text, parse_constant=no_constants)
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    assert trace.get("displayTimeUnit", "ms") in ("ms", "ns")
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(meta) + len(slices) == len(trace["traceEvents"])
    for e in trace["traceEvents"]:
        assert isinstance(e["name"], str) and e["name"]
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
    for e in slices:
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
        assert e["ts"] >= 0 and e["dur"] >= 0
    n = len(timelines)
    assert sorted({e["pid"] for e in slices}) == list(range(n))  # one process per rank
    for key in ("process_name", "thread_name"):
        named = [(e["pid"], e["tid"]) for e in meta if e["name"] == key]
        assert sorted(named) == [(r, 0) for r in range(n)], key
        assert all(isinstance(e["args"]["name"], str) for e in meta if e["name"] == key)
    t0 = min(t["start"] for t in timelines)
    for rank, tl in enumerate(timelines):
        mine = [e for e in slices if e["pid"] == rank]
        assert {e["tid"] for e in mine} == {0}  # one track
        step, events = mine[0], mine[1:]
        assert step["name"] == "step"
        assert step["ts"] == pytest.approx((tl["start"] - t0) * 1e6, abs=0.01)
        assert step["dur"] == pytest.approx((tl["end"] - tl["start"]) * 1e6, abs=0.01)
        recorded = sorted(tl["events"], key=lambda e: (e["start"], e["end"]))
        assert len(events) == len(recorded)
        assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
        for got, want in zip(events, recorded):
            assert got["name"] == f"{want['kind']}{want['microbatch']}"
            assert got["args"] == {"stage": want["stage"], "microbatch": want["microbatch"]}
            assert got["ts"] == pytest.approx((want["start"] - t0) * 1e6, abs=0.01)
            assert got["dur"] == pytest.approx((want["end"] - want["start"]) * 1e6, abs=0.01)
            # nested in the step slice
            assert step["ts"] <= got["ts"] and got["ts"] + got["dur"] <= step["ts"] + step[
                "dur"] + 0.01
    return trace


def single_process_rows(spec, cache, tmp_path):
    """The run as one process with no Ray Train: dp=pp=tp=1, the same RankTrainer and data,
    spec's pp and tp must be 1; each step's row (a StepRow, with val_loss on evaluation steps). What every layout,
    resize and resume must reproduce. (The corpus is prepared with Ray Data: Ray is up.)
    With spec's parallel.dp_mode=ps, its parameter server's shards run as actors of this
    process, as the driver starts them."""
    from raypar.data import prepare_corpus
    from raypar.data.tokenizer import padded_vocab
    corpus = prepare_corpus(spec.data, cache)
    return _one_process_rows(spec, padded_vocab(corpus.tokenizer.vocab_size), corpus.train,
                             corpus.val, tmp_path / "store")


def mixture_rows(spec, cache, tmp_path):
    """single_process_rows for a mixture (data.sources): one process, dp=1, over the
    datasets prepare_all gives for spec (prepared here when they are corpora)."""
    from raypar.data import mixture
    from raypar.data.blocks import open_mixture
    from raypar.data.tokenizer import padded_vocab
    datasets = mixture.prepare_all(spec.data, cache)
    sources = mixture.worker_dataset(datasets, spec.data, lambda path: None)["sources"]
    train, val = open_mixture(sources, spec.data.seq_len)
    return _one_process_rows(spec, padded_vocab(datasets[0].tokenizer.vocab_size), train, val,
                             tmp_path / "mix-store")


def _one_process_rows(spec, vocab_size, train, val, store_path):
    """Train spec at dp=1 in this process (a one-rank gloo group): each step's row."""
    import torch.distributed as dist

    from raypar.train.trainer import RankTrainer
    fixed = spec.with_dp(1)
    assert fixed.world_size == 1, "give a spec with pp=1 and tp=1"
    from raypar.parallel import ps
    shards = []
    dist.init_process_group("gloo", store=dist.FileStore(str(store_path), 1), rank=0,
                            world_size=1)
    try:
        server = None
        if fixed.parallel.dp_mode == "ps":
            plan = ps.plan_shards(fixed, vocab_size)
            shards = ps.start_shards(fixed, plan)
            server = {"shards": shards, "plan": plan}
        worker = RankTrainer(fixed, vocab_size, train, val, ps=server)
        if server is not None:
            worker.start_ps()
        rows = []
        while worker.step < fixed.train.steps:
            row = worker.train_step()
            if worker.eval_due():
                row.val_loss = worker.evaluate()
            rows.append(row)
        worker.close()
        return rows
    finally:
        ps.stop_shards(shards)
        dist.destroy_process_group()
