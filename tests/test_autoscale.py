"""The Ray autoscaler adds nodes for a run: a head started with `ray start --head
--autoscaling-config` and Ray's fake multi-node provider (RAY_FAKE_CLUSTER=1), whose
"instances" are raylets started on this machine. It is what `ray.cluster_utils.
AutoscalingCluster` sets up; that helper reads a base config its wheel does not ship and
stops every Ray on the machine, so the head is started here directly.

The head holds one worker. An elastic run of 1..3 replicas starts on it at dp=1 and asks
Ray Train for 3 workers, which passes the request on to the autoscaler. The autoscaler may
launch nodes only once the test raises the worker type's max_workers in its config file
(the autoscaler re-reads the file on every update): the fake provider starts nodes within
seconds, sooner than Ray Train first sizes a group, so without this hold the first group
would already have all three. Then two 1-CPU nodes come up, the run grows to dp=3 and
completes there.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import ray

from raypar.config import load_spec
from raypar.train.rundir import read_metrics

from conftest import (ROOT, force_reservation_refresh, free_port, layouts, start_run,
                      stop_cluster, wait_for)

pytestmark = pytest.mark.ray  # every test here trains through Ray

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
# The run must still be at dp=1 when the autoscaler's nodes come and Ray Train resizes
# the group: 60 steps of at least 0.3 s give that 18 s or more (measured on a loaded
# machine: the resize came 6 steps after the nodes were allowed); every step after the
# resize (at dp=3, to the end) is only the run finishing.
STEPS = 60


def fake_cluster_config(gcs: str, max_workers: int) -> dict:
    """An autoscaler config for the fake multi-node provider: a 1-CPU head and up to
    max_workers 1-CPU nodes."""
    return {
        "cluster_name": "raypar-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": max_workers}},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": []}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: raylet socket paths
    port = free_port()
    config = os.path.join(tmp, "autoscaler.json")
    gcs = f"127.0.0.1:{port}"
    with open(config, "w") as f:
        json.dump(fake_cluster_config(gcs, max_workers=0), f)  # no nodes yet
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    env.pop("RAY_ADDRESS", None)
    saved = os.environ.get("RAY_AUTH_MODE")
    try:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                        f"--port={port}", "--num-cpus=1", f"--autoscaling-config={config}",
                        f"--temp-dir={tmp}", "--include-dashboard=false",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True,
                       timeout=120)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, configure_logging=True,
                 logging_level="WARNING")

        def allow_nodes(n):
            with open(config + ".tmp", "w") as f:
                json.dump(fake_cluster_config(gcs, max_workers=n), f)
            os.replace(config + ".tmp", config)

        yield allow_nodes
    finally:
        ray.shutdown()
        stop_cluster([tmp])
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def test_autoscaler_adds_the_nodes_a_run_needs(autoscaling_cluster, small_corpus,
                                               cache_dir, tmp_path, monkeypatch):
    assert ray.cluster_resources().get("CPU") == 1
    # Slow steps (raypar's testing hook): the run must outlast two node starts and a resize.
    monkeypatch.setenv("RAYPAR_STEP_DELAY_S", "0.3")
    spec = load_spec(TINY, [
        f"data.path={small_corpus}", f"data.cache_dir={cache_dir}", "parallel.pp=1",
        # More workers than the cluster holds now: wait for the autoscaler, don't refuse.
        "parallel.autoscale=true",
        "parallel.elastic={min_replicas: 1, max_replicas: 3, resize_interval_s: 2}",
        "train.global_batch=12", f"train.steps={STEPS}", "checkpoint.every=10",
        "tracking.enabled=false", "train.log_blocks=true"])
    run_dir = tmp_path / "run"
    thread, outcome = start_run(spec, run_dir)  # nodes change from this (main) thread
    # The run starts on what the cluster has: the head's one worker.
    wait_for(run_dir, lambda r, e: len(r) >= 3, "step 3", thread)
    assert ray.cluster_resources().get("CPU") == 1
    autoscaling_cluster(2)  # now the autoscaler may launch the nodes the run asks for
    deadline = time.time() + 120
    while ray.cluster_resources().get("CPU", 0) < 3:
        assert time.time() < deadline, "the autoscaler added no nodes within 120 s"
        assert thread.is_alive(), "the run ended before the autoscaler added nodes"
        time.sleep(0.5)
    force_reservation_refresh()
    wait_for(run_dir, lambda r, e: layouts(e)[-1:] == [3], "the group grown to dp=3", thread)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")

    rows, events = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step exactly once"
    assert [e["dp"] for e in outcome["summary"]["layouts"]] == [1, 3]
    dps = [r["dp"] for r in rows]
    assert dps[0] == 1 and dps[-1] == 3 and dps == sorted(dps), dps
    assert [e["cause"] for e in events if e["event"] == "recovery"] == ["resize"]
    assert len(outcome["summary"]["ranks"]) == 3  # the last group placed three workers
