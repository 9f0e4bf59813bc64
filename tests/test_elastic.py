"""Elastic training on a real multi-node Ray: `ray.cluster_utils.Cluster` starts one raylet
per node on this machine, and nodes are drained, removed and added while a run trains.

The run must go on through all of it and train exactly what a fixed-size run of the same
global batch trains: the same blocks in the same order, and the same losses (rtol 1e-5:
another dp sums the same gradients in another order). The reference is one process, no
Ray, the same code (raypar.train.trainer.RankTrainer) stepping alone.
"""
import os
import time

import pytest
import ray

from raypar.config import ConfigError, load_spec
from raypar.train import checkpoint as ckpt
from raypar.train.driver import run
from raypar.train.rundir import read_metrics

from conftest import (ROOT, force_reservation_refresh, layouts, single_process_rows, start_run,
                      wait_for)

pytestmark = pytest.mark.ray  # every test here trains through Ray

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
# 60 steps: the node changes take the first 20 or so (measured on a loaded machine: the
# group shrank at step 14 and grew back from the save of step 20); 40 more are margin.
STEPS, EVERY = 60, 20
# Seconds each step sleeps (raypar's RAYPAR_STEP_DELAY_S testing hook): the tiny model steps
# in 50 ms, and node changes take tens of seconds; slow steps let a short run outlast them
# (a long run would let fp32 rounding differences between layouts grow past rtol 1e-5).
STEP_DELAY_S = "0.3"

# Read by Ray Train's controller and preemption watcher, which the raylets started here
# spawn with this environment: the watcher on (conftest turns it off for the other
# modules), noticing a drain within a second (default 5 s), and give up on a worker group
# that cannot be placed after 20 s (default 60 s).
RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    # The head runs the driver's actors only (no CPUs): training goes to the worker nodes.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.nodes_by_name = {"a": c.add_node(num_cpus=2), "b": c.add_node(num_cpus=1)}
    ray.init(address=c.address, log_to_driver=False, configure_logging=True,
             logging_level="WARNING")
    yield c
    ray.shutdown()
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def elastic_spec(corpus, cache, *overrides):
    return load_spec(TINY, [
        f"data.path={corpus}", f"data.cache_dir={cache}", "parallel.pp=1",
        "parallel.elastic={min_replicas: 1, max_replicas: 3, resize_interval_s: 2}",
        # 12 sequences split over 1, 2 and 3 replicas of micro-batches of 2.
        "train.global_batch=12", f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
        "checkpoint.keep=20", "checkpoint.max_failures=5", "train.eval_every=40",
        "train.lr=0.001", "train.min_lr=0.0001",
        "train.log_blocks=true", *overrides])


def test_node_preempted_lost_and_regained(cluster, small_corpus, cache_dir, tmp_path,
                                         monkeypatch):
    from ray.core.generated import autoscaler_pb2
    monkeypatch.setenv("RAYPAR_STEP_DELAY_S", STEP_DELAY_S)
    spec = elastic_spec(small_corpus, cache_dir)
    run_dir = tmp_path / "run"
    thread, outcome = start_run(spec, run_dir)  # nodes change from this (main) thread
    wait_for(run_dir, lambda r, e: r and r[-1]["step"] >= 5, "step 5", thread)

    # A spot reclaim notice for node b (one worker), 3 s ahead, as the autoscaler sends it.
    b = cluster.nodes_by_name["b"]
    gcs = ray._raylet.GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(
        b.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot instance reclaimed", int(time.time() * 1000) + 3000)
    assert accepted, why
    # Ray Train passes the notice on; raypar saves a checkpoint at once, off its schedule.
    store = run_dir / "checkpoints"
    deadline = time.time() + 60
    # Complete (every rank's manifest written): the ranks write their shards straight into
    # the folder, which therefore exists before the save is done.
    while not any(ckpt.step_of(p) and ckpt.step_of(p) % EVERY and ckpt.verify(p, hashes=False)
                  is None for p in store.iterdir()):
        assert time.time() < deadline, "no checkpoint after the preemption notice"
        time.sleep(0.1)
    cluster.remove_node(b)  # the node goes
    force_reservation_refresh()
    wait_for(run_dir, lambda r, e: layouts(e)[-1:] == [2], "the group shrunk to dp=2", thread)

    cluster.nodes_by_name["c"] = cluster.add_node(num_cpus=1)  # a new node joins
    force_reservation_refresh()
    wait_for(run_dir, lambda r, e: layouts(e) == [3, 2, 3], "the group grown back to dp=3",
             thread)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")

    rows, events = read_metrics(run_dir)
    reference = single_process_rows(spec, cache_dir, tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step exactly once"
    # No block repeated or skipped: the same global batches, in the same order.
    assert [r["blocks"] for r in rows] == [r["blocks"] for r in reference]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference],
                                                       rel=1e-5), key
    assert [r["val_loss"] for r in rows if "val_loss" in r] == \
        pytest.approx([r["val_loss"] for r in reference if "val_loss" in r], rel=1e-5)
    # Each step records the dp it trained with: 3, then 2, then 3 again.
    dps = [r["dp"] for r in rows]
    assert dps[0] == 3 and 2 in dps and dps[-1] == 3
    recoveries = [e for e in events if e["event"] == "recovery"]
    assert [e["cause"] for e in recoveries] == ["failure", "resize"], recoveries
    assert all(e["checkpoint"] and e["mismatched_steps"] == [] for e in recoveries)
    summary = outcome["summary"]
    assert [e["dp"] for e in summary["layouts"]] == [3, 2, 3]


def test_min_replicas_the_cluster_cannot_hold_fails_fast(cluster, small_corpus, cache_dir,
                                                         tmp_path):
    # 3 CPUs, no autoscaler: 4 replicas of one worker can never start.
    spec = elastic_spec(small_corpus, cache_dir, "train.global_batch=24",
                        "parallel.elastic={min_replicas: 4, max_replicas: 6}")
    with pytest.raises(ConfigError, match=r"^parallel.elastic.min_replicas: 4 replicas of "
                                          r"pp\*tp = 1 workers need 4 CPUs but the cluster "
                                          r"has \d"):
        run(spec, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
