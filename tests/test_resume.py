"""Fault tolerance on a real local Ray: SIGKILLed workers, kills during a save, corrupt
checkpoints, `--resume` of a failed driver under other layouts, MLflow continuity.

Every run here is the tiny model for 20 steps with a checkpoint every 5, compared with one
uninterrupted reference run: bit-exact where the layout is the same (the same arithmetic
replayed from a restored fp32 state), rtol 1e-5 where it changes (other reduction orders;
see test_parallel).
"""
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from raypar import cli
from raypar import export as ex
from raypar.config import load_spec
from raypar.data.tokenizer import Tokenizer
from raypar.train import checkpoint as ckpt
from raypar.train.driver import run
from raypar.train.rundir import read_metrics

from conftest import ROOT, Payload, raypar_records, refresh_manifests

TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
STEPS, EVERY = 20, 5


def spec_for(corpus, cache, *overrides):
    return load_spec(TINY, [f"data.path={corpus}", f"data.cache_dir={cache}",
                            f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
                            "train.log_blocks=true", *overrides])


@pytest.fixture(scope="module")
def reference(ray_local, small_corpus, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(spec_for(small_corpus, cache_dir), run_dir, progress=False)
    rows, events = read_metrics(run_dir)
    # No recovery and no layout change; one timing event per synchronous save.
    saves = [e for e in events if e["event"] == "checkpoint"]
    assert saves == events
    assert [e["step"] for e in saves] == list(range(EVERY, STEPS + 1, EVERY))
    assert all(e["mode"] == "sync" and 0 < e["save_s"] == e["stall_s"] for e in saves)
    return rows


def recoveries(run_dir):
    """(step rows, recovery events) of a run."""
    rows, events = read_metrics(run_dir)
    return rows, [e for e in events if e["event"] == "recovery"]


def assert_same_run(rows, ref, exact=True):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step exactly once"
    # The data order: every step trained on the same global blocks, none repeated or skipped.
    assert [r["blocks"] for r in rows] == [r["blocks"] for r in ref]
    for r, e in zip(rows, ref):
        for key in ("loss", "grad_norm", "val_loss"):
            if key not in e:
                continue
            if exact:
                assert r[key] == e[key], (r["step"], key, r[key], e[key])
            else:
                assert r[key] == pytest.approx(e[key], rel=1e-5), (r["step"], key)


def mlflow_steps(run_dir, key="loss"):
    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=record["uri"])
    return record["run_id"], [m.step for m in client.get_metric_history(record["run_id"], key)]


def test_sigkill_worker_at_a_random_step(reference, small_corpus, cache_dir, tmp_path,
                                         monkeypatch):
    kill_at = random.Random().randint(EVERY + 1, STEPS - 1)
    monkeypatch.setenv("RAYPAR_FAULT", f"rank=1,step={kill_at}")
    run_dir = tmp_path / "run"
    # Background saves here (the reference saves synchronously): the same bits either way.
    summary = run(spec_for(small_corpus, cache_dir, "checkpoint.max_failures=1",
                           "checkpoint.async_save=true"), run_dir, progress=False)
    assert (run_dir / ".fault-fired").read_text().split() == ["step", str(kill_at)]
    rows, events = read_metrics(run_dir)
    assert_same_run(rows, reference)  # same layout: bit-exact
    [event] = [e for e in events if e["event"] == "recovery"]
    # Background saves held training up for less time than they took to write (the last
    # is written in the foreground).
    background = [e for e in events if e["event"] == "checkpoint" and e["mode"] == "async"]
    assert background and all(0 < e["stall_s"] and 0 < e["save_s"] for e in background)
    # The kill comes before that step's own save. The newest save before it was written in
    # the background and may not have been uploaded yet; the one before that certainly was
    # (a save waits for the previous one to be reported before it starts).
    newest = (kill_at - 1) // EVERY * EVERY
    assert event["cause"] == "failure" and event["step"] in (newest, newest - EVERY), \
        (kill_at, event)
    if event["step"]:
        assert event["checkpoint"].endswith(ckpt.dir_name(event["step"]))
    else:  # killed before the first background save was uploaded: from the start
        assert event["checkpoint"] is None
    resumed = event["step"]
    assert event["recovery_s"] > 0 and event["mismatched_steps"] == []
    assert summary["recoveries"] == [event]
    run_id, steps = mlflow_steps(run_dir)
    assert steps == list(range(1, STEPS + 1)), "MLflow: no duplicate, no missing step"
    assert mlflow_steps(run_dir, "recovery_s")[1] == [resumed]


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(
        reference, small_corpus, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPAR_FAULT", f"rank=1,step={2 * EVERY},phase=save")
    run_dir = tmp_path / "run"
    run(spec_for(small_corpus, cache_dir, "checkpoint.max_failures=1"), run_dir,
        progress=False)
    rows, [event] = recoveries(run_dir)
    assert_same_run(rows, reference)
    # Rank 1 died with its shard in storage but not its manifest: the half-saved step_10
    # does not verify, so step_5 is used.
    assert event["step"] == EVERY and event["checkpoint"].endswith(ckpt.dir_name(EVERY))
    half = ckpt.dir_name(2 * EVERY)
    assert [(p.rsplit("/", 1)[-1], "manifest-1.json missing" in r)
            for p, r in event["skipped"]] == [(half, True)], event["skipped"]
    # The redone save of step_10 is whole, in a folder of its own.
    assert ckpt.verify(run_dir / "checkpoints" / ckpt.dir_name(2 * EVERY, {half})) is None


def test_sigterm_saves_a_checkpoint_and_a_partial_replica_sits_out(
        reference, small_corpus, cache_dir, tmp_path, monkeypatch):
    # An elastic range of up to 3 replicas, on a Ray with room for 3 workers: 8 sequences
    # do not split over 3 replicas of micro-batches of 2, so dp=2 trains and one worker
    # sits out; the arithmetic is the reference's (dp=2), to the bit.
    monkeypatch.setenv("RAYPAR_FAULT", "rank=1,step=7,phase=sigterm")
    run_dir = tmp_path / "run"
    summary = run(spec_for(small_corpus, cache_dir, "checkpoint.max_failures=1",
                           "parallel.elastic={min_replicas: 1, max_replicas: 3}"),
                  run_dir, progress=False)
    rows, events = read_metrics(run_dir)
    assert_same_run(rows, reference)
    assert all(r["dp"] == 2 for r in rows)
    [layout] = summary["layouts"]  # the restarted group has the same layout: no new event
    assert (layout["workers"], layout["dp"], layout["sitting_out"]) == (3, 2, 1)
    # SIGTERM to rank 1 after step 7 (a spot preemption): every rank saved step 7 before
    # the signalled worker exited, and the group restarted from it with nothing redone.
    [event] = [e for e in events if e["event"] == "recovery"]
    assert event["cause"] == "preemption" and event["step"] == 7, event
    assert event["checkpoint"].endswith(ckpt.dir_name(7)) and event["steps_redone"] == 0
    assert "received SIGTERM at step 7" in event["error"]
    log = (run_dir / "run.log").read_text()
    assert "3 workers, training on dp=2 x pp=1 x tp=1; 1 sit out" in log


def stop_driver(args, run_dir, sig, after_step, again_after=None):
    """Run `raypar train ARGS` in a process of its own, on this module's Ray, with slowed
    steps; once metrics.jsonl has a row of after_step, send it sig (and the same again
    again_after seconds later). Returns (exit code, seconds from the signal to the exit,
    stderr)."""
    import ray
    proc = subprocess.Popen(
        [sys.executable, "-m", "raypar.cli", "train", *map(str, args), "--no-progress",
         "--address", ray.get_runtime_context().gcs_address],
        env=dict(os.environ, RAYPAR_STEP_DELAY_S="0.5"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(r["step"] >= after_step for r in read_metrics(run_dir)[0]):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"no step {after_step} within 300 s"
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(sig)
    if again_after is not None:
        time.sleep(again_after)
        proc.send_signal(sig)
    err = proc.communicate(timeout=180)[1]
    return proc.returncode, time.monotonic() - sent, err


def test_sigint_and_sigterm_stop_the_run_which_resumes_exactly(
        reference, small_corpus, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", TINY, "--run-dir", run_dir]
    for s in (f"data.path={small_corpus}", f"data.cache_dir={cache_dir}",
              f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "train.log_blocks=true"):
        args += ["--set", s]
    resume = ["--resume", run_dir]
    stops = []
    # Ctrl-C: the workers save and stop. Then SIGTERM twice: stop at once.
    for sig, cmd, again in ((signal.SIGINT, args, None), (signal.SIGTERM, resume, 0.3)):
        after = max([r["step"] for r in read_metrics(run_dir)[0]], default=0) + 2
        code, took, err = stop_driver(cmd, run_dir, sig, after, again)
        rows, _ = read_metrics(run_dir)
        stopped_at = rows[-1]["step"]
        assert code == 128 + sig and took < 60, (code, took, err)
        assert err.strip().splitlines()[-1] == (
            f"raypar: stopped by {sig.name} at step {stopped_at} of {STEPS}; continue with: "
            f"raypar train --resume {run_dir}"), err
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "stopped" and stopped_at < STEPS
        record = json.loads((run_dir / "mlflow.json").read_text())
        assert MlflowClient(record["uri"]).get_run(record["run_id"]).info.status == "KILLED"
        # Every step the stopped run recorded is in MLflow before the run was ended.
        assert mlflow_steps(run_dir) == (record["run_id"], [r["step"] for r in rows])
        assert all(record["run_id"] == run_id for _, run_id in stops)  # --resume: the same run
        if again is None:  # asked once: the workers saved the step they stopped at
            assert ckpt.step_of(ckpt.latest_valid(run_dir)) == stopped_at
        stops.append((stopped_at, record["run_id"]))
    assert stops[0][0] < stops[1][0], stops
    assert resume_cli(run_dir) == 0
    rows, recovered = recoveries(run_dir)
    assert_same_run(rows, reference)  # the same layout throughout: bit-exact
    assert all(e["cause"] == "resume" and e["mismatched_steps"] == [] for e in recovered)
    assert mlflow_steps(run_dir) == (stops[0][1], list(range(1, STEPS + 1))), \
        "one MLflow run, each step once"
    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(record["uri"])
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(record["run_id"]).info.experiment_id])) == 1
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def kill_driver_after(args, run_dir, step):
    """Run `raypar train ARGS` in its own process group and SIGKILL all of it (driver, its
    local Ray, its workers) as soon as the checkpoint of `step` verifies."""
    proc = subprocess.Popen([sys.executable, "-m", "raypar.cli", "train", *args],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = run_dir / "checkpoints" / ckpt.dir_name(step)
    try:
        deadline = time.time() + 400
        while not (target.exists() and ckpt.verify(target) is None):
            assert proc.poll() is None, f"the driver ended before step {step} was saved"
            assert time.time() < deadline, f"no step {step} checkpoint within 400 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's own processes (controller, workers) follow their raylet down within
        # seconds; until they have, they may still write into the run directory.
        deadline = time.time() + 120
        while time.time() - newest_mtime(run_dir) < 5 and time.time() < deadline:
            time.sleep(0.5)


def newest_mtime(root) -> float:
    newest = 0.0
    for path in root.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:  # removed while we looked
            pass
    return newest


@pytest.fixture(scope="module")
def killed_pp_run(small_corpus, cache_dir, tmp_path_factory):
    """A dp2 x pp2 run whose driver was SIGKILLed, with its Ray and workers, once step_5
    was saved (later ones may have followed before the kill landed): what a crashed laptop
    or a lost head node leaves behind."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    args = ["--config", str(TINY), "--run-dir", str(run_dir), "--no-progress"]
    for s in (f"data.path={small_corpus}", f"data.cache_dir={cache_dir}",
              f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "train.log_blocks=true",
              "parallel.dp=2", "parallel.pp=2"):
        args += ["--set", s]
    kill_driver_after(args, run_dir, EVERY)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    return run_dir


def resume_cli(run_dir, *sets):
    args = ["train", "--resume", str(run_dir), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return cli.main(args)


def test_resume_at_dp1_continues_the_reference(killed_pp_run, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_pp_run, run_dir)
    latest = ckpt.latest_valid(run_dir)
    run_id_before, _ = mlflow_steps(run_dir)
    assert resume_cli(run_dir, "parallel.dp=1", "parallel.pp=1") == 0
    rows, [event] = recoveries(run_dir)
    assert_same_run(rows, reference, exact=False)
    assert event["cause"] == "resume" and event["step"] == ckpt.step_of(latest) >= EVERY
    run_id, steps = mlflow_steps(run_dir)
    assert run_id == run_id_before, "the same MLflow run goes on"
    assert steps == list(range(1, STEPS + 1)), "rows the killed driver never logged are backfilled"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def flip_a_byte(checkpoint):
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_corrupt_checkpoints_leave_the_run_resumable_then_restartable(
        ray_local, small_corpus, cache_dir, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    run(spec_for(small_corpus, cache_dir, "parallel.dp=1", "checkpoint.keep=2",
                 "train.steps=15"), run_dir, progress=False)
    first, _ = read_metrics(run_dir)
    newest = run_dir / "checkpoints" / ckpt.dir_name(15)
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    # Skips step_15 and resumes from step_10, at tp=2; the longer schedule changes the
    # learning rate of steps 11-15, whose old rows move aside. The step trained again is
    # saved in a new folder, so Ray Train retires the corrupt one (keep=2) without touching
    # the new one.
    assert resume_cli(run_dir, "train.steps=20", "parallel.tp=2") == 0
    rows, events = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21)), "each step exactly once"
    assert [r["loss"] for r in rows[:10]] == [r["loss"] for r in first[:10]]
    [recovered] = [e for e in events if e["event"] == "recovery"]
    assert recovered["step"] == 10 and not recovered["same_layout"], recovered
    [(skipped, reason)] = recovered["skipped"]
    assert skipped == str(newest) and f"{shard.name} has" in reason, reason
    assert any("skipped" in r.getMessage() and newest.name in r.getMessage()
               for r in raypar_records(caplog, logging.WARNING))
    moved = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").open()]
    assert moved[0]["from_step"] == 10 and moved[0]["changed"] == ["train.steps"]
    assert [r["step"] for r in moved[1:] if "event" not in r] == [11, 12, 13, 14, 15]
    # Ray Train's bookkeeping lists exactly what storage holds: the next start can load it.
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if ckpt.step_of(p))
    assert kept == [ckpt.dir_name(15, {ckpt.dir_name(15)}), ckpt.dir_name(20)], kept
    snapshot = json.loads((run_dir / "checkpoints" / "checkpoint_manager_snapshot.json")
                          .read_text())
    assert sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]) == kept
    # Every checkpoint corrupt, at its size: the driver checks sizes only (no byte of them
    # is read here), the workers find each one corrupt as they read it, and --resume fails
    # in one line that names each and --restart, rather than train from step 0. --restart
    # trains from step 0 with the old records and checkpoints moved aside, not deleted.
    for name in kept:
        flip_a_byte(run_dir / "checkpoints" / name)
    capsys.readouterr()  # (the runs above showed their start-up phases)
    # With an elastic range that leaves one replica (2 workers) sitting out: they are let go
    # too, rather than wait in the control exchange for a step that never comes.
    assert resume_cli(run_dir, "train.steps=30",
                      "parallel.elastic={min_replicas: 1, max_replicas: 3}") == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "--restart" in errors[0] and "none of the 2" in errors[0] \
        and all(name in errors[0] for name in kept), errors
    after, _ = read_metrics(run_dir)
    assert [(r["step"], r["loss"]) for r in after] == [(r["step"], r["loss"]) for r in rows], \
        "nothing trained, nothing lost"
    assert cli.main(["train", "--resume", str(run_dir), "--restart", "--no-progress",
                     "--set", "train.steps=5", "--set", "parallel.tp=1"]) == 0
    rows, events = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 6)) and rows[0]["loss"] == first[0]["loss"]
    assert not [e for e in events if e["event"] == "recovery"]
    [aside] = run_dir.glob("restarted-*")
    assert len(read_metrics(aside)[0]) == 20
    assert sorted(p.name for p in (aside / "checkpoints").iterdir() if ckpt.step_of(p)) == kept
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_resume_refuses_a_forged_checkpoint_before_any_worker(killed_pp_run, tmp_path,
                                                             capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_pp_run, run_dir)
    latest = ckpt.latest_valid(run_dir)
    marker = tmp_path / "pwned"
    (latest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    refresh_manifests(latest, ".metadata")
    assert resume_cli(run_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".metadata refused" in err and latest.name in err, err
    assert not marker.exists(), "the payload ran"


def test_resume_refuses_another_model_and_finished_runs(killed_pp_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_pp_run, run_dir)
    assert resume_cli(run_dir, "model.d_model=64") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.d_model=32" in err and "64" in err, err
    assert resume_cli(tmp_path / "nothing") == 2
    assert "not a raypar run directory" in capsys.readouterr().err


def test_export_and_generate_from_a_pipeline_checkpoint(killed_pp_run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(killed_pp_run), "--format", "raypar", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("exported: ")
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "def ",
                     "--max-new-tokens", "20", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.rstrip("\n")) > len("def "), text

    # The same trained dp2 x pp2 model and its bpe tokenizer, through transformers.
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    run_id, _ = mlflow_steps(killed_pp_run)
    client = MlflowClient(json.loads((killed_pp_run / "mlflow.json").read_text())["uri"])
    status = client.get_run(run_id).info.status
    assert cli.main(["export", str(killed_pp_run), "--out", str(hf_dir)]) == 0
    # ... and logged as the MLflow run's model (tests/test_tracking.py registers one).
    printed = capsys.readouterr().out
    [logged] = [m for m in client.search_logged_models([client.get_run(run_id).info.experiment_id])
                if m.source_run_id == run_id]
    assert logged.name == "model" and f"MLflow model: models:/{logged.model_id}," in printed
    assert f'mlflow.register_model("runs:/{run_id}/model", NAME)' in printed
    assert logged.tags["raypar.checkpoint"] == str(ckpt.latest_valid(killed_pp_run))
    assert client.get_run(run_id).info.status == status  # left as it was
    model, meta = ex.load_exported(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = Tokenizer.from_json(meta["tokenizer"])
    ids = tok("def main():")["input_ids"]
    assert ids == ours.encode("def main():") and tok.eos_token_id == ours.eot_id
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits,
                                   model(torch.tensor([ids]))[..., :ours.vocab_size],
                                   atol=1e-5, rtol=0)


def test_unwritable_storage_is_refused_before_training(small_corpus, cache_dir, tmp_path,
                                                       capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = cli.main(["train", "--config", str(TINY), "--run-dir", str(tmp_path / "run"),
                     "--set", f"data.path={small_corpus}", "--set", f"data.cache_dir={cache_dir}",
                     "--set", f"checkpoint.storage_path={blocker}/ckpts", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("raypar: error: checkpoint.storage_path:"), err
    assert not (tmp_path / "run").exists()



def test_resume_waits_for_a_stopped_runs_workers_to_go_quiet(tmp_path):
    """A stopped job's workers may write for a few seconds after their driver is gone:
    --resume waits until the run directory is quiet, and refuses one that stays busy."""
    import threading
    import time

    from raypar.config import ConfigError
    from raypar.train.rundir import wait_until_quiet
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    stop_at = time.time() + 1.5

    def straggler():  # a worker finishing its last steps, then a checkpoint
        while time.time() < stop_at:
            with open(metrics, "a") as f:
                f.write("{}\n")
            time.sleep(0.1)
        (run_dir / "checkpoints" / "step_00000007").mkdir(exist_ok=True)

    thread = threading.Thread(target=straggler)
    thread.start()
    wait_until_quiet(run_dir, quiet_s=0.5, timeout_s=30)
    assert time.time() >= stop_at + 0.5  # after the last write, and quiet for 0.5 s since
    thread.join()

    stop_at = time.time() + 30  # a run that is still going: refused, not waited on forever
    thread = threading.Thread(target=straggler)
    thread.start()
    time.sleep(0.3)  # it is writing
    try:
        with pytest.raises(ConfigError, match=r"^--resume: .* is still being written to"):
            wait_until_quiet(run_dir, quiet_s=0.5, timeout_s=1.0)
    finally:
        stop_at = 0
        thread.join()
