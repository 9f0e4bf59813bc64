"""The pipeline schedules and their rules: one table, read by the config check, the
pipeline runtime, the bubble formulas and the memory plan.

    s = get("zbv")                        # a Schedule, or ValueError naming the choices
    problem = check("1f1b", pp=2, virtual=1, n_micro=1)   # None, or one line naming the field

This module imports neither torch nor anything of raypar's, so validating a config
stays fast: the torch class is named here and looked up by raypar/parallel/pipeline.py.

    name              torch class                     placement  stages/rank  micro-batches
    gpipe             ScheduleGPipe                   loop       1            >= 1
    1f1b              Schedule1F1B                    loop       1            >= pp
    interleaved_1f1b  ScheduleInterleaved1F1B         loop       several      >= 1, in rounds
    interleaved_zb    ScheduleInterleavedZeroBubble   loop       several      >= 1, in rounds
    zbv               ScheduleZBVZeroBubble           V          2            >= 1
    dualpipev         ScheduleDualPipeV               V          2            >= stages

Placement on pp rank r of p, v stages per rank: loop is round-robin [r, r+p, .., r+(v-1)p];
V is [r, 2p-1-r] (rank 0 hosts both the first and the last stage). With pp == 1 every
schedule is one stage, whatever virtual_stages says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Stage placements.
LOOP = "loop"
V_SHAPE = "v"

# Stages per pp rank (when pp > 1).
ONE = "one"          # exactly 1
SEVERAL = "several"  # torch runs any v >= 1; a run config asks for >= 2 (v = 1 is plain 1F1B)
TWO = "two"          # exactly 2, in a V

# Least micro-batches per step, as torch 2.13 checks them (only once the schedule is
# built on the workers, hence checked up front here).
AT_LEAST_ONE = "one"
AT_LEAST_PP = "pp"          # every pp rank busy before the first backward
AT_LEAST_STAGES = "stages"  # every global stage busy before the first backward


@dataclass(frozen=True)
class Schedule:
    name: str
    torch_class: str
    """Class name in torch.distributed.pipelining (resolved lazily by pipeline.py)."""
    placement: str
    """LOOP or V_SHAPE: which global stages a pp rank hosts."""
    virtual: str
    """ONE, SEVERAL or TWO: stages per pp rank."""
    zero_bubble: bool
    """Splits each backward into an input-gradient and a weight-gradient pass."""
    min_microbatches: str
    """AT_LEAST_ONE, AT_LEAST_PP or AT_LEAST_STAGES."""
    rounds: bool
    """Runs the micro-batches in rounds of about pp: their count must divide by count // pp."""
    bubble_fill: Optional[int]
    """Work units per micro-batch and stage that the (p-1) idle units of a step are set
    against: idle = (p-1) / (fill * v * m + p-1); None when the schedule has no bubble."""
    all_forwards_first: bool = False
    """Runs every forward before any backward, so all micro-batches' activations are alive
    at once (else at most one per stage in flight)."""


TABLE: dict[str, Schedule] = {s.name: s for s in (
    Schedule("gpipe", "ScheduleGPipe", LOOP, ONE, False, AT_LEAST_ONE, False, 1,
             all_forwards_first=True),
    Schedule("1f1b", "Schedule1F1B", LOOP, ONE, False, AT_LEAST_PP, False, 1),
    Schedule("interleaved_1f1b", "ScheduleInterleaved1F1B", LOOP, SEVERAL, False, AT_LEAST_ONE,
             True, 1),
    Schedule("interleaved_zb", "ScheduleInterleavedZeroBubble", LOOP, SEVERAL, True,
             AT_LEAST_ONE, True, 3),
    Schedule("zbv", "ScheduleZBVZeroBubble", V_SHAPE, TWO, True, AT_LEAST_ONE, False, None),
    Schedule("dualpipev", "ScheduleDualPipeV", V_SHAPE, TWO, True, AT_LEAST_STAGES, False, None),
)}
NAMES: tuple[str, ...] = tuple(TABLE)
MULTI_STAGE: tuple[str, ...] = tuple(s.name for s in TABLE.values() if s.virtual != ONE)
"""The schedules that host several stages per rank."""


def unknown(name: str) -> str:
    return f"unknown pipeline schedule {name!r}; choose from {', '.join(NAMES)}"


def get(name: str) -> Schedule:
    """The schedule called `name`; ValueError listing the allowed names otherwise."""
    try:
        return TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(unknown(name)) from None


def stages_per_rank(pp: int, virtual: int) -> int:
    """Stages a pp rank hosts: `virtual`, or 1 without a pipeline."""
    return virtual if pp > 1 else 1


def n_stages(pp: int, virtual: int) -> int:
    return pp * stages_per_rank(pp, virtual)


def min_microbatches(name: str, pp: int, virtual: int) -> int:
    rule = get(name).min_microbatches
    return {AT_LEAST_ONE: 1, AT_LEAST_PP: pp, AT_LEAST_STAGES: n_stages(pp, virtual)}[rule]


# --------------------------------------------------------------------------- checks


def placement_error(name: str, pp: int, virtual: int) -> Optional[str]:
    """What the runtime cannot place: None, or one line (for pipeline.stage_ids)."""
    s = get(name)
    if pp < 1 or virtual < 1:
        return f"pp and virtual must be >= 1, got pp={pp}, virtual={virtual}"
    if pp == 1:
        return None
    if s.virtual == TWO and virtual != 2:
        return f"schedule {name} places exactly 2 stages per rank (a V); got virtual={virtual}"
    if s.virtual == ONE and virtual != 1:
        return (f"schedule {name} runs one stage per rank; got virtual={virtual} "
                f"(use one of {', '.join(MULTI_STAGE)} for several)")
    return None


def check(name: str, pp: int, virtual: int, n_micro: Optional[int] = None,
          count: Optional[str] = None) -> Optional[str]:
    """A run config's schedule fields: None, or one line naming the field at fault.

    Checks parallel.virtual_stages against the schedule and, when `n_micro` (micro-batches
    per replica and step) is given and pp > 1, whether the schedule accepts that many;
    `count` says how that number came about (default: the number itself). The schedule's
    name must be one of NAMES.
    """
    s = get(name)
    if s.virtual != ONE and pp > 1 and virtual < 2:
        return (f"parallel.virtual_stages: schedule {name} needs >= 2 stages per rank, "
                f"got {virtual}")
    if s.virtual == ONE and virtual != 1:
        return (f"parallel.virtual_stages: only the interleaved schedules "
                f"({', '.join(MULTI_STAGE)}) host several stages per rank; "
                f"got {virtual} with parallel.schedule={name}")
    if pp > 1 and s.virtual == TWO and virtual != 2:
        return (f"parallel.virtual_stages: schedule {name} places exactly 2 stages per rank, "
                f"got {virtual}")
    if n_micro is None or pp == 1:
        return None
    count = count or str(n_micro)
    need = min_microbatches(name, pp, virtual)
    if n_micro < need:
        return (f"train.micro_batch: schedule {name} needs at least {need} micro-batches per "
                f"replica (its pipeline stages), got {count}")
    if s.rounds and n_micro % max(1, n_micro // pp):
        return (f"train.micro_batch: schedule {name} runs the micro-batches in rounds of about "
                f"parallel.pp={pp}: their count must divide by count // parallel.pp = "
                f"{n_micro // pp}, got {count}")
    return None


# --------------------------------------------------------------------------- placement


def stage_ids(pp_rank: int, pp: int, virtual: int, name: str) -> list[int]:
    """Global stage indices pp rank `pp_rank` hosts, ascending (ValueError if none fit)."""
    problem = placement_error(name, pp, virtual)
    if problem:
        raise ValueError(problem)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} outside [0, {pp})")
    if pp == 1:
        return [0]
    if get(name).placement == V_SHAPE:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def stage_rank(stage: int, pp: int, n_stages: int, name: str) -> int:
    """The pp rank hosting global stage `stage` (the inverse of stage_ids)."""
    if pp == 1:
        return 0
    if get(name).placement == V_SHAPE:
        return stage if stage < pp else n_stages - 1 - stage
    return stage % pp
