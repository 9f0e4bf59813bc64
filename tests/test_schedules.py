"""The schedule table (raypar/parallel/schedules.py): each rule asserted through the table's
own functions and through config.validate, which reads them. No Ray, no processes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from raypar.config import ConfigError, load_spec
from raypar.parallel import schedules
from raypar.parallel.schedules import check, get, min_microbatches, placement_error, stage_ids

NAMES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
# Stages per rank the run config accepts with pp > 1, among 1..4.
VIRTUAL_OK = {"gpipe": {1}, "1f1b": {1}, "interleaved_1f1b": {2, 3, 4},
              "interleaved_zb": {2, 3, 4}, "zbv": {2}, "dualpipev": {2}}
# Least micro-batches per step, for pp = 2 and v the schedule's smallest.
MIN_MICRO = {"gpipe": 1, "1f1b": 2, "interleaved_1f1b": 1, "interleaved_zb": 1, "zbv": 1,
             "dualpipev": 4}


def spec_for(schedule: str, pp: int = 2, virtual: int = 1, micro: int = 8, **more: object):
    over = [f"parallel.schedule={schedule}", f"parallel.pp={pp}",
            f"parallel.virtual_stages={virtual}", "parallel.dp=1", "parallel.dp_mode=fsdp", "model.n_layer=16", "train.micro_batch=1",
            f"train.global_batch={micro}", *(f"{k}={v}" for k, v in more.items())]
    return load_spec(None, over)


def config_error(*args, **kw) -> str | None:
    try:
        spec_for(*args, **kw)
    except ConfigError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


def test_the_table_holds_every_schedule_in_order():
    assert schedules.NAMES == NAMES
    assert schedules.MULTI_STAGE == ("interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
    assert {n for n in NAMES if get(n).zero_bubble} == {"interleaved_zb", "zbv", "dualpipev"}
    assert {n for n in NAMES if get(n).placement == schedules.V_SHAPE} == {"zbv", "dualpipev"}
    for n in NAMES:
        assert get(n).name == n and get(n).torch_class.startswith("Schedule")


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"^unknown pipeline schedule 'zigzag'; choose from "
                                         r"gpipe, 1f1b, interleaved_1f1b, interleaved_zb, zbv, "
                                         r"dualpipev$"):
        get("zigzag")
    for call in (lambda: check("zigzag", 2, 1), lambda: placement_error("zigzag", 2, 1),
                 lambda: stage_ids(0, 2, 1, "zigzag")):
        with pytest.raises(ValueError, match="unknown pipeline schedule"):
            call()
    assert config_error("zigzag") == ("parallel.schedule: expected one of gpipe, 1f1b, "
                                      "interleaved_1f1b, interleaved_zb, zbv, dualpipev, "
                                      "got 'zigzag'")


@pytest.mark.parametrize("name", NAMES)
def test_virtual_stages_rule(name):
    for v in range(1, 5):
        ok = v in VIRTUAL_OK[name]
        assert (check(name, 2, v) is None) is ok, (name, v)
        err = config_error(name, virtual=v)
        assert (err is None) is ok, (name, v, err)
        if not ok:
            assert err.startswith("parallel.virtual_stages: ") and err == check(name, 2, v)
    # Without a pipeline only the one-stage schedules care about virtual_stages.
    assert (check(name, 1, 3) is None) is (name in schedules.MULTI_STAGE)
    assert config_error(name, pp=1, virtual=1) is None


def test_virtual_stages_messages():
    assert check("1f1b", 2, 2) == (
        "parallel.virtual_stages: only the interleaved schedules (interleaved_1f1b, "
        "interleaved_zb, zbv, dualpipev) host several stages per rank; got 2 with "
        "parallel.schedule=1f1b")
    assert check("interleaved_zb", 2, 1) == ("parallel.virtual_stages: schedule interleaved_zb "
                                             "needs >= 2 stages per rank, got 1")
    assert check("zbv", 2, 3) == ("parallel.virtual_stages: schedule zbv places exactly 2 "
                                  "stages per rank, got 3")


def test_runtime_placement_rule():
    """What stage_ids places: one-stage schedules 1, looped ones any v >= 1, V ones 2."""
    for name in NAMES:
        for v in range(1, 5):
            rule = get(name).virtual
            ok = {schedules.ONE: v == 1, schedules.SEVERAL: True, schedules.TWO: v == 2}[rule]
            assert (placement_error(name, 3, v) is None) is ok, (name, v)
            assert placement_error(name, 1, v) is None  # pp == 1: one stage, whatever v says
    assert "one stage per rank" in placement_error("gpipe", 2, 2)
    assert "exactly 2" in placement_error("dualpipev", 2, 1)
    assert placement_error("1f1b", 0, 1) == "pp and virtual must be >= 1, got pp=0, virtual=1"
    assert stage_ids(1, 3, 2, "interleaved_1f1b") == [1, 4]
    assert stage_ids(1, 3, 2, "zbv") == [1, 4] and stage_ids(0, 3, 2, "zbv") == [0, 5]
    assert stage_ids(2, 3, 2, "dualpipev") == [2, 3]


@pytest.mark.parametrize("name", NAMES)
def test_minimum_micro_batches_rule(name):
    v = min(VIRTUAL_OK[name])
    need = MIN_MICRO[name]
    assert min_microbatches(name, 2, v) == need
    assert check(name, 2, v, need) is None and config_error(name, virtual=v, micro=need) is None
    if need > 1:
        err = check(name, 2, v, need - 1)
        assert err.startswith(f"train.micro_batch: schedule {name} needs at least {need} ")
        assert config_error(name, virtual=v, micro=need - 1).startswith(
            f"train.micro_batch: schedule {name} needs at least {need} micro-batches per replica")
    # Without a pipeline no schedule asks for more than one.
    assert check(name, 1, v, 1) is None and config_error(name, pp=1, virtual=1, micro=1) is None


def test_minimum_micro_batches_scale_with_pp_and_stages():
    assert min_microbatches("1f1b", 4, 1) == 4
    assert min_microbatches("dualpipev", 3, 2) == 6
    assert min_microbatches("gpipe", 4, 1) == 1 and min_microbatches("zbv", 4, 2) == 1


@pytest.mark.parametrize("name", ["interleaved_1f1b", "interleaved_zb"])
def test_looped_schedules_run_micro_batches_in_rounds(name):
    assert get(name).rounds
    # pp = 2: m must divide by m // 2; 5 // 2 = 2 does not divide 5, 3 // 2 = 1 does.
    for m, ok in ((1, True), (3, True), (4, True), (5, False), (6, True), (7, False)):
        assert (check(name, 2, 2, m) is None) is ok, m
        err = config_error(name, virtual=2, micro=m)
        assert (err is None) is ok, (m, err)
        if not ok:
            assert err.startswith(f"train.micro_batch: schedule {name} runs the micro-batches "
                                  f"in rounds of about parallel.pp=2")
            assert f"= {m} / (1 * 1) = {m}" in err
    assert not any(get(n).rounds for n in NAMES if n not in ("interleaved_1f1b", "interleaved_zb"))


def test_every_schedule_takes_every_dp_mode_over_dp():
    # The zero-bubble schedules once refused ddp (torch's DDP reducer missed their split
    # backward); raypar's ddp is now torch's composable replicate, which they drive.
    for name in NAMES:
        v = min(VIRTUAL_OK[name])
        for mode in ("ddp", "fsdp"):
            assert config_error(name, virtual=v, **{"parallel.dp": 2, "parallel.dp_mode": mode,
                                                    "train.global_batch": 16}) is None, (name, mode)


def test_in_flight_micro_batches_follow_the_table():
    from raypar.parallel.footprint import _in_flight
    assert _in_flight(spec_for("gpipe", micro=8)) == 8           # every forward first
    assert _in_flight(spec_for("1f1b", micro=8)) == 2            # one per stage
    assert _in_flight(spec_for("interleaved_1f1b", virtual=2, micro=8)) == 4
    assert _in_flight(spec_for("1f1b", pp=1, micro=8)) == 1


def test_table_and_config_import_no_torch():
    code = ("import sys, raypar.config, raypar.parallel.schedules, raypar.parallel.timeline; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
