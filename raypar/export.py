"""Export a trained model for transformers, or to one raypar safetensors file, and load
the latter back for generation.

    export("runs/t")                              # newest valid checkpoint -> runs/t/export/ (HF)
    path = export("runs/t", format="raypar")      # -> runs/t/export.safetensors
    model, meta = load_exported(path)             # GPT in eval mode; meta["tokenizer"] is its JSON

The Hugging Face directory (raypar/hf_export.py) is what AutoModelForCausalLM and
AutoTokenizer load. The rest of this page is about the raypar-native file.

The checkpoint may have been saved by any layout (dp, tp, pp, FSDP): DCP
reshards by global parameter names, so loading it into a plain full GPT in one
process consolidates it. The file is self-contained: its safetensors metadata
(a str -> str header) holds the model config JSON (`raypar.model`), the
tokenizer JSON (`raypar.tokenizer`), the train state JSON (`raypar.train_state`)
and the source checkpoint (`raypar.source`). Nothing is written beside it.

Reading a safetensors file runs no code: the format is a JSON header and raw
tensor bytes. With tied embeddings the LM head is not stored (it is the token
embedding); loading re-ties it.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from raypar.config import ConfigError, load_spec, model_config
from raypar.data.tokenizer import Tokenizer, parse_tokenizer
from raypar.hf_import import model_vocab
from raypar.hf_export import (MAX_SHARD_BYTES, check_exportable, check_out_dir, give_usual_mode,
                              write_hf)
from raypar.model import GPT, GPTConfig
from raypar.train import checkpoint as ckpt
from raypar.train import storage
from raypar.train.safe_dcp import UnsafeCheckpoint
from raypar.train.rundir import RunDir

log = logging.getLogger("raypar")

KEY_MODEL = "raypar.model"
KEY_TOKENIZER = "raypar.tokenizer"
KEY_TRAIN_STATE = "raypar.train_state"
KEY_SOURCE = "raypar.source"

PathLike = Union[str, Path]


def _first_line(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: one error per rank
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Sizes a model config must give as positive integers (d_ff may be 0: 4 * d_model).
_POSITIVE = ("n_layer", "n_head", "d_model", "vocab_size", "seq_len")
_TYPE_NAMES = {int: "an integer", float: "a finite number", bool: "true or false",
               str: "a string"}


def _bad_value(key: str, value: Any, typ: type) -> Optional[str]:
    """Why `value` cannot be model config field `key` of type `typ`, or None."""
    if typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    else:  # JSON true is a Python bool, which is also an int: only a bool field takes it
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
    if not ok:
        return f"{key}={value!r} is not {_TYPE_NAMES[typ]}"
    if (key in _POSITIVE and value <= 0) or (key == "d_ff" and value < 0):
        return f"{key}={value!r} must be {'> 0' if key in _POSITIVE else '>= 0'}"
    if (key == "dropout" and not 0 <= value < 1) or (key == "norm_eps" and value <= 0):
        return f"{key}={value!r} is out of range"
    return None


def check_model_config(model_cfg: Any, where: str) -> None:
    """Refuse a model config (read from a file) whose keys or value types are not GPTConfig's,
    before anything is built from it: a string where a size belongs, a negative width."""
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{where}: the model config is a {type(model_cfg).__name__}, "
                          f"expected a JSON object")
    hints = get_type_hints(GPTConfig)
    for key, value in model_cfg.items():
        if key not in hints:
            raise ConfigError(f"{where}: invalid model config (unknown key {key!r})")
        problem = _bad_value(key, value, hints[key])
        if problem:
            raise ConfigError(f"{where}: invalid model config ({problem})")


def model_from_config(model_cfg: dict[str, Any], where: str, device: str = "cpu") -> GPT:
    """A freshly initialized GPT for a config dict; a bad dict is a ConfigError naming `where`.
    On device "meta" it holds only names and shapes: nothing is allocated."""
    check_model_config(model_cfg, where)
    try:
        with torch.device(device):
            return GPT(GPTConfig(**model_cfg))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: invalid model config ({_first_line(e)})") from None


def run_model_config(run_dir: PathLike) -> Optional[dict[str, Any]]:
    """The model config a run directory's config.yaml and tokenizer.json describe (what
    training built), or None when the directory lacks them."""
    rd = RunDir(run_dir)
    if not rd.config.is_file() or not rd.tokenizer.is_file():
        return None
    spec = load_spec(rd.config)
    vocab = model_vocab(spec, Tokenizer.from_file(rd.tokenizer).vocab_size)
    return dict(vars(model_config(spec, vocab)))


def find_checkpoint(run_dir: Optional[PathLike], checkpoint: Optional[PathLike]) -> PathLike:
    """`checkpoint` if given (it must verify), else the newest valid one under run_dir."""
    if checkpoint is not None:
        reason = ckpt.verify(checkpoint)
        if reason is not None:
            raise ConfigError(f"--checkpoint: {checkpoint} is not a valid checkpoint ({reason})")
        return checkpoint
    if run_dir is None:
        raise ConfigError("give a run directory or --checkpoint")
    if not storage.is_uri(run_dir) and not Path(run_dir).is_dir():
        raise ConfigError(f"no such directory: {run_dir}")
    path = ckpt.latest_valid(run_dir, log)
    if path is None:
        raise ConfigError(f"{run_dir}: no checkpoint that verifies there")
    return path


def consolidate(path: PathLike) -> tuple[GPT, dict[str, Any]]:
    """Load a checkpoint (any layout) into one plain full GPT; returns it and its meta."""
    try:
        meta = ckpt.read_meta(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read meta.json ({_first_line(e)})") from None
    model = model_from_config(meta.get("model") or {}, f"{path}/meta.json")
    check_tokenizer(meta.get("tokenizer"), vars(model.cfg), f"{path}/meta.json: its tokenizer")
    try:
        ckpt.load_model_state(path, model)
    except UnsafeCheckpoint:
        raise  # its own line: what the file asked for
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise ConfigError(f"{path}: the saved tensors do not fit the model its meta.json "
                          f"describes ({_first_line(e)})") from None
    return model.eval(), meta


def save_safetensors(model: GPT, meta: dict[str, Any], out: PathLike,
                     train_state: Optional[dict[str, Any]] = None, source: str = "") -> Path:
    """Write model's weights and config + tokenizer metadata to `out` (atomically)."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # the same tensor as tok_emb.weight; safetensors stores no aliases
        tensors[name] = t.detach().to("cpu").contiguous()
    metadata = {"format": "pt", KEY_MODEL: json.dumps(vars(model.cfg), sort_keys=True),
                KEY_TOKENIZER: meta.get("tokenizer", ""),
                KEY_TRAIN_STATE: json.dumps(train_state or {}, sort_keys=True),
                KEY_SOURCE: source}
    out = Path(out)
    check_out(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        give_usual_mode(tmp)
        os.replace(tmp, out)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk its own way
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
        raise ConfigError(f"--out: cannot write {out} ({reason})") from None
    return out


def check_out(out: Path) -> None:
    """Refuse an output file that cannot be written, in one line naming --out."""
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory; give the file to write")
    probe = out.with_name(f".{out.name}.{os.getpid()}.probe")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out: cannot write {out} ({e.strerror or type(e).__name__})") from None


FORMATS = ("hf", "raypar")


def export(run_dir: Optional[PathLike] = None, checkpoint: Optional[PathLike] = None,
           out: Optional[PathLike] = None, format: str = "hf",
           max_shard_bytes: int = MAX_SHARD_BYTES, log_model: bool = False) -> Path:
    """Consolidate a checkpoint into a Hugging Face directory (format "hf") or one raypar
    safetensors file (format "raypar"); returns its path.

    The checkpoint is `checkpoint`, else the newest valid one under run_dir. When
    run_dir holds the run's config.yaml, the checkpoint must match it
    (ConfigError naming the fields otherwise). out defaults to run_dir/export/ (hf) or
    run_dir/export.safetensors (raypar). The hf weights are split into files of at most
    max_shard_bytes, with an index, when they are larger. With log_model, an hf export of
    a local run directory whose run has an MLflow run (mlflow.json) is logged as that
    run's MLflow model (raypar/train/tracking.py `log_export`); a store that fails then
    costs a warning, not the export.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    path = find_checkpoint(run_dir, checkpoint)
    if out is None:
        if run_dir is None or storage.is_uri(run_dir):
            raise ConfigError("--out: needed when there is no local run directory")
        out = RunDir(run_dir).export if format == "hf" else RunDir(run_dir).export_raypar
    out = Path(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        # Before the consolidation's work: where it goes, and (hf) that the model maps.
        if format == "hf":
            check_out_dir(out)
            try:
                saved_model = ckpt.read_meta(path).get("model") or {}
            except (OSError, ValueError):
                saved_model = {}  # consolidate names the unreadable meta.json
            check_model_config(saved_model, f"{path}/meta.json")
            check_exportable(saved_model)
        else:
            check_out(out)
        if run_dir is not None and not storage.is_uri(run_dir):
            expected = run_model_config(run_dir)
            if expected is not None:
                ckpt.check_compatible(ckpt.read_meta(path), expected)
        model, meta = consolidate(path)
        if format == "hf":
            tok = parse_tokenizer(meta.get("tokenizer") or "", f"{path}/meta.json: its tokenizer")
            write_hf(model, tok, out, max_shard_bytes)
            if log_model and run_dir is not None and not storage.is_uri(run_dir):
                _log_model(Path(run_dir), out, path)
            return out
        train_state = ckpt.read_train_state(path)
        return save_safetensors(model, meta, out, train_state, source=str(path))
    except BaseException:
        for folder in created:  # what check_out made, innermost first: nothing left behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _log_model(run_dir: Path, out: Path, checkpoint: PathLike) -> None:
    from raypar.train import tracking
    try:
        uri = tracking.log_export(run_dir, out, ckpt.step_of(checkpoint), str(checkpoint))
    except Exception as e:  # noqa: BLE001 - MLflow and its stores raise many kinds
        log.warning("the export is not logged to MLflow: %s", _first_line(e))
        return
    if uri is not None:  # (log_model is the CLI's: it prints its lines)
        run_id = json.loads(RunDir(run_dir).mlflow_record.read_text())["run_id"]
        print(f"MLflow model: {uri}, the model of run {run_id} (register it with "
              f"mlflow.register_model(\"runs:/{run_id}/model\", NAME))")


def _read_header(path: PathLike) -> tuple[dict[str, str], dict[str, tuple[str, tuple]]]:
    """(metadata, {tensor name: (dtype, shape)}) of a safetensors file; no tensor is read.
    The library checks that the header's offsets exactly cover the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return (f.metadata() or {},
                    {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()})
    except Exception as e:  # SafetensorError and OSError for unreadable or foreign files
        raise ConfigError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _exported_meta(path: PathLike, metadata: dict[str, str]) -> dict[str, Any]:
    """{"model", "tokenizer", "train_state"} from an exported file's metadata, each checked
    to be what raypar writes there: a tampered entry is one line naming the file and key."""
    if KEY_MODEL not in metadata or KEY_TOKENIZER not in metadata:
        raise ConfigError(f"{path}: not a raypar export (no {KEY_MODEL} / {KEY_TOKENIZER} metadata)")
    parsed = {}
    for key, default in ((KEY_MODEL, None), (KEY_TRAIN_STATE, "{}")):
        try:
            parsed[key] = json.loads(metadata.get(key) or default)
        except ValueError:
            raise ConfigError(f"{path}: {key} metadata is not JSON") from None
    if not isinstance(parsed[KEY_TRAIN_STATE], dict):
        raise ConfigError(f"{path}: {KEY_TRAIN_STATE} metadata is not a JSON object")
    model_cfg = parsed[KEY_MODEL]
    check_model_config(model_cfg, f"{path}: {KEY_MODEL} metadata")
    check_tokenizer(metadata[KEY_TOKENIZER], model_cfg, f"{path}: {KEY_TOKENIZER} metadata")
    return {"model": model_cfg, "tokenizer": metadata[KEY_TOKENIZER],
            "train_state": parsed[KEY_TRAIN_STATE]}


def check_tokenizer(text: Any, model_cfg: dict[str, Any], where: str) -> None:
    """The tokenizer JSON beside a model must parse, and its ids must fit the model's
    vocabulary (a larger one would index past the embedding when generating)."""
    tok = parse_tokenizer(text if isinstance(text, str) else "", where)
    vocab = model_cfg.get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise ConfigError(f"{where}: the tokenizer has {tok.vocab_size} ids but the model's "
                          f"vocab_size is {vocab}")


def _expected_tensors(path: PathLike, model_cfg: dict[str, Any],
                      n_stored: int) -> dict[str, torch.Tensor]:
    """What the config needs stored, as meta tensors (names and shapes, no memory)."""
    n_layer = model_cfg.get("n_layer", GPTConfig.__dataclass_fields__["n_layer"].default)
    if n_layer > n_stored:  # every layer stores tensors: refuse before building n_layer blocks
        raise ConfigError(f"{path}: {KEY_MODEL} metadata claims n_layer={n_layer} but the "
                          f"file holds {n_stored} tensors")
    model = model_from_config(model_cfg, f"{path}: {KEY_MODEL} metadata", device="meta")
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


# Tensor dtypes (safetensors' names) that copy into the model's float weights.
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _check_header(path: PathLike, header: dict[str, tuple[str, tuple]],
                  expected: dict[str, torch.Tensor]) -> None:
    """Names, shapes and dtypes in the header against the config, before any allocation."""
    problems = [f"missing {k}" for k in expected if k not in header]
    problems += [f"unexpected {k}" for k in header if k not in expected]
    for k, v in expected.items():
        if k not in header:
            continue
        dtype, shape = header[k]
        if shape != tuple(v.shape):
            problems.append(f"{k} has shape {shape}, config needs {tuple(v.shape)}")
        elif dtype not in _FLOAT_DTYPES:
            problems.append(f"{k} has dtype {dtype}, expected one of {', '.join(_FLOAT_DTYPES)}")
    if problems:
        raise ConfigError(f"{path}: tensors do not match its model config: "
                          + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def load_exported(path: PathLike) -> tuple[GPT, dict[str, Any]]:
    """A GPT (eval mode) from an exported file, and {"model", "tokenizer", "train_state"}.

    Only the safetensors format is read: no pickle, no code. The metadata, and the
    header's tensor names, shapes and dtypes, are checked against the recorded config
    before the model is built or a tensor read: a tampered file is a ConfigError naming
    it, and allocates nothing the file does not hold.
    """
    metadata, header = _read_header(path)
    meta = _exported_meta(path, metadata)
    expected = _expected_tensors(path, meta["model"], len(header))
    _check_header(path, header, expected)
    model = model_from_config(meta["model"], str(path))
    params = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
            for k in expected:  # one at a time: never the whole file twice in memory
                params[k].copy_(f.get_tensor(k))
    except Exception as e:  # the file changed since its header was read
        raise ConfigError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    return model.eval(), meta
