"""The Ray autoscaler adds nodes for a run: a head started with `ray start --head
--autoscaling-config` and Ray's fake multi-node provider (RAY_FAKE_CLUSTER=1), whose
"instances" are raylets started on this machine. It is what `ray.cluster_utils.
AutoscalingCluster` sets up; that helper reads a base config its wheel does not ship and
stops every Ray on the machine, so the head is started here directly.

The head holds one worker. An elastic run of up to 3 replicas asks Ray Train for 3 workers;
Ray Train passes the request to the autoscaler, which launches two 1-CPU nodes, and the run
trains on all three and completes. (Ray Train sizes a group from reservations that Ray
Data's coordinator refreshes every 20 s, and the fake provider launches its nodes within
seconds, so here the first group already has all three; growing into a node that joins a
running group is tested in test_elastic.py.)
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import ray

from raypar.config import load_spec
from raypar.train.trainer import read_metrics, run

from conftest import ROOT, free_port, stop_cluster

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def fake_cluster_config(gcs: str) -> dict:
    """An autoscaler config for the fake multi-node provider: a head and up to 2 1-CPU nodes."""
    return {
        "cluster_name": "raypar-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": 2}},
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
    with open(config, "w") as f:
        json.dump(fake_cluster_config(f"127.0.0.1:{port}"), f)
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
        yield
    finally:
        ray.shutdown()
        stop_cluster([tmp])
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def test_autoscaler_adds_the_nodes_a_run_needs(autoscaling_cluster, small_corpus,
                                               cache_dir, tmp_path):
    assert ray.cluster_resources().get("CPU") == 1
    spec = load_spec(TINY, [
        f"data.path={small_corpus}", f"data.cache_dir={cache_dir}", "parallel.pp=1",
        # More workers than the cluster holds now: wait for the autoscaler, don't refuse.
        "parallel.autoscale=true",
        "parallel.elastic={min_replicas: 1, max_replicas: 3, resize_interval_s: 2}",
        "train.global_batch=12", "train.steps=20", "checkpoint.every=10",
        "tracking.enabled=false", "train.log_blocks=true"])
    run_dir = tmp_path / "run"
    summary = run(spec, run_dir, progress=False)
    rows, _ = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert ray.cluster_resources().get("CPU") == 3  # the autoscaler added two nodes
    # Depending on when the nodes come up, the first group has one worker (and the run
    # grows) or all three; it ends with all three, and never shrinks.
    dps = [e["dp"] for e in summary["layouts"]]
    assert dps[-1] == 3 and dps == sorted(dps), dps
    assert [r["dp"] for r in rows] == sorted(r["dp"] for r in rows)
    assert len(summary["ranks"]) == 3
