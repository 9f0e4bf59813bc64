"""Typed run configuration: dataclasses, YAML load, `--set` overrides (validation is in
raypar/validation.py).

Precedence is CLI `--set section.key=value` > YAML file > the defaults below.
Every user mistake raises ConfigError with one line naming the field and what
is allowed; the CLI prints that line and exits with code 2.

    from raypar.config import load_spec
    spec = load_spec("jobs/configs/tiny.yaml", ["train.steps=20"])
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from raypar.errors import ConfigError
from raypar.validation import validate

if TYPE_CHECKING:
    from raypar.model import GPTConfig


@dataclass
class ModelArch:
    """The model's architecture: what raypar.model.GPTConfig takes from the model section."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; d_model must divide evenly by it."""
    d_model: int = 128
    """Width of the residual stream."""
    d_ff: int = 0
    """Hidden width of the MLP; 0 means 4 * d_model."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for exact parity)."""
    bias: bool = False
    """Whether linear layers and norms carry a bias (the LM head never does)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    pos_encoding: str = "rope"
    """Position encoding: 'rope' (rotary, applied to q and k) or 'learned' (absolute
    embedding table)."""


@dataclass
class ModelConfig(ModelArch):
    init_from: str = ""
    """A local Hugging Face model directory (config.json, model.safetensors or its sharded
    index, tokenizer.json) to start from: GPT-2 with activation_function gelu, or GPT-NeoX
    with rotary over the whole head, a sequential residual and exact GELU (what
    `raypar export` writes). The architecture fields above are taken from its config.json
    (one set to another value is refused), data.tokenizer becomes its tokenizer.json, and
    step 0's weights are its weights, each rank reading only its own shards. dropout stays
    this section's. Empty: a new model initialised from train.seed."""


@dataclass
class ElasticConfig:
    min_replicas: int = 1
    """Fewest data-parallel replicas (a replica is pp*tp workers) an elastic run trains on."""
    max_replicas: int = 0
    """Most replicas; 0 turns elasticity off (parallel.dp is then fixed). Ray Train starts as
    many as the cluster holds between the two, shrinks when a node is lost and grows when one
    joins; parallel.dp is chosen at run time and parallel.dp itself is not used."""
    resize_interval_s: float = 60.0
    """How often a healthy run checks whether more workers fit (it then restarts from the
    latest checkpoint with more replicas)."""

    @property
    def enabled(self) -> bool:
        return self.max_replicas > 0


@dataclass
class PSConfig:
    shards: int = 1
    """With parallel.dp_mode=ps: parameter-server actors; each holds a share of the
    parameters balanced by bytes (whole tensors, or row slices of the large ones) and their
    AdamW state. At most the model's number of parameter tensors."""
    staleness: int = 0
    """With parallel.dp_mode=ps: 0 is synchronous (the servers wait for every replica's
    gradient of a step: the math of ddp). s > 0 lets step t's gradient be computed on the
    parameters after update max(0, t - s) (fixed by the step, not by timing: a run is
    reproducible and resumes exactly), so a replica runs up to s steps ahead of the
    servers' newest update."""


@dataclass
class ParallelConfig:
    dp: int = 2
    """Data-parallel replicas."""
    tp: int = 1
    """Tensor-parallel degree (ranks sharing one layer's weights)."""
    pp: int = 2
    """Pipeline-parallel stages."""
    dp_mode: str = "ddp"
    """How replicas are kept in sync: 'ddp' (replicated parameters, gradients all-reduced
    during the backward pass), 'fsdp' (FSDP2: parameters, gradients and optimizer state
    sharded over dp, i.e. ZeRO-3), 'hsdp' (sharded within groups of dp_shard replicas,
    replicated across the groups: sharding stays inside a node, only the gradient
    all-reduce crosses nodes) or 'ps' (a parameter server: parallel.ps.shards Ray actors
    hold the parameters and optimizer state; replicas push gradients and pull parameters,
    raypar/parallel/ps.py)."""
    dp_shard: int = 0
    """With dp_mode=hsdp: replicas per shard group (it must divide dp; typically the GPUs of
    one node over tp * pp). 0 with the other modes."""
    schedule: str = "1f1b"
    """Pipeline schedule when pp > 1: 'gpipe', '1f1b', 'interleaved_1f1b' (needs
    virtual_stages >= 2), the zero-bubble 'interleaved_zb' (virtual_stages >= 2), or the
    V-shaped zero-bubble 'zbv' and 'dualpipev' (virtual_stages = 2)."""
    virtual_stages: int = 1
    """Pipeline stages per rank (interleaved schedules); n_layer must be >= pp * virtual_stages."""
    sequence_parallel: bool = False
    """With tp > 1, also shard the norms' activations along the sequence (needs seq_len % tp == 0)."""
    sync_every: int = 1
    """Local SGD / DiLoCo (dp_mode=ddp): each replica takes this many optimizer steps (AdamW,
    the inner optimizer) on its own data without any gradient all-reduce, then the replicas
    average their parameter changes and apply the outer optimizer (SGD with Nesterov
    momentum) to the parameters of the last sync; 1 (the default) all-reduces gradients
    every step as usual."""
    outer_lr: float = 0.7
    """With sync_every > 1: the outer SGD's learning rate (DiLoCo's 0.7; 1 with
    outer_momentum 0 is plain parameter averaging)."""
    outer_momentum: float = 0.9
    """With sync_every > 1: the outer SGD's Nesterov momentum (0: no momentum)."""
    grad_compression: str = "none"
    """What dp_mode=ddp's gradient all-reduce sends: 'none' (fp32), 'bf16' (gradients
    reduced in bf16: half the bytes) or 'powersgd' (torch's PowerSGD DDP communication
    hook with error feedback: a rank-powersgd_rank approximation of each gradient matrix;
    tp = 1 only)."""
    powersgd_rank: int = 4
    """With grad_compression=powersgd: the rank of PowerSGD's approximation."""
    autoscale: bool = False
    """On a cluster too small for dp*pp*tp workers, wait for the Ray autoscaler to add nodes
    instead of refusing at once. Only for clusters started with an autoscaler (cluster.yaml)."""
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    """Elastic data parallelism: {min_replicas, max_replicas, resize_interval_s}."""
    ps: PSConfig = field(default_factory=PSConfig)
    """The parameter server of dp_mode=ps: {shards, staleness}."""

    @property
    def meet_every(self) -> int:
        """Steps between the replicas' meetings, where they agree on the rows and on what
        to do next (raypar/train/loop.py): local SGD's sync_every, a parameter server's
        staleness + 1, else 1 (every step). Saves and the last step add meetings."""
        if self.sync_every > 1:
            return self.sync_every
        return self.ps.staleness + 1 if self.dp_mode == "ps" else 1

    @property
    def shard_size(self) -> int:
        """Replicas that share one copy of the parameters (each holding 1/shard_size of it):
        dp with fsdp, dp_shard with hsdp, 1 (every replica holds it all) with ddp."""
        return {"fsdp": self.dp, "hsdp": self.dp_shard}.get(self.dp_mode, 1)


@dataclass
class DataConfig:
    path: str = ""
    """Corpus: a file, directory or glob, local or any URI pyarrow reads (s3://, gs://).
    Empty means the built-in corpus: the Python standard library's own source files.
    A directory prepared by `raypar prepare` (it holds manifest.json) is used as it is:
    its tokenizer and split come with it (format, text_column, val_fraction, vocab_size
    and tokenizer_sample_bytes are then not used; tokenizer is checked when it is 'byte'
    or a file, and must match)."""
    format: str = "auto"
    """'text', 'jsonl', 'parquet', or 'auto' (by file extension)."""
    text_column: str = "text"
    """Column (parquet) or key (jsonl) that holds each document's text."""
    seq_len: int = 128
    """Tokens per training sequence; packed blocks hold seq_len + 1 tokens."""
    tokenizer: str = "bpe"
    """'byte' (256 byte values + end-of-text), 'bpe' (trained on the training corpus and
    cached), or a path to a HF tokenizer.json file. With model.init_from: that directory's
    tokenizer.json (set by it; another value is refused)."""
    vocab_size: int = 4096
    """Vocabulary size of the trained 'bpe' tokenizer."""
    val_fraction: float = 0.05
    """Share of documents held out for validation (chosen by a hash of the document id)."""
    cache_dir: str = ""
    """Where trained tokenizers and prepared datasets are cached; empty means ~/.cache/raypar."""
    dataset_dir: str = ""
    """Where the prepared dataset (token shards + manifest.json) is written: a local path or
    a URI pyarrow writes (s3://, gs://); on a cluster of several nodes it must be storage
    they all share. Empty means <cache_dir>/datasets/<key of corpus and tokenizer>."""
    tokenizer_sample_bytes: int = 64_000_000
    """The 'bpe' tokenizer trains on the first this many bytes of training text (documents
    in corpus order), not on the whole corpus."""
    sources: list = field(default_factory=list)
    """A mixture instead of data.path: [{path, weight, name}, ...], each path a corpus or a
    prepared dataset directory, weight > 0 its share of the training blocks, name (default:
    the path's last part) what its tokens-seen metric is called. Which source each global
    block comes from is fixed by (train.seed, block position). All share one tokenizer: raw
    corpora are tokenized with the first source's."""


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps."""
    global_batch: int = 16
    """Sequences per optimizer step, over all data-parallel replicas."""
    micro_batch: int = 2
    """Sequences per forward pass on one rank; accumulation = global_batch / (dp * micro_batch)."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms, biases or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 1337
    """Seed for initialisation, data order and dropout."""
    dtype: str = "fp32"
    """'fp32', or 'bf16' (autocast; parameters and optimizer state stay fp32)."""
    eval_every: int = 50
    """Compute validation loss every N steps (and at the last step); 0 disables it."""
    eval_batches: int = 4
    """Global batches of validation data per evaluation."""
    threads: int = 1
    """torch threads per worker (keep 1 when several workers share few cores)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them."""
    log_blocks: bool = False
    """Record every step's global block indices in metrics.jsonl (an audit of the data order)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a checkpoint every N steps; 0 saves only at the end of training."""
    keep: int = 3
    """How many of the most recent checkpoints to keep."""
    storage_path: str = ""
    """Where Ray Train stores checkpoints (local path or s3:// / gs://); empty means the run directory."""
    async_save: bool = False
    """Write checkpoints in the background: the step loop stalls only while the state is
    copied to host memory, and the checkpoint is reported once its files are written."""
    max_failures: int = 3
    """Worker or node failures to recover from by restarting the workers from the latest
    checkpoint; -1 means no limit, 0 fails the run at the first one."""


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty means $MLFLOW_TRACKING_URI, else a store inside the run directory."""
    experiment: str = "raypar"
    """MLflow experiment name."""
    enabled: bool = True
    """Log the run to MLflow."""


@dataclass
class RunSpec:
    name: str = "raypar"
    """Run name: prefix of the run directory and the MLflow run name."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def world_size(self) -> int:
        """Workers of the layout; an elastic run's largest one."""
        return self.replica_size * self.max_dp

    @property
    def replica_size(self) -> int:
        """Workers per data-parallel replica: one model copy over pp stages and tp shards."""
        return self.parallel.pp * self.parallel.tp

    @property
    def min_dp(self) -> int:
        e = self.parallel.elastic
        return e.min_replicas if e.enabled else self.parallel.dp

    @property
    def max_dp(self) -> int:
        e = self.parallel.elastic
        return e.max_replicas if e.enabled else self.parallel.dp

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch // (self.parallel.dp * self.train.micro_batch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """{'section.key': value} ('parallel.elastic.min_replicas' for nested ones): the
        shape MLflow params take."""
        out: dict[str, Any] = {}

        def walk(prefix: str, values: Any) -> None:
            if isinstance(values, dict):
                for k, v in values.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = values
        walk("", self.to_dict())
        return out

    def with_dp(self, dp: int) -> "RunSpec":
        """A copy with parallel.dp = dp and elasticity resolved: the layout of one worker group."""
        spec = copy.deepcopy(self)
        spec.parallel.dp = dp
        spec.parallel.elastic = ElasticConfig()
        return spec


def choose_dp(spec: RunSpec, workers: int) -> int:
    """The data-parallel degree a worker group of this many workers trains with: the most
    whole replicas, within the elastic range, for which the layout is valid (train.global_batch
    divides into dp * micro_batch). Workers beyond it sit out. 0 when none fits."""
    for dp in range(min(spec.max_dp, workers // spec.replica_size), spec.min_dp - 1, -1):
        try:
            validate(spec.with_dp(dp))
        except ConfigError:
            continue
        return dp
    return 0


def model_config(spec: RunSpec, vocab_size: int) -> "GPTConfig":
    """The model's own config (raypar.model.GPTConfig) for this run and a (padded) vocabulary."""
    # Deferred: raypar.model imports torch, which costs seconds, and config errors are
    # reported before anything heavy is imported.
    from raypar.model import GPTConfig
    arch = {f.name: getattr(spec.model, f.name) for f in dataclasses.fields(ModelArch)}
    return GPTConfig(**arch, vocab_size=vocab_size, seq_len=spec.data.seq_len)


_SECTION_TYPES = {
    "model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
    "train": TrainConfig, "checkpoint": CheckpointConfig, "tracking": TrackingConfig,
}

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one value against its field type; ints are accepted for floats."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typ is list:  # data.sources, the one list field
        return _sources(key, value)
    raise AssertionError(f"unhandled config type {typ} for {key}")


SOURCE_KEYS = ("path", "weight", "name")


def _sources(key: str, value: Any) -> list[dict[str, Any]]:
    """data.sources as [{"path": str, "weight": float, "name": str}], names filled in."""
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {{path, weight}} mappings, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with path and weight, got {entry!r}")
        unknown = sorted(set(map(str, entry)) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed: "
                              f"{', '.join(SOURCE_KEYS)}")
        path = _coerce(f"{where}.path", entry.get("path"), str)
        if not path:
            raise ConfigError(f"{where}.path: a corpus or prepared dataset path is needed")
        weight = _coerce(f"{where}.weight", entry.get("weight", 1.0), float)
        if not weight > 0:
            raise ConfigError(f"{where}.weight: must be > 0, got {weight!r}")
        name = _coerce(f"{where}.name", entry.get("name"), str) or _source_name(path)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{where}.name: letters, digits, '_', '.' and '-' only, got "
                              f"{name!r}")
        if name in (s["name"] for s in out):
            raise ConfigError(f"{where}.name: {name!r} names an earlier source too; give each "
                              f"source its own name")
        out.append({"path": path, "weight": weight, "name": name})
    return out


def _source_name(path: str) -> str:
    """A source's default name: its path's last part, made a metric-name-safe word."""
    parts = [p for p in path.rstrip("/").split("/") if p and not re.search(r"[*?\[]", p)]
    last = parts[-1] if parts else "source"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", last).strip("._-") or "source"


def from_dict(raw: Any, base: Optional[RunSpec] = None) -> RunSpec:
    """Build a RunSpec from nested dicts (a parsed YAML file), over `base` or the defaults."""
    spec = base if base is not None else RunSpec()
    if raw is None:
        return spec
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    allowed = ", ".join(["name", *_SECTION_TYPES])
    for section, values in raw.items():
        if section == "name":
            spec.name = _coerce("name", values, str)
            continue
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{section}: unknown section; allowed: {allowed}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        for key, value in values.items():
            set_value(spec, f"{section}.{key}", value)
    return spec


def set_value(spec: RunSpec, dotted: str, value: Any) -> None:
    """Set `section.key` on spec, type-checked; unknown keys are rejected."""
    if dotted == "name":
        spec.name = _coerce("name", value, str)
        return
    section, _, key = dotted.partition(".")
    if section not in _SECTION_TYPES or not key:
        raise ConfigError(f"{dotted}: unknown field; use section.key with section one of "
                          f"{', '.join(_SECTION_TYPES)}")
    _set_field(getattr(spec, section), section, key, value)


def _set_field(obj: Any, where: str, key: str, value: Any) -> None:
    """Set obj.<key> (key may be dotted into a nested section, 'elastic.min_replicas');
    a nested section also takes a mapping of its keys."""
    key, _, rest = key.partition(".")
    types = _field_types(type(obj))
    if key not in types:
        raise ConfigError(f"{where}.{key}: unknown key; allowed in {where}: {', '.join(types)}")
    typ = types[key]
    if dataclasses.is_dataclass(typ):
        if rest:
            _set_field(getattr(obj, key), f"{where}.{key}", rest, value)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{where}.{key}: expected a mapping of "
                              f"{', '.join(_field_types(typ))}, got {value!r}")
        for k, v in value.items():
            _set_field(getattr(obj, key), f"{where}.{key}", str(k), v)
        return
    if rest:
        raise ConfigError(f"{where}.{key}.{rest}: unknown field; {where}.{key} has no keys")
    setattr(obj, key, _coerce(f"{where}.{key}", value, typ))


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_spec(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunSpec:
    """Defaults < YAML file < overrides, then model.init_from's architecture and tokenizer
    (raypar/hf_import.py: a field set here to another value is refused), then validate()."""
    spec = RunSpec()
    explicit: set[str] = set()  # the fields the file or an override sets
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file: {p}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"--config {p}: not valid YAML{line}") from None
        spec = from_dict(raw, spec)
        for section, values in (raw or {}).items():
            if isinstance(values, dict):
                explicit.update(f"{section}.{key}" for key in values)
    for text in overrides or []:
        key, value = parse_override(text)
        set_value(spec, key, value)
        explicit.add(key)
    if spec.model.init_from:
        from raypar.hf_import import resolve  # (it reads this module's classes)
        resolve(spec, explicit)
    return validate(spec)
