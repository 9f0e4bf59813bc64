"""The comm section: the ways raypar keeps data-parallel replicas in agreement, side by side
on one model, one global batch and one number of steps (so the same tokens):

    runs = {name: bench._run(...) for name, overrides in STRATEGIES}   # and delayed ones
    rows = comm_rows(runs, delayed, warmup_s, repeats, tokens_per_step, delay_s)

For each strategy, from its own metrics rows:
- the bytes each replica moves per step, as counted where they are sent (`comm_bytes`:
  the payload of every collective on the dp groups, or a parameter server's pushes and
  pulls), averaged over every step (local SGD moves nothing for H - 1 steps, then its
  deltas);
- tokens/s in steady state against sync DDP, window by window (stats.windows);
- the loss after the same tokens against sync DDP's (the mean of the last LAST steps'
  training loss, one over the other): what the strategy's arithmetic costs in convergence;
- the same tokens/s ratio with a straggler, against sync DDP slowed alike, two kinds
  (RAYPAR_STEP_DELAY_S after a step): replica 1 slowed at every step
  (RAYPAR_STEP_DELAY_REPLICA=1: a slower machine), and one replica a step slowed in turn
  (=rotate: a transient slowdown that moves, as a noisy neighbour or a network hiccup
  does). A persistent straggler sets the pace of every mode that ever waits for it, so
  staleness and local SGD can only show their worth against the moving one: a replica
  that is behind catches up while the others, instead of waiting at every step, wait only
  at the next meeting (a sync, the end of the staleness window).
"""
from __future__ import annotations

from typing import Optional

from raypar.bench.stats import median, ratio_row, row, windows

# (name, the overrides that select it), sync DDP first: every ratio is against it.
STRATEGIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sync DDP", ("parallel.dp_mode=ddp",)),
    ("ps sync (2 shards)", ("parallel.dp_mode=ps", "parallel.ps.shards=2")),
    ("ps staleness 2", ("parallel.dp_mode=ps", "parallel.ps.shards=2",
                        "parallel.ps.staleness=2")),
    ("local SGD H=4", ("parallel.sync_every=4",)),
    ("local SGD H=16", ("parallel.sync_every=16",)),
    ("bf16 compression", ("parallel.grad_compression=bf16",)),
    ("PowerSGD rank 4", ("parallel.grad_compression=powersgd", "parallel.powersgd_rank=4")),
)
BASE = STRATEGIES[0][0]
LAST = 8  # training-loss rows averaged at the end of each run
STEPS = 64  # per run: H=16 syncs 4 times
DELAY_S = 0.2  # the straggler's extra seconds a step (a dp=2 step here takes 0.1-0.3 s)
# The stragglers: RAYPAR_STEP_DELAY_REPLICA's value, the rows' words, and the strategies
# run with it (the moving one: those that can gain from it, and ps sync to show that a
# synchronous mode cannot).
STRAGGLERS: tuple[tuple[str, str, Optional[frozenset[str]]], ...] = (
    ("1", "replica 1 slowed {d:g} s a step", None),
    ("rotate", "one replica a step slowed {d:g} s, in turn",
     frozenset({"ps sync (2 shards)", "ps staleness 2", "local SGD H=4", "local SGD H=16"})),
)


def straggles(kind: str, name: str) -> bool:
    """Whether strategy `name` runs with straggler `kind` (sync DDP always does)."""
    only = dict((k, o) for k, _, o in STRAGGLERS)[kind]
    return name == BASE or only is None or name in only
WARMUP_S, REPEATS = 4.0, 3  # steady state: stats.windows


def merged(runs: list[dict]) -> dict:
    """Sync DDP's two runs (the section's first and last) as one: their step intervals
    averaged step by step (the windows then average both), the rows of the first."""
    first = runs[0]
    n = min(len(r["step_end"]) for r in runs)
    gaps = [sum(r["step_end"][i] - r["step_end"][i - 1] for r in runs) / len(runs)
            for i in range(1, n)]
    ends = [first["step_end"][0]]
    for g in gaps:
        ends.append(ends[-1] + g)
    return {**first, "step_end": ends}


def bytes_per_step(run: dict) -> float:
    counted = [r["comm_bytes"] for r in run["rows"] if r.get("comm_bytes") is not None]
    if not counted:
        raise RuntimeError("bench: a comm run recorded no comm_bytes")
    return sum(counted) / len(run["rows"])


def final_loss(run: dict) -> float:
    losses = [r["loss"] for r in run["rows"]][-LAST:]
    return sum(losses) / len(losses)


def comm_rows(runs: dict[str, dict], delayed: dict[str, dict[str, dict]], warmup_s: float,
              repeats: int, tokens_per_step: int, delay_s: float) -> list[dict]:
    """The section's rows. runs: each strategy's run (Bench._run's dict, its metrics rows
    with comm_bytes); delayed: {straggler kind (STRAGGLERS): {strategy: its run with it}}."""
    win = dict(warmup_s=warmup_s, repeats=repeats, tokens_per_step=tokens_per_step)
    base_tps = windows(runs[BASE]["step_end"], **win)
    base_bytes, base_loss = bytes_per_step(runs[BASE]), final_loss(runs[BASE])
    slow_tps = {kind: windows(delayed[kind][BASE]["step_end"], **win)
                for kind, _, _ in STRAGGLERS if BASE in delayed.get(kind, {})}
    words = {kind: text.format(d=delay_s) for kind, text, _ in STRAGGLERS}
    rows = []
    for name, overrides in STRATEGIES:
        if name not in runs:
            continue
        run = runs[name]
        sent = bytes_per_step(run)
        rows.append(row("comm", f"{name}: bytes each replica moves per step", sent, "bytes",
                        [r["comm_bytes"] for r in run["rows"] if r.get("comm_bytes") is not None],
                        of_sync_ddp=sent / base_bytes, config=list(overrides)))
        if name != BASE:
            rows.append(ratio_row("comm", f"{name} / sync DDP (tokens/s)",
                                  windows(run["step_end"], **win), base_tps, None))
        loss = final_loss(run)
        rows.append(row("comm", f"{name}: loss after the same tokens / sync DDP's",
                        loss / base_loss, "x", loss=loss, sync_ddp_loss=base_loss,
                        steps=len(run["rows"]), last_steps_averaged=LAST))
        for kind, tps in slow_tps.items():
            if name != BASE and name in delayed[kind]:
                rows.append(ratio_row(
                    "comm", f"{name} / sync DDP, {words[kind]} (tokens/s)",
                    windows(delayed[kind][name]["step_end"], **win), tps, None))
    plain = median(base_tps)
    for kind, tps in slow_tps.items():
        rows.append(row("comm", f"sync DDP with {words[kind]} / without (tokens/s)",
                        median(tps) / plain, "x", [s / b for s, b in zip(tps, base_tps)]))
    return rows
