"""Start a run from a local Hugging Face model: `model.init_from=DIR`.

    spec = load_spec(None, ["model.init_from=models/pythia-tiny"])   # resolve() runs here
    parallelize(..., init_from=spec.model.init_from)                  # load_shards() per stage

DIR holds what transformers' `save_pretrained` (or `raypar export`) writes: config.json,
model.safetensors (or model-*.safetensors with model.safetensors.index.json) and
tokenizer.json. Two architectures are raypar's model exactly (raypar/hf_export.py says
why): GPT-NeoX with rotary over the whole head (base 10000), a sequential residual, exact
GELU and LayerNorm eps 1e-5, and GPT-2 with activation_function "gelu" (exact; GPT-2's own
"gelu_new" is the tanh approximation, which raypar does not compute) and the plain
attention scaling. Any other config is refused in one line, before Ray starts.

resolve() takes the architecture fields from config.json (a field the user set to another
value is refused, naming both), sets data.tokenizer to DIR's tokenizer.json (another one
is refused), and checks the weights' names and shapes in the safetensors headers. raypar
gives both architectures biases (GPT-2 always has them, GPT-NeoX always in its MLP and
norms; a GPT-NeoX without attention biases gets zero ones). dropout is a training setting
and stays the user's.

The vocabulary is the checkpoint's embedding rows (not the tokenizer's size padded to 64,
as for a new model), rounded up to a multiple of parallel.tp with zero rows: so the
logits, and the loss over them, are transformers' own.

load_shards() fills one rank's parameters: for each, the rows (and columns) of its local
shard, found as raypar/model.py's keyed init finds them, are read from the safetensors
file with `get_slice` (memory-mapped, only those bytes), through raypar/hf_names.py's
table: no rank reads or holds the whole model.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from raypar.errors import ConfigError
from raypar.hf_names import ROPE_BASE, HFTensor, Part, hf_layout

FIELD = "model.init_from"
NORM_EPS = 1e-5  # raypar.model.GPTConfig.norm_eps, which the run config does not set
# Architecture fields that come from config.json, compared with what the user set.
ARCH_FIELDS = ("n_layer", "n_head", "d_model", "d_ff", "bias", "tie_embeddings", "pos_encoding")
# The head's name in older (and Pythia's) checkpoints and in newer transformers.
_ALIASES = {"embed_out.weight": ("lm_head.weight",)}


@dataclass(frozen=True)
class Pretrained:
    """What a Hugging Face directory holds, as raypar reads it."""
    path: Path
    arch: str  # "GPT-NeoX" or "GPT-2"
    model: dict[str, Any]  # ARCH_FIELDS
    vocab_rows: int  # the embedding's rows
    positions: int  # GPT-2's position rows; GPT-NeoX: max_position_embeddings
    files: dict[str, str]  # tensor name -> safetensors file name

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    def layout(self, cfg: Any) -> list[HFTensor]:
        return hf_layout(cfg, self.arch, self.vocab_rows, self.positions)


def _fail(where: Path, what: str) -> ConfigError:
    return ConfigError(f"{FIELD}: {where}: {what}")


def _need(cfg: dict, key: str, where: Path) -> Any:
    if cfg.get(key) is None:
        raise _fail(where, f"config.json has no {key}")
    return cfg[key]


def _check(where: Path, arch: str, key: str, value: Any, want: Any, why: str) -> None:
    if value != want:
        raise _fail(where, f"{arch} with {key}={value!r} maps onto no raypar model "
                           f"({why}: {want!r})")


def _neox(cfg: dict, where: Path) -> tuple[dict[str, Any], int]:
    a = "GPT-NeoX"
    rope = cfg.get("rope_parameters") or {}
    # Defaults as transformers' GPTNeoXConfig has them (a quarter of the head rotated,
    # parallel residual): a config.json that leaves them out means them.
    _check(where, a, "partial_rotary_factor",
           float(rope.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25))), 1.0,
           "raypar rotates the whole head")
    _check(where, a, "rope_theta", float(rope.get("rope_theta", cfg.get("rotary_emb_base",
                                                                        ROPE_BASE))),
           ROPE_BASE, "raypar's rotary base")
    _check(where, a, "rope_type", rope.get("rope_type", "default"), "default",
           "raypar's rotary has no scaling")
    _check(where, a, "rope_scaling", cfg.get("rope_scaling"), None,
           "raypar's rotary has no scaling")
    _check(where, a, "use_parallel_residual", cfg.get("use_parallel_residual", True), False,
           "raypar's blocks are sequential")
    _check(where, a, "hidden_act", cfg.get("hidden_act", "gelu"), "gelu",
           "raypar's MLP uses exact GELU")
    _check(where, a, "layer_norm_eps", float(cfg.get("layer_norm_eps", NORM_EPS)), NORM_EPS,
           "raypar's LayerNorm eps")
    model = {"n_layer": _need(cfg, "num_hidden_layers", where),
             "n_head": _need(cfg, "num_attention_heads", where),
             "d_model": _need(cfg, "hidden_size", where),
             "d_ff": _need(cfg, "intermediate_size", where),
             # GPT-NeoX's MLP and norms always have biases (attention ones are zeros when
             # attention_bias is false)
             "bias": True, "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
             "pos_encoding": "rope"}
    return model, int(cfg.get("max_position_embeddings") or 0)


def _gpt2(cfg: dict, where: Path) -> tuple[dict[str, Any], int]:
    a = "GPT-2"
    _check(where, a, "activation_function", cfg.get("activation_function", "gelu_new"), "gelu",
           "raypar's MLP uses exact GELU")
    _check(where, a, "layer_norm_epsilon", float(cfg.get("layer_norm_epsilon", NORM_EPS)),
           NORM_EPS, "raypar's LayerNorm eps")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        _check(where, a, key, cfg.get(key, want), want, "raypar's attention")
    model = {"n_layer": _need(cfg, "n_layer", where), "n_head": _need(cfg, "n_head", where),
             "d_model": _need(cfg, "n_embd", where), "d_ff": cfg.get("n_inner") or 0,
             "bias": True, "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
             "pos_encoding": "learned"}
    return model, int(_need(cfg, "n_positions", where))


def _weight_files(path: Path) -> dict[str, str]:
    """{tensor name: file} from the index, or every tensor of model.safetensors."""
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = path / "model.safetensors"
        if not single.is_file():
            raise _fail(path, "holds no model.safetensors (nor model.safetensors.index.json); "
                              "save the model with transformers' save_pretrained, which "
                              "writes safetensors")
        with safe_open(str(single), "numpy") as f:
            return {name: single.name for name in f.keys()}
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - json, OSError, safetensors' own errors
        raise _fail(path, f"cannot read its weights' index ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _shapes(path: Path, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers alone."""
    from safetensors import safe_open
    shapes: dict[str, tuple[int, ...]] = {}
    for fname in sorted(set(files.values())):
        f_path = path / fname
        try:
            with safe_open(str(f_path), "numpy") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001 - a missing or damaged file
            raise _fail(path, f"cannot read {fname} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return shapes


def stored_name(name: str, files: dict[str, str]) -> Optional[str]:
    """The name `name` has in this checkpoint (the head has two), or None."""
    for candidate in (name, *_ALIASES.get(name, ())):
        if candidate in files:
            return candidate
    return None


def read_pretrained(directory: str) -> Pretrained:
    """The Hugging Face directory `directory`, checked against raypar's model: its config,
    tokenizer file, and every weight's presence and shape. A ConfigError otherwise.
    Read once per process while its files stay as they are (the driver asks several times)."""
    try:
        path = Path(directory).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"{FIELD}: no such directory: {path}")
        stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                      for p in sorted(path.iterdir()) if p.is_file())
    except (OSError, ValueError) as e:  # unreadable, or not a path at all (a NUL byte)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{FIELD}: {directory!r} is not a readable directory ({e})") from None
    return _read(path, stamp)


@functools.lru_cache(maxsize=8)
def _read(path: Path, stamp: tuple) -> Pretrained:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "holds no config.json (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as e:
        raise _fail(path, f"config.json is not readable JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind == "gpt_neox":
        arch, (model, positions) = "GPT-NeoX", _neox(cfg, path)
    elif kind == "gpt2":
        arch, (model, positions) = "GPT-2", _gpt2(cfg, path)
    else:
        raise _fail(path, f"model_type={kind!r} maps onto no raypar model (gpt_neox or gpt2)")
    if not (path / "tokenizer.json").is_file():
        raise _fail(path, "holds no tokenizer.json (save the tokenizer with save_pretrained "
                          "too)")
    files = _weight_files(path)
    shapes = _shapes(path, files)
    emb = "gpt_neox.embed_in.weight" if arch == "GPT-NeoX" else "transformer.wte.weight"
    if emb not in shapes:
        raise _fail(path, f"its weights lack {emb}")
    pre = Pretrained(path, arch, model, shapes[emb][0], positions, files)
    shape_cfg = SimpleNamespace(**model, seq_len=positions)
    for t in pre.layout(shape_cfg):
        name = stored_name(t.name, files)
        if name is None:
            if t.optional:
                continue
            raise _fail(path, f"its weights lack {t.name}")
        if shapes[name] != t.stored_shape:
            raise _fail(path, f"{name} has shape {list(shapes[name])}, config.json's model "
                              f"needs {list(t.stored_shape)}")
    return pre


def _same(field: str, a: Any, b: Any, d_model: int) -> bool:
    if field == "d_ff":  # 0 means 4 * d_model
        return (a or 4 * d_model) == (b or 4 * d_model)
    return a == b


def resolve(spec: Any, explicit: set[str]) -> None:
    """Take `spec.model.init_from`'s architecture and tokenizer into spec (a RunSpec);
    `explicit`: the dotted fields the user set, which must agree."""
    pre = read_pretrained(spec.model.init_from)
    where = pre.path
    for field in ARCH_FIELDS:
        mine, theirs = getattr(spec.model, field), pre.model[field]
        if f"model.{field}" in explicit and not _same(field, mine, theirs, pre.model["d_model"]):
            raise ConfigError(f"model.{field}={mine!r} conflicts with {FIELD}={where}, whose "
                              f"config.json has {field}={theirs!r}; leave model.{field} unset")
        setattr(spec.model, field, theirs)
    spec.model.init_from = str(where)
    tok = spec.data.tokenizer
    if "data.tokenizer" in explicit and not _same_file(tok, pre.tokenizer):
        raise ConfigError(f"data.tokenizer={tok!r} conflicts with {FIELD}={where}, whose "
                          f"tokenizer is {pre.tokenizer}; leave data.tokenizer unset")
    spec.data.tokenizer = str(pre.tokenizer)
    from raypar.data.tokenizer import parse_tokenizer  # (it imports raypar.config)
    tokenizer = parse_tokenizer(pre.tokenizer.read_text(encoding="utf-8"),
                                f"{FIELD}: {pre.tokenizer}")
    _check_vocab(pre, tokenizer.vocab_size)
    if pre.arch == "GPT-2" and spec.data.seq_len > pre.positions:
        raise ConfigError(f"data.seq_len={spec.data.seq_len} exceeds the {pre.positions} "
                          f"learned positions (n_positions) of {FIELD}={where}")


def _same_file(given: str, tokenizer: Path) -> bool:
    """data.tokenizer names DIR's tokenizer.json, or a file of the same bytes."""
    if given in ("byte", "bpe"):
        return False
    p = Path(given).expanduser()
    try:
        return p.resolve() == tokenizer or p.read_bytes() == tokenizer.read_bytes()
    except OSError:
        return False


def model_vocab(spec: Any, tokenizer_vocab: int) -> int:
    """The model's vocabulary for a run whose tokenizer has `tokenizer_vocab` ids: the
    checkpoint's embedding rows rounded up to a multiple of parallel.tp with model.init_from,
    else the tokenizer's padded (raypar.data.tokenizer.padded_vocab)."""
    from raypar.data.tokenizer import padded_vocab
    tp = spec.parallel.tp
    if not spec.model.init_from:
        return padded_vocab(tokenizer_vocab, tp)
    pre = read_pretrained(spec.model.init_from)
    _check_vocab(pre, tokenizer_vocab)
    return -(-pre.vocab_rows // tp) * tp


def _check_vocab(pre: Pretrained, tokenizer_vocab: int) -> None:
    if tokenizer_vocab > pre.vocab_rows:
        raise ConfigError(f"{FIELD}: {pre.path}: its tokenizer has {tokenizer_vocab} ids, "
                          f"more than the {pre.vocab_rows} rows of its embedding")


def load_shards(module: Any, directory: str) -> None:
    """Fill every parameter of `module` (a GPT or a pipeline stage of one, its parameters
    plain tensors or DTensor shards of any placement) with the checkpoint's values at its
    local shard's indices. Rows no checkpoint tensor covers (the vocabulary rounded up to
    tp) and biases it lacks are zeros."""
    import torch
    from safetensors import safe_open

    from raypar.model import init_rules, local_shard
    pre = read_pretrained(directory)
    source: dict[str, tuple[HFTensor, Part]] = {}
    for t in pre.layout(module.cfg):
        for part in t.parts:
            source[part.name] = (t, part)
    rules = init_rules(module)  # a tied head takes the embedding's values (its key)
    handles: dict[str, Any] = {}
    try:
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.is_meta:
                    continue
                t, part = source[rules[name][1]]
                local, offset = local_shard(param)
                local.zero_()
                stored = stored_name(t.name, pre.files)
                if stored is None or local.numel() == 0:  # an optional bias it lacks
                    continue
                fname = pre.files[stored]
                if fname not in handles:
                    handles[fname] = safe_open(str(pre.path / fname), "pt")
                view = handles[fname].get_slice(stored)
                r0 = offset[0]
                cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
                for a, b, h in part.segments(r0, r0 + local.shape[0]):
                    rows = slice(h, h + b - a)
                    if t.transposed:  # stored (in, out): raypar's rows are its columns
                        values = view[cols + (rows,)].t()
                    else:
                        values = view[(rows,) + cols]
                    local[a - r0:b - r0].copy_(values)
    finally:
        handles.clear()
