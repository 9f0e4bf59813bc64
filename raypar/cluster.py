"""The cluster: connect to Ray, check that a layout can ever run there (capacity, and a
local machine's memory), and the ScalingConfig that Ray Train places the workers with.

    is_local = connect(address, spec.world_size * spec.train.threads)
    check_capacity(spec, is_local, vocab_size, use_gpu)

A local Ray comes with its dashboard when ray[default] is installed (local_ray_note).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import ray
from ray.train import ScalingConfig

from raypar.config import ConfigError, RunSpec, choose_dp
from raypar.parallel.footprint import plan

log = logging.getLogger("raypar")

# A worker process (torch + Ray) costs about this much before the model: measured
# resident size of an idle Ray Train worker with torch imported on CPU.
WORKER_BASE_BYTES = 700 * 2**20


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def layout_memory_bytes(spec: RunSpec, vocab_size: int) -> int:
    """Estimated memory of all the layout's workers together (raypar/parallel/footprint.py),
    summed over its pipeline ranks times the dp * tp ranks that share each one's footprint
    (never rank by rank: a world of any size is answered at once)."""
    return plan(spec, vocab_size).total_bytes(per_worker=WORKER_BASE_BYTES)


# What the local Ray that connect() started offers Ray's own tools (local_ray_note).
_local: Optional[dict] = None


def dashboard_missing() -> Optional[str]:
    """None when Ray's dashboard can start here, else the import that fails. (Ray decides
    the same way, by importing the module that lists the dashboard's packages.)"""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def connect(address: Optional[str], cpus: int, dashboard_port: Optional[int] = None) -> bool:
    """Join the cluster at address / $RAY_ADDRESS, else start a local Ray with at least
    `cpus` logical CPUs (the workers' train.threads each). Returns is_local.

    A local Ray includes the dashboard, on 127.0.0.1 only, when its packages (ray[default])
    are installed and RAYPAR_DASHBOARD is not 0: its web UI, and the state API behind
    `ray list actors` (Ray 2.60 runs its modules as 8 more processes, about 0.7 GB).
    dashboard_port: its port; by default Ray's 8265, or the next free one of the 50 after
    it. `local_ray_note()` then says how to reach it from another shell."""
    global _local
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    # Ray's own start-up chatter (token auth notice, Ray Data plans) is not for our users;
    # errors still surface, and worker failures come back as exceptions from fit().
    common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if address:
        try:
            ray.init(address=address, include_dashboard=False, **common)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--address: cannot connect to Ray at {address}: {e}") from None
        return False
    # A laptop gets a logical CPU per worker thread even with fewer cores: the workers
    # time-share the cores, which is slower but exact.
    # address="local": always a fresh instance, never a `ray start` cluster that happens to
    # run on this machine (that one is reached with --address / RAY_ADDRESS).
    wanted = os.environ.get("RAYPAR_DASHBOARD", "1")
    if wanted not in ("0", "1"):
        raise ConfigError(f"RAYPAR_DASHBOARD: {wanted!r} is not 0 (no dashboard for a local "
                          f"Ray) or 1 (the dashboard when ray[default] is installed)")
    check_home_writable()
    missing = dashboard_missing() if wanted == "1" else None
    dashboard = dict(include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=dashboard_port) if wanted == "1" and missing is None \
        else dict(include_dashboard=False)
    try:
        ctx = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus),
                       **dashboard, **common)
    except OSError as e:  # a file Ray writes while starting (its session folder, a token)
        where = f"cannot write {e.filename}" if e.filename else "cannot start"
        raise ConfigError(f"local Ray: {where} ({e.strerror or e}); make HOME and the "
                          f"temporary directory (RAY_TMPDIR) writable") from None
    _local = {"gcs": ctx.address_info["gcs_address"], "dashboard": ctx.dashboard_url or None,
              "missing": missing,
              # ray.init turned token authentication on unless RAY_AUTH_MODE said otherwise
              "token": os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"}
    return True


def local_ray_note() -> Optional[str]:
    """For the local Ray that connect() started (None when it joined a cluster): where its
    dashboard is, and what `ray status` / `ray list actors` need in another shell of the
    same user: its address (ray.init writes no /tmp/ray/ray_current_cluster, which belongs
    to `ray start`), and, with token authentication on (Ray's default for a local Ray),
    RAY_AUTH_MODE=token so that the CLI sends the token from ~/.ray/auth_token.
    Without the dashboard's packages: how to get them."""
    if _local is None or not ray.is_initialized():
        return None
    env = f"RAY_ADDRESS={_local['gcs']}" + (" RAY_AUTH_MODE=token" if _local["token"] else "")
    if _local["dashboard"]:
        return (f"Ray dashboard at http://{_local['dashboard']}; from another shell: "
                f"{env} ray status (or ray list actors)")
    if _local["missing"] is None:  # turned off
        return f"Ray dashboard off (RAYPAR_DASHBOARD=0); from another shell: {env} ray status"
    return (f"Ray dashboard not started: its packages are missing ({_local['missing']}); "
            f"pip install 'ray[default]' for it and `ray list actors`. From another shell: "
            f"{env} ray status")


def check_home_writable() -> None:
    """Refuse, before Ray starts, a HOME where a new local Ray cannot save its token.

    ray.init() of a local cluster turns token authentication on and, when no token is
    configured, writes a new one to ~/.ray/auth_token: with HOME unwritable that write
    fails as a traceback from inside ray.init().
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # Ray reads the token from there and writes nothing under HOME
    folder = os.path.join(os.path.expanduser("~"), ".ray")
    token = os.path.join(folder, "auth_token")
    if os.path.isfile(token) and os.path.getsize(token) > 0:
        return
    probe = os.path.join(folder, f".raypar-probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)  # what Ray is about to do anyway
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"HOME: cannot write {token} ({e.strerror or type(e).__name__}), where a local "
            f"Ray keeps its authentication token; set HOME to a writable directory, or "
            f"RAY_AUTH_TOKEN_PATH to a file holding a token") from None


def check_capacity(spec: RunSpec, is_local: bool, vocab_size: int, use_gpu: bool) -> None:
    """Refuse a layout the cluster can never hold, instead of waiting for it forever. A
    worker takes one GPU (GPU clusters) and train.threads CPUs (scaling_config)."""
    per = worker_resources(spec, use_gpu)
    have = ray.cluster_resources()
    fit = min(int(have.get(r, 0)) // n for r, n in per.items())
    short = next((r for r, n in per.items() if int(have.get(r, 0)) // n == fit), "CPU")

    def need(workers: int) -> str:
        n = workers * per[short]
        threads = f" ({per[short]} per worker: train.threads)" if per[short] > 1 else ""
        return f"{n} {short}s{threads} but the cluster has {int(have.get(short, 0))}"

    waits = not is_local and spec.parallel.autoscale
    if spec.parallel.elastic.enabled:
        least = spec.min_dp * spec.replica_size
        if fit < least and not waits:
            raise ConfigError(
                f"parallel.elastic.min_replicas: {spec.min_dp} replicas of pp*tp = "
                f"{spec.replica_size} workers need {need(least)}; lower it, add nodes, or "
                f"set parallel.autoscale=true on an autoscaling cluster")
        if fit < spec.world_size:
            log.info("elastic: the cluster holds %d of the %d workers of %d replicas now; "
                     "training starts with dp=%d and grows as nodes join", fit,
                     spec.world_size, spec.max_dp, max(choose_dp(spec, fit), spec.min_dp))
    elif fit < spec.world_size and not waits:
        raise ConfigError(
            f"parallel: dp*pp*tp = {spec.world_size} workers need {need(spec.world_size)}; "
            f"add nodes, or set parallel.autoscale=true on an autoscaling cluster")
    if is_local:
        check_local_memory(spec, vocab_size)


def check_local_memory(spec: RunSpec, vocab_size: int) -> None:
    """Refuse a layout whose workers together would not fit this machine's free memory."""
    total = layout_memory_bytes(spec, vocab_size)
    free = available_memory_bytes()
    if total > 0.9 * free:
        raise ConfigError(
            f"parallel: {spec.world_size} workers need about {total / 2**30:.1f} GiB "
            f"but this machine has {free / 2**30:.1f} GiB available; lower parallel.dp "
            f"or the model size")


def worker_resources(spec: RunSpec, use_gpu: bool) -> dict[str, int]:
    """What Ray reserves for one worker: the CPUs its torch threads use (train.threads), so
    Ray never places more threads on a node than it has CPUs, and one GPU on a GPU cluster."""
    return {"CPU": spec.train.threads, **({"GPU": 1} if use_gpu else {})}


def scaling_config(spec: RunSpec, use_gpu: bool) -> ScalingConfig:
    """Ray Train's ScalingConfig: dp*pp*tp workers, or for an elastic run a range of whole
    replicas. Ray Train starts as many workers in the range as the cluster holds, restarts
    the group with fewer when a node is lost, and with more when it checks (every
    resize_interval_s) and finds room; every worker group resolves its dp from its size."""
    e = spec.parallel.elastic
    resources = worker_resources(spec, use_gpu)
    if not e.enabled:
        return ScalingConfig(num_workers=spec.world_size, use_gpu=use_gpu,
                             resources_per_worker=resources)
    r = spec.replica_size
    return ScalingConfig(num_workers=(e.min_replicas * r, e.max_replicas * r), use_gpu=use_gpu,
                         resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=e.resize_interval_s)
