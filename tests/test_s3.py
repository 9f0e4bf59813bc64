"""Object storage for real: a dataset prepared into an S3 bucket and checkpoints written to
one, served by moto's S3 server on 127.0.0.1 (started and stopped here), in a mixture with
a local corpus (data.sources). pyarrow, which
raypar and Ray Train read storage through, finds it by AWS_ENDPOINT_URL; the module's own
Ray starts after that is set, so every worker sees the same endpoint.

    python -m pytest -q tests/test_s3.py
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raypar import cli
from raypar.config import load_spec
from raypar.train.driver import run
from raypar.train.rundir import read_metrics

from conftest import ROOT, free_port, mixture_rows

pytestmark = pytest.mark.ray

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
BUCKET = "raypar-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_ray():
    """A local S3 server with an empty bucket, and a local Ray whose workers reach it."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import ray
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
        yield boto3.client("s3")
    finally:
        ray.shutdown()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_a_mixture_from_s3_and_a_local_corpus_resumes_at_another_layout(
        s3_ray, small_corpus, tmp_path, capsys, monkeypatch):
    """`raypar prepare` writes one dataset into the bucket. A dp=2 run mixes it 3:1 with a
    local corpus (prepared by the run), reads the bucket's shards through
    data.cache_dir/shards, checkpoints into the bucket, dies at step 7, and is resumed at
    tp=2: every step's loss, grad_norm and val_loss equal one process reading both corpora
    from local directories, and each source's tokens seen are in metrics.jsonl and MLflow."""
    from mlflow.tracking import MlflowClient

    from test_prepare import write_jsonl
    ds_uri, ckpt_uri = f"s3://{BUCKET}/datasets/py", f"s3://{BUCKET}/checkpoints"
    cache = tmp_path / "cache"
    assert cli.main(["prepare", "--config", str(TINY), "--set", f"data.path={small_corpus}",
                     "--set", f"data.dataset_dir={ds_uri}",
                     "--set", f"data.cache_dir={cache}"]) == 0
    assert capsys.readouterr().out.startswith(f"prepared {ds_uri}: 40 documents")
    stored = keys(s3_ray, "datasets/py/")
    manifest = json.loads(s3_ray.get_object(Bucket=BUCKET, Key="datasets/py/manifest.json")
                          ["Body"].read())
    names = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert names and {f"datasets/py/{n}" for n in names} <= set(stored)

    chat = write_jsonl(tmp_path / "chat.jsonl", n=200, seed=3)

    def mix(py: str) -> str:
        return (f"data.sources=[{{path: {py}, weight: 3, name: py}}, "
                f"{{path: {chat}, weight: 1, name: chat}}]")

    common = [f"data.cache_dir={cache}", "train.steps=10", "checkpoint.every=3",
              "train.eval_every=5", "train.dtype=fp32", "checkpoint.max_failures=0"]
    run_dir = tmp_path / "run"
    on_s3 = [mix(ds_uri), f"checkpoint.storage_path={ckpt_uri}", *common]
    monkeypatch.setenv("RAYPAR_FAULT", "rank=1,step=7")
    with pytest.raises(RuntimeError, match="^training failed"):
        run(load_spec(TINY, [*on_s3, "parallel.dp=2"]), run_dir, progress=False)
    monkeypatch.delenv("RAYPAR_FAULT")
    assert any(k.endswith(".distcp") and "step_00000006" in k
               for k in keys(s3_ray, "checkpoints/"))
    # The bucket's shards were fetched into the node-local cache, not read via the driver.
    assert list((cache / "shards").rglob("*.tok"))
    summary = run(load_spec(TINY, [*on_s3, "parallel.dp=1", "parallel.tp=2"]), run_dir,
                  progress=False, resume=True)
    assert summary["steps"] == 10
    rows, events = read_metrics(run_dir)
    [event] = [e for e in events if e["event"] == "recovery"]
    assert event["cause"] == "resume" and event["step"] == 6
    assert any("step_00000010" in k for k in keys(s3_ray, "checkpoints/"))

    local = load_spec(TINY, [mix(str(small_corpus)), *common, "parallel.dp=1"])
    want = mixture_rows(local, tmp_path / "local-cache", tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [w[key] for w in want], rtol=1e-5)
    assert [r.get("val_loss") is None for r in rows] == [w.val_loss is None for w in want]
    np.testing.assert_allclose([r["val_loss"] for r in rows if "val_loss" in r],
                               [w.val_loss for w in want if w.val_loss is not None], rtol=1e-5)
    for r, w in zip(rows, want):
        assert r["source_tokens"] == w.source_tokens
        assert sum(r["source_tokens"].values()) == r["tokens"]
    assert rows[-1]["source_tokens"]["py"] > rows[-1]["source_tokens"]["chat"] > 0
    client = MlflowClient(tracking_uri=summary["mlflow_uri"])
    for name in ("py", "chat"):
        history = client.get_metric_history(summary["mlflow_run_id"], f"tokens_{name}")
        assert sorted(m.step for m in history) == list(range(1, 11))
        assert max(history, key=lambda m: m.step).value == rows[-1]["source_tokens"][name]
