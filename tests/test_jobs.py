"""`ray job submit` against a real cluster on this machine: a head started with `ray start
--head` (its job server on 127.0.0.1) and a worker raylet joined with `ray start --address`,
each a node with its own temporary directory, as separate machines would have.

A job is submitted with the repository as its working directory and a runtime environment
(MLFLOW_TRACKING_URI and other variables), stopped with `ray job stop` after its first
checkpoint, and continued by a second job with `--resume`: the run ends SUCCEEDED with every
step recorded once, in one MLflow run in the store the environment named.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
from mlflow.tracking import MlflowClient

from raypar.train import checkpoint as ckpt
from raypar.train.rundir import read_metrics

from conftest import ROOT, free_port, stop_cluster

pytestmark = pytest.mark.ray  # every test here trains through Ray

# Token authentication off: `ray start --head` turns it on by itself when ~/.ray/auth_token
# exists (any earlier local ray.init() writes one) and the worker would then need the token.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
ENV.pop("RAY_ADDRESS", None)
STEPS, EVERY = 40, 5


def ray_cli(*args, timeout=120, check=True):
    proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def cluster():
    """(job server URL, temp dirs): a head with no CPUs for tasks and a 3-CPU worker."""
    dirs = [tempfile.mkdtemp(prefix="rp", dir="/tmp") for _ in range(2)]  # short socket paths
    gcs, dashboard = free_port(), free_port()
    try:
        # Every port of our own choosing: a Ray of an earlier test may still hold the
        # defaults (the job agent's 52365) for a few seconds after it was stopped.
        ray_cli("start", "--head", f"--port={gcs}", "--num-cpus=0", f"--temp-dir={dirs[0]}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
                "--disable-usage-stats")
        ray_cli("start", f"--address=127.0.0.1:{gcs}", "--num-cpus=3", f"--temp-dir={dirs[1]}",
                f"--dashboard-agent-listen-port={free_port()}")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cluster(dirs)


def submit(address, runtime_env, *args):
    """`ray job submit --no-wait --working-dir .` of jobs/train.py; returns the job id."""
    deadline = time.time() + 90
    while True:
        proc = ray_cli("job", "submit", "--address", address, "--no-wait", "--working-dir", ".",
                       "--runtime-env-json", json.dumps(runtime_env), "--",
                       "python", *args, check=False)
        # A head that has just started may not have its job agent up yet.
        if proc.returncode == 0 or "No available agent" not in proc.stderr \
                or time.time() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [job_id] = [w for w in proc.stdout.split() + proc.stderr.split()
                if w.strip("'").startswith("raysubmit_")][:1]
    return job_id.strip("'")


def status(client, job_id):
    return str(client.get_job_status(job_id)).split(".")[-1]


def wait_status(client, job_id, wanted, timeout=400):
    deadline = time.time() + timeout
    while (s := status(client, job_id)) not in wanted:
        assert s not in ("FAILED", "STOPPED", "SUCCEEDED"), (s, client.get_job_logs(job_id))
        assert time.time() < deadline, f"job {job_id} still {s} after {timeout} s"
        time.sleep(0.25)
    return s


def test_submit_stop_and_resume(cluster, small_corpus, cache_dir, tmp_path):
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(cluster)
    run_dir = tmp_path / "run"  # outside the job's working directory, which is a temp copy
    store = tmp_path / "mlflow.db"
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "OMP_NUM_THREADS": "1",
                     # steps of 0.2 s: the stop lands well before the last step
                     "RAYPAR_STEP_DELAY_S": "0.2"}}
    train = ["jobs/train.py", "--config", "jobs/configs/tiny.yaml", "--run-dir", str(run_dir),
             "--no-progress", "--set", f"data.path={small_corpus}",
             "--set", f"data.cache_dir={cache_dir}", "--set", f"train.steps={STEPS}",
             "--set", f"checkpoint.every={EVERY}"]

    first = submit(cluster, runtime_env, *train)
    target = run_dir / "checkpoints" / ckpt.dir_name(EVERY)
    deadline = time.time() + 400
    while not (target.exists() and ckpt.verify(target) is None):
        assert status(client, first) in ("PENDING", "RUNNING"), client.get_job_logs(first)
        assert time.time() < deadline, "no first checkpoint within 400 s"
        time.sleep(0.5)
    ray_cli("job", "stop", "--address", cluster, first)
    assert wait_status(client, first, {"STOPPED"}) == "STOPPED"
    # Resubmitted at once: the stopped job's Ray Train actors go down within seconds of
    # its driver and may finish a step or two meanwhile; the resumed driver waits until the
    # run directory is quiet (raypar.train.rundir.wait_until_quiet).
    # Its steps need no slowing (nothing is stopped): the same environment, less the delay.
    plain = {"env_vars": {k: v for k, v in runtime_env["env_vars"].items()
                          if k != "RAYPAR_STEP_DELAY_S"}}
    second = submit(cluster, plain, "jobs/train.py", "--resume", str(run_dir),
                    "--no-progress")
    assert wait_status(client, second, {"SUCCEEDED"}) == "SUCCEEDED"
    rows, events = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    [resumed] = [e for e in events if e["event"] == "recovery"]
    assert resumed["cause"] == "resume" and EVERY <= resumed["step"] < STEPS
    assert ckpt.verify(run_dir / "checkpoints" / ckpt.dir_name(STEPS)) is None
    summary = json.loads((run_dir / "summary.json").read_text())
    # One MLflow run, in the store the job's environment named (not in the run directory).
    assert summary["mlflow_uri"] == f"sqlite:///{store}" and not (run_dir / "mlflow.db").exists()
    history = MlflowClient(f"sqlite:///{store}").get_metric_history(summary["mlflow_run_id"],
                                                                    "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))


def test_job_without_the_dependencies_fails_with_one_line(cluster):
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(cluster)
    # `python -S`: no site-packages, as on a node where the project was never installed.
    job = submit(cluster, {}, "-S", "jobs/train.py", "--config", "jobs/configs/tiny.yaml")
    assert wait_status(client, job, {"FAILED"}, timeout=120) == "FAILED"
    errors = [line for line in client.get_job_logs(job).splitlines()
              if line.startswith("raypar: error: ")]
    assert len(errors) == 1 and "cannot import" in errors[0], client.get_job_logs(job)
    assert "Traceback" not in client.get_job_logs(job)


def test_a_parameter_server_trains_from_a_submitted_job(cluster, small_corpus, cache_dir,
                                                       tmp_path):
    # The parameter server's shard actors belong to the job's driver (on the head, which
    # has no CPUs for tasks: they ask for none). The other modes run in the workers alone,
    # as every job does (test_submit_stop_and_resume).
    from ray.job_submission import JobSubmissionClient
    overrides = ["parallel.dp_mode=ps", "parallel.ps.shards=2", "parallel.ps.staleness=2"]
    client = JobSubmissionClient(cluster)
    run_dir, steps = tmp_path / "run", 8
    sets = [f"data.path={small_corpus}", f"data.cache_dir={cache_dir}", f"train.steps={steps}",
            "checkpoint.every=4", "tracking.enabled=false", "parallel.dp=2", *overrides]
    job = submit(cluster, {"env_vars": {"OMP_NUM_THREADS": "1"}}, "jobs/train.py", "--config",
                 "jobs/configs/tiny.yaml", "--run-dir", str(run_dir), "--no-progress",
                 *[a for s in sets for a in ("--set", s)])
    assert wait_status(client, job, {"SUCCEEDED"}) == "SUCCEEDED"
    rows, _ = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["dp"] == 2 and r["comm_bytes"] is not None for r in rows)
    assert [r["staleness"] for r in rows] == [0, 1, 2, 2, 2, 2, 2, 2]
    assert ckpt.verify(run_dir / "checkpoints" / ckpt.dir_name(steps)) is None
