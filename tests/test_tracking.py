"""MLflow tracking without Ray: where a run's artifacts go, and which fields are metrics."""
import shutil
import time
from pathlib import Path

from raypar.config import load_spec
from raypar.train.tracking import Tracker


def test_runs_sharing_a_store_keep_their_artifacts_apart(tmp_path, monkeypatch):
    """Two runs on one SQLite store (the README's cluster example sets
    MLFLOW_TRACKING_URI): deleting the first run's directory leaves the second run's
    artifacts whole, nothing lands in the working directory, and every numeric per-step
    field of metrics.jsonl is a metric."""
    import mlflow
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root would be ./mlruns here
    store = tmp_path / "shared" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    spec = load_spec(None, [])
    runs = {}
    for name in ("first", "second"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(f"name: {name}\n")
        tracker = Tracker(spec, run_dir)
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_rows([{"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "dp": 2,
                           "tokens": 64, "tokens_per_s": 100.0, "data_s": 0.25,
                           "source_tokens": {"web": 48}}])
        time.sleep(0.6)  # a few samples of the system metrics
        tracker.finish("FINISHED")
        runs[name] = tracker.run_id
    shutil.rmtree(tmp_path / "first")
    got = mlflow.artifacts.download_artifacts(run_id=runs["second"], artifact_path="config.yaml",
                                              tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert Path(got).read_text() == "name: second\n"
    assert not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(runs["second"]).info.artifact_uri.startswith(
        (tmp_path / "shared" / "mlartifacts").resolve().as_uri())
    metrics = client.get_run(runs["second"]).data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert {k: v for k, v in metrics.items() if k not in system} == {
        "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "dp": 2, "tokens": 64,
        "tokens_per_s": 100.0, "data_s": 0.25, "tokens_web": 48}
