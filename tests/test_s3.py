"""Object storage for real: a dataset prepared into an S3 bucket and checkpoints written to
one, served by moto's S3 server on 127.0.0.1 (started and stopped here), in a mixture with
a local corpus (data.sources). pyarrow, which
raypar and Ray Train read storage through, finds it by AWS_ENDPOINT_URL; the module's own
Ray starts after that is set, so every worker sees the same endpoint.

    python -m pytest -q tests/test_s3.py
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from raypar import cli
from raypar.bench.scale import local_s3
from raypar.config import load_spec
from raypar.train.driver import run
from raypar.train.rundir import read_metrics

from conftest import ROOT, mixture_rows

pytestmark = pytest.mark.ray

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
BUCKET = "raypar-test"


@pytest.fixture(scope="module")
def s3_ray():
    """A local S3 server with an empty bucket (the bench's own, raypar/bench/scale.py), and
    a local Ray started after it, so that its workers reach it."""
    boto3 = pytest.importorskip("boto3")
    import ray
    with local_s3(bucket=BUCKET) as uri:
        if uri is None:
            pytest.skip("moto is not installed")
        try:
            ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                     configure_logging=True, logging_level="WARNING")
            yield boto3.client("s3")
        finally:
            ray.shutdown()


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


def test_checkpoints_in_the_bucket_are_read_in_place_and_checked(s3_ray, tmp_path, capsys,
                                                                  caplog):
    """Without Ray's workers: a checkpoint written straight into the bucket, a load that
    reads only the entries it asks for (ranged reads, no folder copy), a truncated object
    skipped by the size check with the warning naming it, and a bucket that does not exist
    refused in one line before any worker starts."""
    import logging

    from torch.distributed.checkpoint.state_dict import get_state_dict

    from raypar.train import checkpoint as ckpt
    from raypar.train.safe_dcp import read_metadata
    from test_checkpoint import _empty_like_saved, meta_for, trained

    from conftest import raypar_records
    root = f"s3://{BUCKET}/unit/checkpoints"
    for step in (1, 2):
        model, opt = trained(step)
        msd, osd = get_state_dict(model, opt)
        ckpt.write({"model": msd, "optim": osd}, {"step": step, "tokens": step},
                   meta_for(model.cfg), dest=f"{root}/{ckpt.dir_name(step)}")
    newest, older = (f"{root}/{ckpt.dir_name(s)}" for s in (2, 1))
    listing = ckpt.storage.list_dir(newest)
    assert {"manifest-0.json", ".metadata", "__0_0.distcp"} <= set(listing)

    metadata = read_metadata(newest)
    length = {i.fqn: s.length for i, s in metadata.storage_data.items()}
    wanted = ["model.tok_emb.weight", "model.layers.1.mlp.fc.weight"]
    stats = ckpt.load({"model": _empty_like_saved(metadata, wanted)}, newest)
    total = sum(size for _, size in listing.values())
    assert stats.bytes == listing[".metadata"][1] + sum(length[f] for f in wanted) < total / 4
    assert stats.reads == 3

    key = f"unit/checkpoints/{ckpt.dir_name(2)}/__0_0.distcp"
    body = s3_ray.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3_ray.put_object(Bucket=BUCKET, Key=key, Body=body[:len(body) // 2])
    with caplog.at_level(logging.WARNING, logger="raypar"):
        assert ckpt.latest_valid(root, hashes=False) == older
    [warning] = raypar_records(caplog, logging.WARNING)
    assert ckpt.dir_name(2) in warning.getMessage() and "__0_0.distcp has" in warning.getMessage()

    capsys.readouterr()
    assert cli.main(["train", "--config", str(TINY), "--run-dir", str(tmp_path / "run"),
                     "--no-progress", "--set", "checkpoint.storage_path=s3://no-such-bucket/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("raypar: error: checkpoint.storage_path: cannot write checkpoints to "
                   "s3://no-such-bucket/x (Bucket 'no-such-bucket' does not exist)"), err


def test_a_checkpoint_whose_bytes_changed_in_the_bucket_is_skipped_at_load(
        s3_ray, small_corpus, tmp_path, monkeypatch):
    """A checkpoint whose object is damaged in the bucket after it was registered (same size:
    only the hashes find it) passes the size check at the restart and fails its read-time
    check on every rank: skipped with the reason naming the file, the previous checkpoint
    is loaded, and every redone step reproduces its loss."""
    import threading
    import time

    ckpt_uri = f"s3://{BUCKET}/flipped"
    run_dir = tmp_path / "run"
    folder = f"flipped/{run_dir.name}/step_00000004"
    done = threading.Event()

    def damage_step_4():
        # Once every rank's manifest of step 4 is in the bucket, flip one byte of rank 0's shard.
        while not done.is_set():
            names = set(keys(s3_ray, folder + "/"))
            if {f"{folder}/manifest-0.json", f"{folder}/manifest-1.json"} <= names:
                key = f"{folder}/__0_0.distcp"
                body = bytearray(s3_ray.get_object(Bucket=BUCKET, Key=key)["Body"].read())
                body[len(body) // 2] ^= 0xFF
                s3_ray.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=damage_step_4, daemon=True)
    watcher.start()
    monkeypatch.setenv("RAYPAR_FAULT", "rank=1,step=6")
    monkeypatch.setenv("RAYPAR_STEP_DELAY_S", "0.3")  # the watcher's time to damage step 4
    try:
        run(load_spec(TINY, [f"data.path={small_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                             f"checkpoint.storage_path={ckpt_uri}", "train.steps=7",
                             "checkpoint.every=2", "checkpoint.max_failures=1",
                             "train.dtype=fp32", "parallel.dp=2"]), run_dir, progress=False)
    finally:
        done.set()
        watcher.join()
    rows, events = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    [event] = [e for e in events if e["event"] == "recovery"]
    assert event["step"] == 2 and event["checkpoint"].endswith("step_00000002"), event
    [(skipped, reason)] = event["skipped"]
    assert skipped.endswith("step_00000004") and "__0_0.distcp sha256 mismatch" in reason, reason
    assert event["mismatched_steps"] == []
