"""The record protocol and the driver's merge logic, without Ray: python -m pytest -q
tests/test_records.py. What a worker reports, what metrics.jsonl gets across restarts,
and what the ranks decide from a step's flags."""
import json
import os

import pytest

from raypar.train.control import StepFlags, StepPlan
from raypar.train.records import (CheckpointEvent, LayoutEvent, Merger, RankInfo,
                                  RecoveryEvent, StartRecord, StepRow, Summary, Timeline,
                                  WorkerReport,
                                  parse_row)
from raypar.config import ConfigError
from raypar.train.rundir import RunDir, RunLock

LAYOUT = {"dp": 2, "pp": 1, "tp": 1, "dp_mode": "ddp", "schedule": "gpipe", "virtual_stages": 1}


def row(step, loss=None, t=None, **kw):
    return StepRow(step=step, loss=10.0 - step if loss is None else loss, lr=1e-3,
                   grad_norm=1.0, time=100.0 + step if t is None else t, dp=2,
                   first_block=step, last_block=step + 1, data_s=0.0, **kw)


def start(from_step=0, checkpoint=None, workers=2, dp=2, saved_layout=None, sitting_out=0,
          loaded=50.0):
    return StartRecord(checkpoint=checkpoint, from_step=from_step, skipped=[], started=1.0,
                       loaded=loaded, load_s=0.5, layout={**LAYOUT, "dp": dp}, workers=workers,
                       sitting_out=sitting_out, saved_layout=saved_layout)


def steps_of(records):
    return [r.step for r in records if isinstance(r, StepRow)]


def test_records_round_trip_through_json_and_read_like_their_lines():
    r = row(3, val_loss=2.5, blocks=[1, 2])
    assert parse_row(json.loads(json.dumps(r.to_json()))) == r
    assert r["loss"] == 7.0 and "val_loss" in r and r.get("missing") is None
    bare = row(4)
    assert "val_loss" not in bare and "blocks" not in bare.to_json()
    with pytest.raises(KeyError):
        bare["val_loss"]
    event = RecoveryEvent(step=2, cause="resume", error="", checkpoint=None, skipped=[],
                          load_s=None, same_layout=True)
    line = event.to_json()
    assert list(line)[0] == "event" and line["event"] == "recovery"
    assert line["checkpoint"] is None and "recovery_s" not in line
    assert event["checkpoint"] is None and "checkpoint" in event and event == dict(event)
    assert parse_row(line) == event
    report = WorkerReport(rows=[r], start=start(), timeline=Timeline([{"kind": "F"}], 1.0, 2.0),
                          checkpoints=[CheckpointEvent(step=3, mode="sync", stall_s=1.0,
                                                       save_s=1.0)],
                          rank_info=RankInfo(rank=0, dp=0, pp=0, tp=0, stages=[0], layers=[[0]],
                                             node=0, node_ip="x", node_id="n", pid=1,
                                             block_param_bytes=8, param_bytes=16))
    assert WorkerReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert WorkerReport.from_json({}).empty()


def test_rows_of_older_versions_and_unknown_events_still_read():
    # A step row from before data_s and the block range were recorded, an event kind a
    # newer version writes, and a recovery event from before load_s.
    old = {"step": 4, "loss": 3.5, "lr": 1e-3, "grad_norm": 0.5, "time": 9.0, "tokens": 64}
    assert parse_row(old) == old and parse_row(old).data_s is None
    assert parse_row({"event": "something-new", "step": 4}) is None
    event = parse_row({"event": "recovery", "step": 3, "cause": "failure", "error": "x",
                       "checkpoint": None, "skipped": [], "steps_redone": 1})
    assert event["checkpoint"] is None and event["load_s"] is None and event.same_layout


def test_a_fresh_run_writes_each_row_once_and_no_recovery():
    m = Merger(started=0.0, elastic=False, recorded=[])
    out = m.merge(WorkerReport(rows=[row(1), row(2)], start=start()))
    assert out == [row(1), row(2)]
    assert m.merge(WorkerReport(rows=[row(3)])) == [row(3)]


def test_restart_after_a_failure_skips_redone_steps_and_times_the_recovery():
    m = Merger(started=0.0, elastic=False, recorded=[])
    m.merge(WorkerReport(rows=[row(s) for s in range(1, 6)], start=start()))
    m.failed(106.0, "worker died\nsecond line")
    m.failed(107.0, "a later error of the same failure")  # the first one counts
    # The group restarts from step 3: the checkpoint's own rows come again (old times),
    # then steps 4 and 5 are redone (one with another loss), then step 6 is new.
    out = m.merge(WorkerReport(rows=[row(3), row(4, t=110.0), row(5, loss=0.5, t=111.0)],
                               start=start(from_step=3, checkpoint="/c/step_3",
                                           saved_layout=LAYOUT)))
    assert out == []  # nothing new yet: the recovery is written with the first new step
    out = m.merge(WorkerReport(rows=[row(6, t=112.0)]))
    event, new = out
    assert steps_of(out) == [6]
    assert isinstance(event, RecoveryEvent) and event.cause == "failure"
    assert event.error == "worker died" and event.checkpoint == "/c/step_3"
    assert event.steps_redone == 2 and event.mismatched_steps == [5]
    assert event.recovery_s == pytest.approx(110.0 - 106.0)


def test_sigterm_is_a_preemption_and_another_layout_does_not_count_mismatches():
    m = Merger(started=0.0, elastic=False, recorded=[])
    m.merge(WorkerReport(rows=[row(1), row(2)], start=start()))
    m.failed(103.0, "a worker received SIGTERM at step 2: saved the checkpoint ...")
    out = m.merge(WorkerReport(rows=[row(2, loss=9.0, t=104.0), row(3, t=105.0)],
                               start=start(from_step=1, checkpoint="/c/1",
                                           saved_layout={**LAYOUT, "dp": 1})))
    event = out[0]
    assert event.cause == "preemption" and not event.same_layout
    assert event.steps_redone == 1 and event.mismatched_steps == []


def test_resume_driver_continues_the_recorded_rows():
    recorded = [row(1), row(2)]
    m = Merger(started=200.0, elastic=False, recorded=recorded)
    out = m.merge(WorkerReport(rows=[row(2), row(3, t=210.0)],
                               start=start(from_step=2, checkpoint="/c/2")))
    event, new = out
    assert event.cause == "resume" and event.recovery_s == pytest.approx(10.0)
    assert new == row(3, t=210.0)


def test_a_fresh_start_of_a_resume_with_no_checkpoint_is_not_a_recovery():
    m = Merger(started=0.0, elastic=False, recorded=[])
    assert m.merge(WorkerReport(rows=[row(1)], start=start())) == [row(1)]


def test_failing_again_before_a_new_step_writes_the_first_recovery_too():
    m = Merger(started=0.0, elastic=False, recorded=[])
    m.merge(WorkerReport(rows=[row(1), row(2)], start=start()))
    m.failed(103.0, "first")
    m.merge(WorkerReport(start=start(from_step=2, checkpoint="/c/2")))
    m.failed(104.0, "second")
    out = m.merge(WorkerReport(rows=[row(3, t=106.0)], start=start(from_step=2,
                                                                    checkpoint="/c/2")))
    first, second, new = out
    assert (first.error, second.error) == ("first", "second")
    assert first.recovery_s is None and second.recovery_s == pytest.approx(2.0)
    assert new.step == 3


def test_resize_and_layout_events_of_an_elastic_run():
    m = Merger(started=0.0, elastic=True, recorded=[])
    out = m.merge(WorkerReport(rows=[row(1)], start=start(workers=3, dp=3)))
    assert isinstance(out[0], LayoutEvent) and (out[0].workers, out[0].dp) == (3, 3)
    # Ray Train resized the group to 2 workers: no failure was seen.
    out = m.merge(WorkerReport(rows=[row(2, t=120.0)], start=start(from_step=1, workers=2,
                                                                    dp=2, checkpoint="/c/1")))
    layout, recovery, new = out
    assert (layout.workers, layout.dp) == (2, 2)
    assert recovery.cause == "resize" and recovery.recovery_s == pytest.approx(120.0 - 101.0)
    # The same layout again: no second layout event.
    out = m.merge(WorkerReport(rows=[row(3)], start=start(from_step=2, workers=2, dp=2,
                                                           checkpoint="/c/2")))
    assert not any(isinstance(r, LayoutEvent) for r in out)


def test_checkpoint_timings_come_before_the_rows_of_their_report():
    m = Merger(started=0.0, elastic=False, recorded=[])
    timing = CheckpointEvent(step=1, mode="async", stall_s=0.1, save_s=2.0)
    assert m.merge(WorkerReport(rows=[row(2)], checkpoints=[timing])) == [timing, row(2)]


def test_run_dir_reads_back_what_it_appends_and_drops_a_torn_line(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.read_metrics() == ([], [])
    event = CheckpointEvent(step=1, mode="sync", stall_s=1.0, save_s=1.0)
    rd.append_metrics([row(1), event])
    with open(rd.metrics, "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-line
    assert rd.read_metrics() == ([row(1)], [event])
    new, offset = rd.follow_metrics(0)
    assert new == [row(1), event] and offset < rd.metrics.stat().st_size
    rd.drop_torn_line()
    assert offset == rd.metrics.stat().st_size
    rd.write_status("failed", error="boom")
    assert rd.read_status().state == "failed" and rd.read_status().error == "boom"
    assert rd.read_summary() is None
    summary = Summary(steps=1, final_loss=9.0, final_val_loss=None, first_val_loss=None,
                      tokens=64, seconds=1.5, run_dir=str(tmp_path), mlflow_run_id=None,
                      mlflow_uri=None, layouts=[{"event": "layout", "dp": 2}])
    rd.write_summary(summary)
    written = json.loads(rd.summary.read_text())
    assert written["final_val_loss"] is None and "ranks" not in written  # the README's fields
    assert rd.read_summary() == summary


FLAGS = StepFlags()


@pytest.mark.parametrize("flags, due, last, in_flight, async_save, expect", [
    # nothing due: train on
    (FLAGS, False, False, False, False, dict(save=False, report=False, stop=False, land=False)),
    # rank 0's clock says rows are due
    (StepFlags(report_due=True), False, False, False, False, dict(report=True, save=False)),
    # a background save is started on schedule, and landed when rank 0 says it is written
    (FLAGS, True, False, False, True, dict(save=True, sync=False, report=True, land=False)),
    (StepFlags(save_landed=True), False, False, True, True, dict(land=True, save=False)),
    # the next save lands the one in flight first
    (FLAGS, True, False, True, True, dict(land=True, save=True, sync=False)),
    # the last step: land, save synchronously, report, stop
    (FLAGS, True, True, True, True, dict(land=True, save=True, sync=True, report=True,
                                         stop=True)),
    # a SIGTERM anywhere: a synchronous save, then stop
    (StepFlags(sigtermed=True), False, False, False, True, dict(save=True, sync=True,
                                                                 stop=True)),
    # a preemption notice: save synchronously and train on
    (StepFlags(notice=True), False, False, False, True, dict(save=True, sync=True,
                                                              stop=False)),
])
def test_step_plan_follows_the_flags(flags, due, last, in_flight, async_save, expect):
    plan = StepPlan.decide(flags, due, last, in_flight, async_save)
    assert {k: getattr(plan, k) for k in expect} == expect
    assert plan.n_reports == int(plan.land) + int(plan.report)


# -- one run per directory ------------------------------------------------------------------------

def test_a_live_run_holds_its_directory_against_train_and_resume(tmp_path, capsys):
    from raypar import cli
    from conftest import ROOT
    tiny = ROOT / "jobs" / "configs" / "tiny.yaml"
    rd = RunDir(tmp_path / "run")
    with RunLock(rd):  # a run that trains here (the lock is per open file, so this process
        # is refused too, as another would be)
        assert cli.main(["train", "--config", str(tiny), "--run-dir", str(rd.path),
                         "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by raypar pid {os.getpid()} on" in err[0], err
        rd.config.write_text(tiny.read_text())
        assert cli.main(["train", "--resume", str(rd.path), "--no-progress"]) == 2
        assert "is in use by raypar pid" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="in use"):
            RunLock(rd).__enter__()
    with RunLock(rd):  # released: the next run takes it
        pass


def test_a_crashed_runs_lock_is_free_and_unused_directories_go(tmp_path):
    import subprocess
    import sys
    rd = RunDir(tmp_path / "run")
    # A run that takes the lock and dies without releasing anything.
    code = ("import os, sys; sys.path.insert(0, %r); from raypar.train.rundir import RunDir, "
            "RunLock; RunLock(RunDir(%r)).__enter__(); os._exit(1)") % (os.getcwd(), str(rd.path))
    assert subprocess.run([sys.executable, "-c", code]).returncode == 1
    assert rd.lock.exists()
    with RunLock(rd):
        assert json.loads(rd.lock.read_text())["pid"] == os.getpid()
    # Directories the lock created, left empty by a run that failed early, go again.
    fresh = RunDir(tmp_path / "a" / "b" / "fresh")
    with pytest.raises(RuntimeError):
        with RunLock(fresh):
            raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "a").exists()
    # One that wrote something stays, lock file and all.
    with RunLock(rd):
        rd.write_status("running")
    assert rd.status.exists()


def test_a_garbage_line_in_metrics_is_one_line_naming_file_and_line(tmp_path):
    rd = RunDir(tmp_path)
    rd.append_metrics([row(1)])
    with open(rd.metrics, "a") as f:
        f.write("this is not json\n")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl: line 2 is not a JSON record"):
        rd.read_metrics()


def test_a_failed_run_names_its_root_cause():
    from ray.train import ControllerError, WorkerGroupError

    from raypar.train.driver import root_cause
    # Ray Train's wrappers say "Training failed due to worker errors:" and little else on
    # their first line; the user needs the exception at the bottom.
    failed = WorkerGroupError("see below", {1: MemoryError("cannot allocate"),
                                            0: ValueError("boom\nsecond line")})
    assert root_cause(failed) == "ValueError: boom"
    assert root_cause(ControllerError(RuntimeError("no nodes"))) == "RuntimeError: no nodes"

    class TaskError(Exception):  # Ray's task errors: the traceback as text, the error as .cause
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  File ...\nKeyError: 'x'")
            self.cause = cause

    assert root_cause(WorkerGroupError("", {0: TaskError(KeyError("x"))})) == "KeyError: 'x'"
    # Rank 1 died (its health check failed); rank 0 only lost its connection to it.

    class HealthCheckFailed(Exception):
        def __init__(self, failure):
            super().__init__("A worker health check failed.")
            self.health_check_failure = failure

    died = WorkerGroupError("", {0: RuntimeError("[gloo] Connection closed by peer"),
                                 1: HealthCheckFailed(SystemError("the actor died: OOM"))})
    assert root_cause(died) == "SystemError: the actor died: OOM"
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert root_cause(e) == "OSError: [Errno 28] No space left on device"
