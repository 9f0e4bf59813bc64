"""Validation of a run config: each field's allowed values, then the relations between
fields (model shapes against tp, the pipeline schedule's rules, the batch split). The
first bad field raises ConfigError with one line that names it and what is allowed.

    validate(spec)        # raypar.config.load_spec calls it on every spec it returns
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from raypar.errors import ConfigError
from raypar.parallel import schedules

if TYPE_CHECKING:
    from raypar.config import RunSpec

# The pipeline schedules and their rules live in one table, raypar/parallel/schedules.py
# (torch-free, so importing it keeps config errors fast).

# Allowed values and ranges per field, checked by validate(); the message says what is allowed.
_CHOICES = {
    "model.pos_encoding": ("rope", "learned"),
    "parallel.dp_mode": ("ddp", "fsdp", "hsdp", "ps"),
    "parallel.grad_compression": ("none", "bf16", "powersgd"),
    "parallel.schedule": schedules.NAMES,
    "data.format": ("auto", "text", "jsonl", "parquet"),
    "train.dtype": ("fp32", "bf16"),
}
_POSITIVE = {
    "model.n_layer", "model.n_head", "model.d_model", "parallel.dp", "parallel.tp",
    "parallel.pp", "parallel.virtual_stages", "parallel.powersgd_rank", "data.seq_len", "train.steps", "train.global_batch",
    "train.micro_batch", "train.lr", "train.eval_batches", "train.threads",
    "checkpoint.keep", "data.tokenizer_sample_bytes", "parallel.ps.shards",
}
_NON_NEGATIVE = {
    "model.d_ff", "train.min_lr", "train.warmup_steps", "train.weight_decay",
    "train.grad_clip", "train.seed", "train.eval_every", "checkpoint.every",
    "parallel.ps.staleness", "parallel.outer_lr",
}
_UNIT_INTERVAL = {"model.dropout": (0.0, 1.0), "data.val_fraction": (0.0, 1.0),
                  "parallel.outer_momentum": (0.0, 1.0),
                  "train.beta1": (0.0, 1.0), "train.beta2": (0.0, 1.0)}

# Sizes no run can have: refused up front, so nothing downstream (the memory plan, the
# data order, the workers) meets a number it cannot hold or loop over.
MAX_WORKERS = 1_000_000
"""Workers (dp * pp * tp, or max_replicas * pp * tp): ten times the accelerators of the
largest clusters built (~100k GPUs)."""
MAX_LAYERS = 100_000
"""Blocks: 100 times the deepest transformer trained (DeepNet, 1,000 layers)."""
MAX_PARAMS = 2**50
"""Parameters (~1.1e15, ~1000x the largest models): fp32 weights, gradients and two Adam
moments take 16 B each, so 2**54 B = 16 PiB of training state."""
MAX_GLOBAL_BATCH = 2**24
"""Sequences per step (16.8M): the largest published batches are ~4-16M tokens, i.e.
~10^4 sequences; every worker holds a step's int64 block indices (8 B each, a few
copies), which stays at ~0.5 GiB here and grows without bound past it."""
INT64_MAX = 2**63 - 1
"""Stream positions (step * global_batch) and block indices are int64 arrays."""


def validate(spec: RunSpec) -> RunSpec:
    """Check values and their relations; raise ConfigError naming the first bad field."""
    _validate_name(spec)
    flat = spec.flat()
    _validate_values(flat)
    _validate_bounds(spec)
    if spec.parallel.dp_mode == "ps" and spec.parallel.elastic.enabled:
        raise ConfigError("parallel.elastic: not with parallel.dp_mode=ps (the parameter "
                          "server's replica count is fixed); set elastic.max_replicas=0")
    _validate_communication(spec)
    if _validate_elastic(spec):
        return spec  # the min_replicas layout was validated in full
    _validate_ranges(spec, flat)
    _validate_shapes(spec)
    _validate_data_parallel(spec)
    _validate_parameter_server(spec)
    _validate_pipeline(spec)
    _validate_batch(spec)
    _validate_data(spec)
    return spec


def _validate_name(spec: RunSpec) -> None:
    if not spec.name or any(c in spec.name for c in "/\\") or spec.name.startswith("."):
        raise ConfigError(f"name: expected a non-empty name without '/', got {spec.name!r}")


def _validate_values(flat: dict[str, Any]) -> None:
    """Per-field choices and signs."""
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {flat[key]!r}")
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")


def _validate_bounds(spec: RunSpec) -> None:
    """Sizes beyond any cluster, model or index arithmetic (see MAX_*)."""
    p, t, e = spec.parallel, spec.train, spec.parallel.elastic
    if spec.world_size > MAX_WORKERS:
        field = "parallel.elastic.max_replicas" if e.enabled else "parallel"
        dp, name = (e.max_replicas, "max_replicas") if e.enabled else (p.dp, "dp")
        raise ConfigError(f"{field}: {name}*pp*tp = {dp}*{p.pp}*{p.tp} = {spec.world_size} "
                          f"workers; at most {MAX_WORKERS:,} are allowed")
    if spec.model.n_layer > MAX_LAYERS:
        raise ConfigError(f"model.n_layer: must be <= {MAX_LAYERS:,}, got {spec.model.n_layer}")
    n = model_param_count(spec)
    if n > MAX_PARAMS:
        raise ConfigError(f"model: n_layer={spec.model.n_layer}, d_model={spec.model.d_model}, "
                          f"d_ff={spec.model.d_ff} make {n:.3g} parameters; at most 2**50 "
                          f"(~{MAX_PARAMS:.2g}) are allowed")
    if t.global_batch > MAX_GLOBAL_BATCH:
        raise ConfigError(f"train.global_batch: must be <= {MAX_GLOBAL_BATCH:,} (2**24) "
                          f"sequences per step, got {t.global_batch}")
    for key, count in (("train.steps", t.steps),):
        if count * t.global_batch > INT64_MAX:
            raise ConfigError(f"{key}: {key} * train.global_batch = {count} * {t.global_batch} "
                              f"blocks must be < 2**63 (int64 block positions)")
    if t.eval_batches * t.global_batch > MAX_GLOBAL_BATCH:
        raise ConfigError(f"train.eval_batches: eval_batches * global_batch = {t.eval_batches} "
                          f"* {t.global_batch} sequences per evaluation; at most "
                          f"{MAX_GLOBAL_BATCH:,} (2**24) are allowed")


def model_param_count(spec: RunSpec) -> int:
    """The model's parameter count as raypar/model.py's param_count gives it (kept
    torch-free here), with the vocabulary the config asks for: the trained BPE's size,
    the byte tokenizer's 257, none for a tokenizer file (unknown until read; a file's
    vocabulary is small next to any bound)."""
    m, d = spec.model, spec.model.d_model
    f, b = m.d_ff or 4 * d, int(m.bias)
    # A BPE size out of its range is _validate_data's to name: count its largest here.
    vocab = {"bpe": min(spec.data.vocab_size, 1 << 20), "byte": 257}.get(spec.data.tokenizer, 0)
    norm = d + b * d
    per_layer = 2 * norm + 4 * (d * d + b * d) + d * f + b * f + f * d + b * d
    tables = vocab * d * (1 if m.tie_embeddings else 2)
    learned = spec.data.seq_len * d if m.pos_encoding == "learned" else 0
    return tables + learned + m.n_layer * per_layer + norm


def _validate_elastic(spec: RunSpec) -> bool:
    """parallel.elastic; when enabled, validates the whole spec at min_replicas and
    returns True (the remaining checks are done)."""
    e = spec.parallel.elastic
    if e.min_replicas < 1:
        raise ConfigError(f"parallel.elastic.min_replicas: must be >= 1, got {e.min_replicas}")
    if e.max_replicas < 0:
        raise ConfigError(f"parallel.elastic.max_replicas: must be >= 0 (0: not elastic), "
                          f"got {e.max_replicas}")
    if (e.enabled or e.min_replicas != 1) and e.max_replicas < e.min_replicas:
        raise ConfigError(f"parallel.elastic.max_replicas: must be >= "
                          f"parallel.elastic.min_replicas={e.min_replicas}, got "
                          f"{e.max_replicas}" + ("" if e.max_replicas else " (0: not elastic)"))
    if not e.enabled:
        return False
    if e.resize_interval_s < 0:
        raise ConfigError(f"parallel.elastic.resize_interval_s: must be >= 0, got "
                          f"{e.resize_interval_s}")
    # Every group starts with at least min_replicas: that layout must be valid.
    try:
        validate(spec.with_dp(e.min_replicas))
    except ConfigError as err:
        raise ConfigError(f"parallel.elastic.min_replicas={e.min_replicas}: {err}") from None
    return True


def _validate_ranges(spec: RunSpec, flat: dict[str, Any]) -> None:
    if spec.checkpoint.max_failures < -1:
        raise ConfigError(f"checkpoint.max_failures: must be >= -1 (-1: no limit), "
                          f"got {spec.checkpoint.max_failures}")
    for key, (lo, hi) in _UNIT_INTERVAL.items():
        if not lo <= flat[key] < hi:
            raise ConfigError(f"{key}: must be in [{lo}, {hi}), got {flat[key]!r}")


def _validate_shapes(spec: RunSpec) -> None:
    """Model widths against the head count and the tensor-parallel split."""
    m, p = spec.model, spec.parallel
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model: {m.d_model} must be divisible by model.n_head={m.n_head}")
    if m.pos_encoding == "rope" and (m.d_model // m.n_head) % 2:
        raise ConfigError(f"model.n_head: rope needs an even head size, d_model/n_head = "
                          f"{m.d_model // m.n_head}")
    if m.n_head % p.tp:
        raise ConfigError(f"model.n_head: {m.n_head} must be divisible by parallel.tp={p.tp}")
    ff = m.d_ff or 4 * m.d_model
    if ff % p.tp:
        raise ConfigError(f"model.d_ff: the MLP width {ff} must be divisible by parallel.tp={p.tp}")
    if p.sequence_parallel and spec.data.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel: data.seq_len={spec.data.seq_len} must be "
                          f"divisible by parallel.tp={p.tp}")


def _validate_data_parallel(spec: RunSpec) -> None:
    """hsdp's shard groups."""
    p = spec.parallel
    if p.dp_mode != "hsdp":
        if p.dp_shard:
            raise ConfigError(f"parallel.dp_shard: only with parallel.dp_mode=hsdp (it is "
                              f"{p.dp_mode}); leave it 0")
        return
    if p.dp_shard < 1:
        raise ConfigError(f"parallel.dp_shard: hsdp needs the replicas per shard group, a "
                          f"divisor of parallel.dp={p.dp} (got {p.dp_shard})")
    if p.dp % p.dp_shard:
        raise ConfigError(f"parallel.dp_shard: {p.dp_shard} must divide parallel.dp={p.dp} "
                          f"(whole shard groups)")


def model_tensor_count(spec: RunSpec) -> int:
    """The model's parameter tensors as raypar/model.py builds them (kept torch-free): per
    block two norms and six linear layers, each with a bias when model.bias; the token
    table, a learned position table, an untied LM head and the final norm."""
    m = spec.model
    per = 1 + int(m.bias)
    tables = 1 + int(m.pos_encoding == "learned") + int(not m.tie_embeddings)
    return tables + m.n_layer * 8 * per + per


def _validate_parameter_server(spec: RunSpec) -> None:
    """dp_mode=ps: its shard count and staleness, and what it cannot combine with."""
    p = spec.parallel
    if p.dp_mode != "ps":
        if p.ps.shards != 1 or p.ps.staleness:
            raise ConfigError(f"parallel.ps: only with parallel.dp_mode=ps (it is "
                              f"{p.dp_mode}); leave ps.shards=1 and ps.staleness=0")
        return
    n = model_tensor_count(spec)
    if p.ps.shards > n:
        raise ConfigError(f"parallel.ps.shards: {p.ps.shards} shards for {n} parameter "
                          f"tensors; at most {n} (each shard holds at least one tensor)")


def _validate_communication(spec: RunSpec) -> None:
    """Local SGD (parallel.sync_every) and what it combines with."""
    p = spec.parallel
    if p.sync_every < 1:
        raise ConfigError(f"parallel.sync_every: must be >= 1 (1: all-reduce gradients every "
                          f"step), got {p.sync_every}")
    if p.sync_every > 1 and p.dp_mode != "ddp":
        raise ConfigError(f"parallel.sync_every: local SGD (sync_every > 1) needs "
                          f"parallel.dp_mode=ddp (every replica holds its own full copy), "
                          f"got {p.dp_mode}")
    if p.sync_every > 1 and p.elastic.enabled:
        raise ConfigError("parallel.sync_every: local SGD keeps each replica's own optimizer "
                          "state, which cannot be resized; leave parallel.elastic off")
    if p.grad_compression == "none" or p.dp_mode == "ps":
        # ps: the ranks compress their pushes themselves (raypar/parallel/ps.py), with tp
        # and pp as without.
        return
    if p.dp_mode != "ddp" or p.sync_every > 1:
        raise ConfigError(f"parallel.grad_compression: {p.grad_compression} compresses the "
                          f"gradient all-reduce of dp_mode=ddp with sync_every=1 (or the "
                          f"pushes of dp_mode=ps), got dp_mode={p.dp_mode}, "
                          f"sync_every={p.sync_every}")
    if p.grad_compression == "powersgd" and p.tp > 1:
        raise ConfigError(f"parallel.grad_compression: powersgd runs as torch's DDP "
                          f"communication hook, which cannot hold tensor-parallel (DTensor) "
                          f"parameters; use it with parallel.tp=1 (got {p.tp}), or bf16")
    if p.grad_compression == "powersgd" and p.pp > 1:
        # torch's DDP reducer asserts in its bucket rebuild when torch's pipeline schedules
        # run several micro-batches through a DDP stage (torch 2.13, seen on gloo).
        raise ConfigError(f"parallel.grad_compression: powersgd runs as torch's DDP "
                          f"communication hook, which torch's pipeline schedules cannot drive "
                          f"here; use it with parallel.pp=1 (got {p.pp}), or bf16")


def local_sgd_resume_problem(saved_layout: dict[str, Any], dp: int, sync_every: int
                             ) -> Optional[str]:
    """Why a checkpoint saved under saved_layout (train_state.json's "layout") cannot resume
    with parallel.dp and sync_every, or None: a local SGD checkpoint holds each replica's
    own parameters and AdamW state, so it resumes only as as many replicas with the same
    sync_every, and a plain run's checkpoint has no such state for local SGD to resume."""
    saved = (saved_layout.get("dp"), saved_layout.get("sync_every", 1))
    if sync_every == 1 and saved[1] == 1 or saved == (dp, sync_every):
        return None
    return (f"parallel.sync_every: the checkpoint was saved with parallel.dp={saved[0]} and "
            f"sync_every={saved[1]}, this run has dp={dp} and sync_every={sync_every}; a "
            f"local SGD checkpoint resumes only with the same two")


def _validate_pipeline(spec: RunSpec) -> None:
    """The schedule, its stages and its data-parallel mode."""
    m, p = spec.model, spec.parallel
    problem = schedules.check(p.schedule, p.pp, p.virtual_stages)
    if problem:
        raise ConfigError(problem)
    n_stages = schedules.n_stages(p.pp, p.virtual_stages)
    if m.n_layer < n_stages:
        raise ConfigError(f"model.n_layer: {m.n_layer} layers cannot fill parallel.pp * "
                          f"parallel.virtual_stages = {n_stages} pipeline stages")


def _validate_batch(spec: RunSpec) -> None:
    """Learning rates, and the batch split into micro-batches the schedule accepts."""
    p, t = spec.parallel, spec.train
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} must be <= train.lr={t.lr}")
    if t.global_batch % (p.dp * t.micro_batch):
        raise ConfigError(
            f"train.global_batch: {t.global_batch} must be divisible by parallel.dp * "
            f"train.micro_batch = {p.dp} * {t.micro_batch} = {p.dp * t.micro_batch}")
    count = (f"train.global_batch / (parallel.dp * train.micro_batch) = {t.global_batch} / "
             f"({p.dp} * {t.micro_batch}) = {spec.grad_accum}")
    problem = schedules.check(p.schedule, p.pp, p.virtual_stages, spec.grad_accum, count)
    if problem:  # the counts torch refuses only once the schedule is built on the workers
        raise ConfigError(problem)


def _validate_data(spec: RunSpec) -> None:
    if not spec.tracking.experiment.strip():
        raise ConfigError("tracking.experiment: must name an MLflow experiment, got an "
                          "empty name")
    if spec.data.tokenizer not in ("byte", "bpe") and not spec.data.tokenizer.endswith(".json"):
        raise ConfigError(f"data.tokenizer: expected byte, bpe or a path to a tokenizer.json, "
                          f"got {spec.data.tokenizer!r}")
    if spec.data.tokenizer == "bpe" and not 257 <= spec.data.vocab_size <= 1 << 20:
        raise ConfigError(f"data.vocab_size: must be in [257, 1048576] for the bpe tokenizer, "
                          f"got {spec.data.vocab_size}")
    if spec.data.sources and spec.data.path:
        raise ConfigError("data.sources: a mixture replaces data.path; give one of the two, "
                          f"not both (data.path is {spec.data.path!r})")
    if spec.data.sources and spec.data.dataset_dir:
        raise ConfigError("data.dataset_dir: one directory cannot hold every source of a "
                          "mixture; prepare each source with `raypar prepare` into its own "
                          "directory and give those as data.sources paths")


MAX_EPOCHS_PER_STEP = 1000
"""A step may read the corpus several times over (a small file and a laptop's batch), but a
step of many epochs costs a permutation per epoch on every worker (2**24 sequences over 10
blocks: over a minute per step)."""


def check_corpus_fits(spec: RunSpec, n_train_blocks: int) -> None:
    """Refuse a global batch that would read the corpus more than MAX_EPOCHS_PER_STEP times
    in one step: call it once the corpus is packed. (A step reads train.global_batch
    consecutive positions of the block stream, one seeded permutation of the
    n_train_blocks blocks per epoch, raypar/data/packing.py.)"""
    t = spec.train
    most = n_train_blocks * MAX_EPOCHS_PER_STEP
    if t.global_batch > most:
        raise ConfigError(
            f"train.global_batch: {t.global_batch} sequences per step, but the corpus packs "
            f"into {n_train_blocks} training blocks of data.seq_len + 1 = "
            f"{spec.data.seq_len + 1} tokens; at most {most} ({MAX_EPOCHS_PER_STEP} passes "
            f"over it) are allowed (lower train.global_batch or data.seq_len, or add data)")
