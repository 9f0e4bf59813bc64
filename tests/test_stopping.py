"""Units of stopping and starting over, without Ray: the driver's signal handling, the
workers' stop plan, the checkpoint folder a redone step gets, and what --resume moves
aside (tests/test_resume.py runs all of it end to end on a real Ray)."""
import json
import os
import signal

import pytest

from raypar.config import load_spec
from raypar.train import checkpoint as ckpt
from raypar.train import restart, stopping
from raypar.train.control import StepFlags, StepPlan
from raypar.train.records import StepRow
from raypar.train.rundir import RunDir


class FakeFlag:
    def __init__(self):
        self.set_to, self.asked = None, 0

    def set(self, signum):
        self.set_to = signum

    def is_set(self):
        self.asked += 1
        return self.set_to is not None


def test_a_signal_before_training_stops_at_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stopping.SignalGuard():
        with pytest.raises(stopping.Stopped) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_while_training_the_first_signal_asks_the_second_forces(capfd, monkeypatch):
    flag = FakeFlag()
    with stopping.SignalGuard() as guard:
        guard.training(flag)
        os.kill(os.getpid(), signal.SIGINT)  # asks the workers; nothing raised here
        assert flag.set_to == signal.SIGINT and guard.signum == signal.SIGINT
        assert "save a checkpoint and stop" in capfd.readouterr().err
        guard.check()  # within the grace period: keep waiting
        with pytest.raises(stopping.Stopped):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # stopping now: a third one changes nothing
    with stopping.SignalGuard() as guard:
        guard.training(FakeFlag())
        os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(stopping, "STOP_GRACE_S", 0.0)
        with pytest.raises(stopping.Stopped):
            guard.check()  # the workers had their time


def test_rank_0_looks_the_flag_up_at_most_every_half_second(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: now[0])
    flag = FakeFlag()
    poll = stopping.StopPoll(flag)
    assert not poll() and flag.asked == 1
    now[0] += 0.1
    flag.set(signal.SIGINT)
    assert not poll() and flag.asked == 1, "asked again too soon"
    now[0] += 0.5
    assert poll() and flag.asked == 2
    assert poll() and flag.asked == 2, "once asked, the answer stays"
    assert not stopping.StopPoll(None)()


@pytest.mark.parametrize("save_on_stop", [True, False])
def test_a_stop_request_saves_then_stops_every_rank(save_on_stop):
    plan = StepPlan.decide(StepFlags(stop=True), save_due=False, last=False, in_flight=True,
                           async_save=True, save_on_stop=save_on_stop)
    assert plan.stop and plan.report and plan.land, "a background save in flight lands first"
    assert plan.save == save_on_stop and (plan.sync or not save_on_stop)
    # A stop on a step whose save is due anyway, saving in the background: it is written
    # before the workers stop, not left in flight.
    due = StepPlan.decide(StepFlags(stop=True), save_due=True, last=False, in_flight=False,
                          async_save=True, save_on_stop=save_on_stop)
    assert due.save and due.sync and due.stop
    quiet = StepPlan.decide(StepFlags(), save_due=False, last=False, in_flight=False,
                            async_save=False, save_on_stop=True)
    assert not (quiet.stop or quiet.save)


def test_a_redone_step_gets_a_new_folder_and_the_newest_comes_first(tmp_path):
    first = ckpt.dir_name(30)
    again = ckpt.dir_name(30, {first})
    assert (first, again, ckpt.dir_name(30, {first, again})) == (
        "step_00000030", "step_00000030.2", "step_00000030.3")
    assert ckpt.step_of(again) == 30 and ckpt.step_of("step_00000030.x") is None
    for name in (ckpt.dir_name(20), first, again):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in ckpt.candidates(tmp_path)] == [again, first, ckpt.dir_name(20)]


def spec(*sets):
    return load_spec(None, ["train.steps=100", "train.warmup_steps=10", *sets])


def test_what_changes_the_course_of_redone_steps():
    # Steps 51-60 trained again: a longer run decays the learning rate more slowly there.
    assert restart.changed_course(spec(), spec("train.steps=200"), 50, 60) == ["train.steps"]
    # Redone steps still in the warmup are the same whatever the length.
    assert restart.changed_course(spec(), spec("train.steps=200"), 2, 8) == []
    assert restart.changed_course(spec(), spec("train.lr=0.01", "train.seed=1"), 50, 60) \
        == ["train.lr", "train.seed"]
    assert restart.changed_course(spec(), spec("train.eval_every=5"), 50, 60) == []


def write_metrics(rd, steps):
    lines = []
    for s in steps:
        lines.append(json.dumps(StepRow(step=s, loss=1.0 / s, time=float(s)).to_json()))
        if s % 5 == 0:
            lines.append(json.dumps({"event": "checkpoint", "step": s, "mode": "sync",
                                     "stall_s": 0.1}))
    rd.metrics.write_text("\n".join(lines) + "\n")


def test_superseded_rows_move_aside_and_metrics_keeps_one_row_per_step(tmp_path):
    rd = RunDir(tmp_path)
    write_metrics(rd, range(1, 13))
    assert restart.supersede(rd, 10, ["train.steps"]) == 2
    rows, events = rd.read_metrics()
    assert [r.step for r in rows] == list(range(1, 11)) and [e.step for e in events] == [5, 10]
    moved = [json.loads(line) for line in (tmp_path / restart.SUPERSEDED).open()]
    assert moved[0]["from_step"] == 10 and moved[0]["changed"] == ["train.steps"]
    assert [m["step"] for m in moved[1:]] == [11, 12]
    assert restart.supersede(rd, 10, ["train.steps"]) == 0, "nothing after step 10 any more"


def test_restart_moves_records_and_checkpoints_aside(tmp_path):
    rd = RunDir(tmp_path / "run")
    (rd.checkpoints / ckpt.dir_name(5)).mkdir(parents=True)
    rd.config.write_text("name: x\n")
    write_metrics(rd, range(1, 6))
    rd.write_status("failed", error="x")
    aside = restart.move_aside(rd, str(rd.checkpoints))
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl",
                                                       "status.json"]
    assert (aside / "checkpoints" / ckpt.dir_name(5)).is_dir()
    assert not rd.metrics.exists() and not rd.checkpoints.exists() and rd.config.exists()
    # Checkpoints kept elsewhere (checkpoint.storage_path) are renamed where they are.
    elsewhere = tmp_path / "store" / "run"
    (elsewhere / ckpt.dir_name(5)).mkdir(parents=True)
    restart.move_aside(rd, str(elsewhere))
    [moved] = (tmp_path / "store").iterdir()
    assert moved.name.startswith("run.restarted-") and (moved / ckpt.dir_name(5)).is_dir()


def test_the_stop_wait_covers_the_steps_until_the_replicas_meet():
    # Workers see a stop at their next meeting: with local SGD (H=4) up to 3 steps later,
    # so the driver waits STOP_GRACE_S plus twice 3 of the slowest recent steps (2 s).
    from raypar.train.summary import Follower
    follower = Follower.__new__(Follower)  # only its spec and rows matter here
    follower.rows = [StepRow(step=i, loss=1.0, time=t) for i, t in enumerate([0, 1, 3, 4], 1)]
    for overrides, extra in ((["parallel.sync_every=4"], 12.0),
                             (["parallel.dp_mode=ps", "parallel.ps.staleness=2"], 8.0),
                             ([], 0.0)):
        follower.spec = load_spec(None, ["parallel.dp=2", *overrides])
        assert follower.until_meeting_s() == extra, overrides
    guard = stopping.SignalGuard()
    guard.asked_at, guard.signum = stopping.time.monotonic() - stopping.STOP_GRACE_S - 5, 2
    guard.check(extra_s=12.0)  # still within its time: no Stopped
    with pytest.raises(stopping.Stopped):
        guard.check()
