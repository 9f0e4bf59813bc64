"""The scale section: what a rank pays for a model and its checkpoints, against its share.

    with local_s3() as s3:      # a moto S3 server on 127.0.0.1 (None: moto missing)
        ... ray.init(...) ...   # after it: the workers inherit AWS_ENDPOINT_URL
    rows = memory_rows(layout, ranks, plans, full_bytes) + load_rows(...) + ...

Four measurements, each from real raypar runs (raypar.bench.suite.Bench.scale):
- peak resident memory per rank once built and at the end of a run, against the ideal:
  the process's own baseline (its peak before the model was built, `rss_base_bytes`)
  plus the bytes its share of parameters takes by raypar's footprint plan
  (raypar/parallel/footprint.py); once training, plus its gradients, AdamW's two moments,
  the activations its micro-batches keep for the backward pass (the plan's, which no
  layout avoids), and what FSDP itself gathers for a moment (`fsdp_gathered_bytes`);
- checkpoint load seconds and MB/s per rank for two models 4x apart (each rank's
  `load_s` and `load_bytes`: what its DCP reader fetched);
- step time lost to a save, against local disk and the local S3 server;
- restart after a worker kill with 3 checkpoints kept against 1.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from raypar.bench.stats import median, row

TARGETS = {"rss": 1.3, "full_model": 1.0, "load_follows_bytes": 1.2, "restart_growth": 1.25}

BUCKET = "raypar-bench"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class ScaleSize:
    big: tuple[str, ...]  # the larger model's fields: at least 8x the default's parameters
    small: tuple[str, ...]  # a quarter of big's parameters (same depth, half the width)
    steps: int  # steps of the memory runs
    every: int  # checkpoint interval of the save and restart runs
    saves: int  # saves between the two kills of the local run (3 or more: keep=3 holds 3)
    io: bool = True  # also the checkpoint load, save and restart runs (6 more worker groups)


# --quick (the test suite's run) measures memory only: each 4-rank worker group costs 15-50 s
# to start on 2 cores, and the I/O rows need six more. Default model: 0.82 M parameters. QUICK's big 7.2 M (8.8x), small 1.8 M; FULL's big
# 25.3 M (31x: 405 MB of fp32 parameters, gradients and moments), small 6.4 M (4.0x less).
QUICK = ScaleSize(big=("model.n_layer=4", "model.d_model=384", "model.n_head=6"),
                  small=("model.n_layer=4", "model.d_model=192", "model.n_head=6"),
                  steps=2, every=3, saves=3, io=False)
FULL = ScaleSize(big=("model.n_layer=8", "model.d_model=512", "model.n_head=8"),
                 small=("model.n_layer=8", "model.d_model=256", "model.n_head=8"),
                 steps=6, every=3, saves=4)

# Every scale run: 4 ranks on a small batch (the point is memory and I/O, not arithmetic).
COMMON = ("train.global_batch=4", "train.micro_batch=1", "model.dropout=0.0")
PP2_TP2 = ("parallel.pp=2", "parallel.tp=2", "parallel.dp=1")
FSDP4 = ("parallel.dp=4", "parallel.dp_mode=fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(enabled: bool = True, bucket: str = BUCKET) -> Iterator[Optional[str]]:
    """A moto S3 server on 127.0.0.1 with an empty bucket, and AWS_ENDPOINT_URL and test
    credentials in this process's environment (a Ray started inside inherits them, so its
    workers reach the server); yields the bucket's URI, or None when moto is not installed
    or not enabled. The environment is restored and the server stopped on exit."""
    if not enabled:
        yield None
        return
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    port = _free_port()
    # The server's request log (werkzeug's) would fill the bench's output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MB = 2 ** 20


def fsdp_gathered_bytes(parallel: Any, plan: Any) -> int:
    """The most of one rank's parameters and gradients that FSDP holds whole (all-gathered,
    or not yet reduce-scattered) at once, beyond its shards: 0 without sharding. Without a
    pipeline each block is resharded after its forward, so at most the current block's and
    the prefetched next one's parameters and one block's whole gradients, plus the root
    unit's (embedding, final norm, head), which stay gathered until the backward; in a
    pipeline stage the gathered parameters stay until the backward
    (raypar/parallel/data.py), so the whole stage's, plus one block's gradients."""
    g = parallel.shard_size if parallel.dp > 1 else 1
    n_blocks = sum(len(layers) for layers in plan.layers)
    if g == 1 or n_blocks == 0:
        return 0
    block = plan.block_param_bytes // n_blocks * g  # one block's parameters, whole
    if parallel.pp > 1:
        return plan.param_bytes * g + block
    return (plan.param_bytes - plan.block_param_bytes) * g + 3 * block


def memory_rows(layout: str, ranks: list[Any], plans: Any, full_bytes: int,
                parallel: Any = None) -> list[dict]:
    """Each rank's peak RSS once built and at the end of the run against the ideal: its
    own baseline plus its planned parameters (once built), or (training) its parameters,
    gradients, optimizer state and activations and, under FSDP (`parallel`, the layout's
    ParallelConfig), the layers FSDP gathers for a moment (fsdp_gathered_bytes); and the
    most any rank holds against the baseline plus the full model's training state
    (full_bytes): a rank never holds the whole model."""
    init, steady, above, gathered = [], [], [], []
    for r in sorted(ranks, key=lambda r: r.rank):
        plan = plans[r.rank]
        gathered.append(fsdp_gathered_bytes(parallel, plan) if parallel is not None else 0)
        init.append(r.rss_init_bytes / (r.rss_base_bytes + plan.param_bytes))
        steady.append(r.rss_end_bytes / (r.rss_base_bytes + plan.param_bytes + plan.grad_bytes
                                          + plan.optim_bytes + plan.activation_bytes
                                          + gathered[-1]))
        above.append(r.rss_end_bytes / (r.rss_base_bytes + full_bytes))
    share = max(p.param_bytes + p.grad_bytes + p.optim_bytes for p in plans)
    detail = dict(ranks=len(ranks), baseline_mb=[r.rss_base_bytes / MB for r in ranks],
                  init_mb=[r.rss_init_bytes / MB for r in ranks],
                  peak_mb=[r.rss_end_bytes / MB for r in ranks],
                  share_mb=share / MB, full_model_mb=full_bytes / MB,
                  activation_plan_mb=max(p.activation_bytes for p in plans) / MB,
                  fsdp_gathered_mb=max(gathered) / MB)
    rss = TARGETS["rss"]
    return [
        row("scale", f"{layout}: peak RSS once built / (baseline + its parameters)",
            max(init), "x", init, target=f"<= {rss}", met=max(init) <= rss, **detail),
        row("scale", f"{layout}: peak RSS training / (baseline + its params, grads, AdamW, "
                     f"activations, FSDP's gathered layers)",
            max(steady), "x", steady, target=f"<= {rss}", met=max(steady) <= rss,
            note="rss_end_bytes: the peak at the run's last step; the ideal adds to the "
                 "rank's shards what any layout holds while training (its planned "
                 "activations, activation_plan_mb) and what FSDP gathers whole for a "
                 "moment (fsdp_gathered_mb: the current and the prefetched block's "
                 "parameters, one block's gradients, the root unit's parameters)",
            **detail),
        row("scale", f"{layout}: peak RSS training / (baseline + the full model's state)",
            max(above), "x", above, target=f"< {TARGETS['full_model']}",
            met=max(above) < TARGETS["full_model"],
            note="below 1: no rank held the whole model's parameters, gradients and AdamW "
                 "state", **detail),
    ]


def load_rates(ranks: list[Any]) -> tuple[list[float], list[float], list[int]]:
    """(MB/s, seconds, bytes) of each rank's checkpoint load at its group's start."""
    loaded = [r for r in sorted(ranks, key=lambda r: r.rank) if r.load_s]
    if not loaded:
        raise RuntimeError("bench: no rank recorded a checkpoint load")
    secs = [r.load_s for r in loaded]
    nbytes = [r.load_bytes for r in loaded]
    return [b / MB / s for b, s in zip(nbytes, secs)], secs, nbytes


def load_rows(big: list[Any], small: list[Any], big_params: int, small_params: int,
              s3: Optional[list[Any]]) -> list[dict]:
    """Load MB/s per rank for both models (pp=2 x tp=2, local disk), and how each rank's
    load time grew from the small model to the big one against how its bytes grew."""
    rows = []
    for name, ranks, n in (("big", big, big_params), ("small", small, small_params)):
        rates, secs, nbytes = load_rates(ranks)
        rows.append(row("scale", f"checkpoint load per rank, {n / 1e6:.1f} M parameters "
                                 f"(pp=2 x tp=2, local disk)", median(rates), "MB/s", rates,
                        seconds=secs, bytes=nbytes))
    # Rank by rank (the same coordinates in both layouts): time ratio over bytes ratio,
    # for the ranks that loaded in both runs.
    small_by_rank = {r.rank: r for r in small if r.load_s}
    pairs = [(r, small_by_rank[r.rank]) for r in sorted(big, key=lambda r: r.rank)
             if r.load_s and r.rank in small_by_rank]
    if not pairs:
        raise RuntimeError("bench: no rank loaded a checkpoint in both runs")
    t_big, b_big = [b.load_s for b, _ in pairs], [b.load_bytes for b, _ in pairs]
    t_small, b_small = [s.load_s for _, s in pairs], [s.load_bytes for _, s in pairs]
    per_rank = [(tb / ts) / (bb / bs) for tb, ts, bb, bs in zip(t_big, t_small, b_big, b_small)]
    value = median(per_rank)
    rows.append(row("scale", "load time per rank, big / small model, over its bytes' ratio",
                    value, "x", per_rank, target=f"<= {TARGETS['load_follows_bytes']}",
                    met=value <= TARGETS["load_follows_bytes"],
                    bytes_ratio=[bb / bs for bb, bs in zip(b_big, b_small)],
                    time_ratio=[tb / ts for tb, ts in zip(t_big, t_small)],
                    note="1: time follows bytes; below 1: fixed costs weigh on the small one"))
    if s3 is not None:
        rates, secs, nbytes = load_rates(s3)
        rows.append(row("scale", f"checkpoint load per rank, {small_params / 1e6:.1f} M "
                                 f"parameters (pp=2 x tp=2, local S3 server)", median(rates),
                        "MB/s", rates, seconds=secs, bytes=nbytes))
    return rows


def save_losses(step_end: list[float], every: int) -> list[float]:
    """Seconds each save cost the step loop, one sample per save window: a save after
    step s lands in the gaps ending at steps s+1 and s+2 (the write, a background write's
    share of the cores, the report that registers it); the gap ending at s+every (the
    next save's step, before that save) is the window's own clean step. Alternating like
    this inside one run, each sample compares steps seconds apart. A window holding a
    restart (a gap ten times the median step) is left out. step_end[i]: end of step i+1."""
    if every < 3:
        raise ValueError("save_losses needs checkpoint.every >= 3")
    gaps = [b - a for a, b in zip(step_end, step_end[1:])]  # gaps[i] ends at step i+2
    typical = median(gaps)

    def gap(step: int) -> float:
        return gaps[step - 2]

    out = []
    for s in range(every, len(step_end) - every + 1, every):
        window = [gap(s + i) for i in range(1, every + 1)]
        if max(window) < 10 * typical:
            out.append(gap(s + 1) + gap(s + 2) - 2 * gap(s + every))
    return out


def save_row(where: str, losses: list[float], ckpt_bytes: int) -> dict:
    if not losses:
        raise RuntimeError(f"bench: no save window without a restart ({where})")
    return row("scale", f"step time lost to a background save, {where}", median(losses), "s",
               losses, checkpoint_mb=ckpt_bytes / MB,
               note="two steps after each save against the save window's own clean step")


def _recoveries(run: dict, n: int) -> list[dict]:
    found = [e for e in run["events"] if e["event"] == "recovery"]
    if len(found) != n or any(e.get("recovery_s") is None for e in found):
        raise RuntimeError(f"bench: {run['dir']} recorded {len(found)} recoveries, not {n}")
    return found


def restart_rows(local: dict, s3: Optional[dict]) -> list[dict]:
    """Recovery seconds (the failure to the first new step, Ray Train's restart of the
    group included) after each of the local run's two worker kills, with 1 checkpoint in
    storage and with 3; and after the S3 run's kill."""
    one, three = _recoveries(local, 2)
    ratio = three["recovery_s"] / one["recovery_s"]
    rows = [row("scale", "restart after a worker kill, 1 checkpoint kept (local disk)",
                one["recovery_s"], "s", kept=local["kept"][0], load_s=one["load_s"]),
            row("scale", "restart after a worker kill, 3 checkpoints kept (local disk)",
                three["recovery_s"], "s", kept=local["kept"][1], load_s=three["load_s"]),
            row("scale", "restart time, 3 checkpoints kept / 1", ratio, "x",
                target=f"<= {TARGETS['restart_growth']}",
                met=ratio <= TARGETS["restart_growth"],
                note="one run killed twice; a start checks sizes, not hashes, of those kept")]
    if s3 is not None:
        [r] = _recoveries(s3, 1)
        rows.append(row("scale", "restart after a worker kill, 3 checkpoints kept (local S3 "
                                 "server)", r["recovery_s"], "s", kept=s3["kept"][0],
                        load_s=r["load_s"]))
    return rows
