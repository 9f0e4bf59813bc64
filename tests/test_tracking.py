"""MLflow tracking without Ray: where a run's artifacts go, which fields are metrics, and an
export logged as the run's model."""
import shutil
import sys
import time
from pathlib import Path

import pytest

from raypar.config import load_spec
from raypar.data.tokenizer import Tokenizer
from raypar.hf_export import write_hf
from raypar.model import GPT, GPTConfig
from raypar.train.tracking import Tracker, log_export


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


@pytest.mark.parametrize("flavor", ["transformers", "directory"])
def test_an_export_is_the_runs_model_and_registers(flavor, tmp_path, monkeypatch):
    """`raypar export`'s directory logged into a stopped run (KILLED stays KILLED): the
    run's model "model" registers from runs:/<id>/model in a SQLite registry, and what
    the registry gives back is the exported model (the same logits through transformers;
    without transformers installed, the very files under model/)."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, seq_len=32, n_layer=2, n_head=4, d_model=32)).eval()
    export_dir = write_hf(model, Tokenizer.byte_level(), run_dir / "export")
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(load_spec(None, []), run_dir)
    tracker.finish("KILLED")
    if flavor == "directory":
        monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    got = log_export(run_dir, export_dir, 5, "run/checkpoints/step_5")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    [logged] = client.search_logged_models([run.info.experiment_id])
    assert got == f"models:/{logged.model_id}" and logged.source_run_id == tracker.run_id
    assert logged.name == "model" and logged.tags["raypar.checkpoint"] == "run/checkpoints/step_5"
    assert logged.artifact_location.startswith(run.info.artifact_uri.rsplit("/", 2)[0])
    assert not (tmp_path / "mlruns").exists()
    version = mlflow.register_model(f"runs:/{tracker.run_id}/model", "tiny")
    assert str(version.version) == "1" and version.run_id == tracker.run_id
    ids = torch.tensor([[5, 70, 100, 3]])
    with torch.no_grad():
        want = model(ids)[..., :Tokenizer.byte_level().vocab_size]
    if flavor == "transformers":
        import mlflow.transformers
        pipe = mlflow.transformers.load_model("models:/tiny/1")
        with torch.no_grad():
            torch.testing.assert_close(pipe.model(ids).logits, want, atol=1e-5, rtol=0)
        return
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny/1",
                                                     dst_path=str(tmp_path / "dl")))
    assert sorted(p.name for p in (local / "model").iterdir()) == \
        sorted(p.name for p in export_dir.iterdir())
    for p in export_dir.iterdir():
        assert (local / "model" / p.name).read_bytes() == p.read_bytes(), p.name
    assert "raypar_hf" in (local / "MLmodel").read_text()
    monkeypatch.delitem(sys.modules, "transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(local / "model")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-5, rtol=0)
