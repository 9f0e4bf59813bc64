"""Write a consolidated GPT as a Hugging Face model directory that transformers loads.

    write_hf(model, tokenizer, Path("runs/t/export"))
    # then: AutoModelForCausalLM.from_pretrained("runs/t/export"), AutoTokenizer.from_pretrained(...)

raypar's model is, to the last operation, one of two transformers architectures:

- rope: GPT-NeoX with rotary over the whole head (partial_rotary_factor 1, base 10000,
  rotate-half, fp32 tables), a sequential residual (use_parallel_residual false), exact
  GELU, LayerNorm with norm_eps. q, k and v are one fused query_key_value there, laid out
  head by head as [q_h | k_h | v_h]. GPT-NeoX's MLP and norms always carry biases; a
  bias=false model writes zeros into them (exact), attention_bias follows model.bias.
- learned: GPT-2 with activation_function "gelu" (exact, where GPT-2's own is the tanh
  approximation); its Conv1D weights are stored (in, out), the transpose of nn.Linear's,
  and c_attn is [q | k | v] whole. GPT-2 always has biases: zeros for bias=false.

The vocabulary is cut to the tokenizer's size: raypar pads it (padded_vocab) with ids that
never occur in the data, and a user of the export should see, and sample from, the real
vocabulary's logits only. Cutting the embedding and LM head rows is exact for both: the
real ids' rows are untouched.

Which raypar parameter goes where is raypar/hf_names.py's table, which the import
(raypar/hf_import.py) reads the other way.

transformers itself is not needed to write the directory (it is not a dependency of
raypar): config.json, tokenizer_config.json and generation_config.json are plain JSON in
the fields transformers 5 reads; the tests load the result with transformers.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from raypar.config import ConfigError
from raypar.data.tokenizer import Tokenizer
from raypar.hf_names import ARCHITECTURES, ROPE_BASE, hf_layout
from raypar.model import GPT

# Above this many bytes of tensors the weights are split into model-0000i-of-0000n
# files with an index, as transformers writes them (its own default shard size).
MAX_SHARD_BYTES = 5 * 10**9

# Every model config field, and what it needs of the target architecture. A field not
# listed here (added to raypar later) must be mapped before a model using it exports.
_MAPPED_FIELDS = {"n_layer", "n_head", "d_model", "d_ff", "dropout", "bias", "tie_embeddings",
                  "pos_encoding", "vocab_size", "seq_len", "norm_eps"}

# The files an export directory holds; a directory holding anything else is not replaced.
_EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "model.safetensors", "model.safetensors.index.json")


def check_exportable(model_cfg: dict[str, Any]) -> str:
    """The transformers architecture a model config maps onto exactly, or a ConfigError."""
    unknown = sorted(set(model_cfg) - _MAPPED_FIELDS)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}={model_cfg[unknown[0]]!r} has no counterpart in "
                          f"transformers' GPT-NeoX or GPT-2; export with --format raypar")
    pos = model_cfg.get("pos_encoding", "rope")
    if pos not in ARCHITECTURES:
        raise ConfigError(f"model.pos_encoding={pos!r} maps onto no transformers architecture "
                          f"(rope: GPT-NeoX, learned: GPT-2); export with --format raypar")
    return ARCHITECTURES[pos]


def hf_config(model: GPT, tok: Tokenizer) -> dict[str, Any]:
    """config.json for `model` with the vocabulary cut to `tok`'s."""
    cfg = model.cfg
    arch = check_exportable(vars(cfg))
    dtype = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    common = {"vocab_size": tok.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id, "dtype": dtype,
              "use_cache": True, "initializer_range": 0.02}
    if arch == "GPT-NeoX":
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common,
                "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ff_dim,
                "hidden_act": "gelu", "max_position_embeddings": cfg.seq_len,
                "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": False,
                "attention_bias": cfg.bias, "attention_dropout": cfg.dropout,
                "hidden_dropout": cfg.dropout, "classifier_dropout": 0.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE,
                                    "partial_rotary_factor": 1.0},
                # The same, as transformers before rope_parameters read it (its default
                # rotary_pct, 0.25, would rotate a quarter of each head).
                "rotary_pct": 1.0, "rotary_emb_base": ROPE_BASE}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.ff_dim, "n_positions": cfg.seq_len,
            "activation_function": "gelu", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}


def hf_tensors(model: GPT, vocab: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) for every weight, the vocabulary cut to `vocab` rows, as
    raypar/hf_names.py lays them out. The fused, transposed and zero ones are copies: the
    export holds about twice the model in host memory at its peak (the consolidated model
    and what is written)."""
    cfg = model.cfg
    arch = check_exportable(vars(cfg))
    params = dict(model.named_parameters())
    for t in hf_layout(cfg, arch, vocab, cfg.seq_len):
        if len(t.parts) == 1 and not t.parts[0].offset:  # one parameter's first rows
            value = params[t.parts[0].name][:t.shape[0]]
        else:
            dtype = model.tok_emb.weight.dtype
            value = torch.zeros(t.shape, dtype=dtype)
            for part in t.parts:
                p = params[part.name]
                for a, b, h in part.segments(0, p.shape[0]):
                    value[h:h + b - a] = p[a:b]
        yield t.name, (value.t() if t.transposed else value)


def tokenizer_config(tok: Tokenizer, seq_len: int) -> dict[str, Any]:
    """tokenizer_config.json: the end-of-text token is eos (and bos, as GPT-2 has it)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eot_token,
            "bos_token": tok.eot_token, "model_max_length": seq_len,
            "clean_up_tokenization_spaces": False, "add_prefix_space": False,
            # raypar's byte encoder reads the text "<|endoftext|>" as its bytes; transformers
            # does the same with this set (a bpe tokenizer matches it, in raypar too).
            "split_special_tokens": tok.kind == "byte"}


def _shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most max_bytes each (a bigger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells (os.umask sets it
    too, which another thread could see for an instant)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_mode(path: Path) -> None:
    """The mode a file made with open() gets (0644 under the usual umask): safetensors
    creates its files 0600, which would hide an export from the group."""
    os.chmod(path, 0o666 & ~_umask())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_out_dir(out: Path) -> None:
    """Refuse an output directory that is a file, or holds files an export does not write
    (replacing it would delete them), in one line naming --out."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give the directory to write "
                          f"(or --format raypar for one file)")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FILES
                         and not (p.name.startswith("model-") and p.name.endswith(".safetensors")))
        if foreign:
            raise ConfigError(f"--out: {out} holds {foreign[0]}, which is not an export's; "
                              f"choose another directory")


def write_hf(model: GPT, tok: Tokenizer, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the transformers directory `out` (replacing an earlier export there).

    Written into a sibling temporary directory, then renamed into place: a failed or
    killed export never leaves a half-written directory where transformers would read
    it. Files and the directory get the modes the umask gives new files (0644 / 0755
    usually): os.mkdir, not mkdtemp, whose 0700 would hide the export from the group.
    """
    config = hf_config(model, tok)
    vocab = tok.vocab_size
    out = Path(out)
    check_out_dir(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        with torch.no_grad():
            tensors = [(name, t.detach().to("cpu").contiguous())
                       for name, t in hf_tensors(model, vocab)]
        groups = _shards(tensors, max_shard_bytes)
        by_name = dict(tensors)
        metadata = {"format": "pt"}  # transformers refuses a safetensors file without it
        if len(groups) == 1:
            save_file(by_name, str(tmp / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for k, names in enumerate(groups, 1):
                fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                save_file({n: by_name[n] for n in names}, str(tmp / fname), metadata=metadata)
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            _write_json(tmp / "model.safetensors.index.json",
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
                     # no padding token of its own: batched generate pads with eos
                     "pad_token_id": tok.eot_id})
        hf_tok = tok.to_hf()
        hf_tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, model.cfg.seq_len))
        for f in tmp.glob("*.safetensors"):
            give_usual_mode(f)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk its own way
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)
        reason = getattr(e, "strerror", None) or str(e).strip() or type(e).__name__
        raise ConfigError(f"--out: cannot write {out} ({reason})") from None
    shutil.rmtree(old, ignore_errors=True)
    return out
