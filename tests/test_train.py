"""Training on a real local Ray: end to end, data-parallel parity, capacity checks."""
import json
import math
import time

import pytest
from mlflow.tracking import MlflowClient

from raypar.config import ConfigError, load_spec
from raypar.train.driver import run
from raypar.train.rundir import read_metrics

from conftest import ROOT

pytestmark = pytest.mark.ray  # every test here trains through Ray

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def tiny(corpus, cache, *overrides):
    return load_spec(TINY, [f"data.path={corpus}", f"data.cache_dir={cache}", *overrides])


def rows_of(run_dir):
    return read_metrics(run_dir)[0]  # the step rows (events aside)


def test_end_to_end_tiny(ray_local, small_corpus, cache_dir, tmp_path, capsys):
    spec = tiny(small_corpus, cache_dir, "parallel.dp=2", "train.steps=30",
                "train.eval_every=10")
    run_dir = tmp_path / "run"
    summary = run(spec, run_dir, progress=False, started=time.time())

    # Every phase before the first step is shown as it ends, in order, with its seconds,
    # even without a progress bar; the profile is in summary.json, run.log and MLflow.
    shown = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("raypar: ")]
    phases = [line.split(":")[1].strip() for line in shown if line.endswith(" s)")]
    assert phases == ["imports", "checks", "ray", "tokenizer", "dataset", "placement",
                      "workers", "model", "first step"], shown
    assert "workers: 2 on 1 node(s)" in shown[6] and shown[4].startswith("raypar: dataset: ")
    assert shown[-1].startswith("raypar: first step after ")
    profile = summary["startup"]
    assert set(profile) == set(phases) | {"total"}
    assert all(v >= 0 for v in profile.values()) and profile["workers"] > 0
    assert sum(profile[p] for p in phases) == pytest.approx(profile["total"], abs=0.01)
    assert json.loads((run_dir / "summary.json").read_text())["startup"] == profile
    assert "start-up: ray: " in (run_dir / "run.log").read_text()

    rows = rows_of(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.3          # it learns
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5]) - 1.0

    assert summary["steps"] == 30 and summary["final_val_loss"] == val[-1]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert load_spec(run_dir / "config.yaml") == spec
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "tokenizer.json").exists()
    assert list((run_dir / "checkpoints").glob("step_00000030/meta.json"))

    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    assert summary["mlflow_uri"].startswith("sqlite:") and str(run_dir) in summary["mlflow_uri"]
    mrun = client.get_run(summary["mlflow_run_id"])
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["train.global_batch"] == str(spec.train.global_batch)
    assert mrun.data.params["parallel.dp"] == "2"
    history = client.get_metric_history(mrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [r["loss"] for r in rows]
    assert len(client.get_metric_history(mrun.info.run_id, "val_loss")) == 3
    assert mrun.data.metrics["startup_total_s"] == profile["total"]
    assert mrun.data.metrics["startup_first_step_s"] == profile["first step"]
    # Each checkpoint save is timed: an event row, and MLflow metrics at its step.
    saves = [e for e in read_metrics(run_dir)[1] if e["event"] == "checkpoint"]
    assert saves and saves[-1]["step"] == 30 and all(e["save_s"] > 0 for e in saves)
    assert sorted(m.step for m in client.get_metric_history(
        mrun.info.run_id, "checkpoint_save_s")) == [e["step"] for e in saves]
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"config.yaml", "loss.png"} <= artifacts
    runs = client.search_runs([mrun.info.experiment_id])
    assert len(runs) == 1                                     # exactly one MLflow run
    # Each rank's peak resident memory once built, after its first step and at the end of
    # the run: in ranks.json and in MLflow.
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert 0 < r["rss_init_bytes"] <= r["rss_peak_bytes"] <= r["rss_end_bytes"], r
        assert mrun.data.metrics[f"memory.rank{r['rank']}.rss_end_bytes"] == r["rss_end_bytes"]


def test_more_workers_than_the_cluster_holds_fails_fast(ray_local, small_corpus, cache_dir,
                                                        tmp_path):
    spec = tiny(small_corpus, cache_dir, "parallel.dp=16", "train.global_batch=32")
    with pytest.raises(ConfigError, match=r"^parallel: dp\*pp\*tp = 16 workers need 16 CPUs "
                                          r"but the cluster has 8"):
        run(spec, tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()
    # Each worker reserves its torch threads: 4 workers of 3 threads do not fit 8 CPUs.
    spec = tiny(small_corpus, cache_dir, "parallel.dp=4", "train.threads=3")
    with pytest.raises(ConfigError, match=r"^parallel: dp\*pp\*tp = 4 workers need 12 CPUs "
                                          r"\(3 per worker: train.threads\) but the cluster has 8"):
        run(spec, tmp_path / "threads", progress=False)

