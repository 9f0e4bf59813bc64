"""The start-up profile (raypar/train/startup.py): driver phases and rank 0's marks shown in
order, each with its seconds, a resume's checkpoint phase, the total. No Ray: the board's
GCS keys are a dict here."""
from raypar.train.startup import Startup


class DictBoard:
    key = "test"

    def __init__(self):
        self.marks = {}

    def read(self, phase):
        return self.marks.get(phase)


def started_at(t0):
    shown = []
    s = Startup(t0, say=shown.append, held=False)
    s.board = DictBoard()
    return s, shown


def test_phases_show_in_order_with_their_seconds_and_add_up_to_the_total():
    s, shown = started_at(100.0)
    s.done("imports", "python, torch, ray, raypar", at=103.0)
    s.done("ray", "started a local Ray", at=105.5)
    assert s.poll() is False and shown[-1] == "raypar: ray: started a local Ray (2.5 s)"
    # Marks arrive out of order of polling: nothing shows until the next one in line is
    # there (placement, unmarked where there is no /proc, is skipped once a later one is).
    s.board.marks["model"] = (111.0, "built")
    assert s.poll() is False and len(shown) == 2
    s.board.marks["workers"] = (110.0, "2 on 1 node(s)")
    assert s.poll() is False
    assert shown[2:] == ["raypar: workers: 2 on 1 node(s) (4.5 s)", "raypar: model: built (1.0 s)"]
    s.board.marks["first step"] = (111.5, "step 1 trained")  # no checkpoint phase: skipped
    assert s.poll() is True
    assert shown[4:] == ["raypar: first step: step 1 trained (0.5 s)",
                         "raypar: first step after 11.5 s from the command"]
    profile = s.profile()
    assert profile == {"imports": 3.0, "ray": 2.5, "workers": 4.5, "model": 1.0,
                       "first step": 0.5, "total": 11.5}
    assert s.metrics()["startup_first_step_s"] == 0.5 and s.poll() is True


def test_phases_before_the_checks_pass_are_held():
    shown = []
    s = Startup(0.0, say=shown.append)
    s.done("imports", at=2.0)
    s.done("checks", at=2.5)
    assert shown == []  # a refused request prints its one error line alone
    s.release()
    assert shown == ["raypar: imports (2.0 s)", "raypar: checks (0.5 s)"]
    s.done("ray", "up", at=4.0)
    assert shown[-1] == "raypar: ray: up (1.5 s)"


def test_a_resume_shows_its_checkpoint_load():
    s, shown = started_at(0.0)
    s.board.marks.update({"placement": (3.0, "p"), "workers": (5.0, "w"), "model": (6.0, "m"),
                          "checkpoint": (8.0, "loaded step_00000010 (step 10)"),
                          "first step": (9.0, "step 11 trained")})
    assert s.poll() is True
    assert [line.split(":")[1].strip() for line in shown[:-1]] == [
        "placement", "workers", "model", "checkpoint", "first step"]
    assert s.profile()["checkpoint"] == 2.0 and s.profile()["total"] == 9.0
