"""Where each raypar parameter lives in a Hugging Face checkpoint, in both directions.

    for t in hf_layout(cfg, "GPT-NeoX", vocab=50304, positions=2048):
        t.name, t.shape, t.transposed, t.parts   # one transformers tensor

One table serves the export (raypar/hf_export.py writes each transformers tensor from the
raypar parameters its parts name) and the import (raypar/hf_import.py fills each raypar
parameter, or one rank's shard of it, from the rows of the transformers tensor it lives in).

A transformers tensor is described in raypar's orientation, (out, in) as nn.Linear holds
it; `transposed` says it is stored (in, out) (GPT-2's Conv1D). Each part maps rows of one
raypar parameter onto its rows:

- plain: raypar row r is row r + offset (GPT-2's c_attn holds q, k, v whole, one after the
  other; an embedding or LM head keeps its first `rows` rows: the vocabulary cut or padded)
- per head: GPT-NeoX's query_key_value is laid out head by head as [q_h | k_h | v_h], so
  raypar row h * head_dim + j of q, k or v (k = 0, 1, 2) is row h * 3 * head_dim +
  k * head_dim + j.

A tensor without parts is zeros (a bias the transformers architecture always has and a
raypar model without biases does not). This module is torch-free: the driver reads it
before torch is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

# raypar.model.rope_cos_sin's base
ROPE_BASE = 10000.0
ARCHITECTURES = {"rope": "GPT-NeoX", "learned": "GPT-2"}


@dataclass(frozen=True)
class Part:
    """Rows [0, rows) of raypar parameter `name` inside a transformers tensor."""
    name: str
    rows: int
    offset: int = 0
    head_dim: int = 0  # > 0: GPT-NeoX's per-head layout, offset = k * head_dim

    def segments(self, r0: int, r1: int) -> Iterator[tuple[int, int, int]]:
        """(a, b, h): raypar rows [a, b) of [r0, r1) are transformers rows [h, h + b - a).
        Rows at or past `rows` are in no segment (the padded vocabulary's)."""
        r1 = min(r1, self.rows)
        if r0 >= r1:
            return
        if not self.head_dim:
            yield r0, r1, r0 + self.offset
            return
        hd = self.head_dim
        for head in range(r0 // hd, (r1 - 1) // hd + 1):
            a, b = max(r0, head * hd), min(r1, (head + 1) * hd)
            yield a, b, head * 3 * hd + self.offset + (a - head * hd)


@dataclass(frozen=True)
class HFTensor:
    name: str
    shape: tuple[int, ...]  # raypar's orientation: (out, in)
    parts: tuple[Part, ...] = ()
    transposed: bool = False  # stored as (in, out)
    optional: bool = False  # a checkpoint may lack it (then it is zeros)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transposed else self.shape


def hf_layout(cfg: Any, arch: str, vocab: int, positions: int) -> list[HFTensor]:
    """Every transformers tensor of `cfg`'s model (a GPTConfig, or anything with its fields)
    as `arch` ("GPT-NeoX" or "GPT-2") holds it, with `vocab` embedding (and untied head)
    rows and, for GPT-2, `positions` position rows."""
    d, hd, ff = cfg.d_model, cfg.d_model // cfg.n_head, cfg.d_ff or 4 * cfg.d_model
    neox = arch == "GPT-NeoX"
    out: list[HFTensor] = []

    def add(name: str, shape: tuple[int, ...], *parts: Part, transposed: bool = False,
            optional: bool = False) -> None:
        out.append(HFTensor(name, shape, tuple(parts), transposed, optional))

    def whole(raypar: str, rows: int) -> Part:
        return Part(raypar, rows)

    def linear(hf: str, raypar: str, rows: int, cols: int) -> None:
        """A weight and its bias (zeros where raypar has none)."""
        add(f"{hf}.weight", (rows, cols), whole(f"{raypar}.weight", rows), transposed=not neox)
        add(f"{hf}.bias", (rows,), *([whole(f"{raypar}.bias", rows)] if cfg.bias else []))

    def norm(hf: str, raypar: str) -> None:
        add(f"{hf}.weight", (d,), whole(f"{raypar}.weight", d))
        add(f"{hf}.bias", (d,), *([whole(f"{raypar}.bias", d)] if cfg.bias else []))

    base = "gpt_neox." if neox else "transformer."
    add(base + ("embed_in.weight" if neox else "wte.weight"), (vocab, d),
        whole("tok_emb.weight", vocab))
    if not neox:
        add("transformer.wpe.weight", (positions, d), whole("pos_emb.weight", cfg.seq_len))
    for i in range(cfg.n_layer):
        r = f"layers.{i}."
        qkv = ("wq", "wk", "wv")
        if neox:
            p = f"{base}layers.{i}."
            norm(p + "input_layernorm", r + "attn_norm")
            norm(p + "post_attention_layernorm", r + "mlp_norm")
            add(p + "attention.query_key_value.weight", (3 * d, d),
                *(Part(f"{r}attn.{w}.weight", d, k * hd, hd) for k, w in enumerate(qkv)))
            # attention_bias follows model.bias (GPT-NeoX's MLP and norms always have biases)
            if cfg.bias:
                add(p + "attention.query_key_value.bias", (3 * d,),
                    *(Part(f"{r}attn.{w}.bias", d, k * hd, hd) for k, w in enumerate(qkv)),
                    optional=True)
            add(p + "attention.dense.weight", (d, d), whole(f"{r}attn.wo.weight", d))
            if cfg.bias:
                add(p + "attention.dense.bias", (d,), whole(f"{r}attn.wo.bias", d),
                    optional=True)
            linear(p + "mlp.dense_h_to_4h", r + "mlp.fc", ff, d)
            linear(p + "mlp.dense_4h_to_h", r + "mlp.proj", d, ff)
        else:
            p = f"transformer.h.{i}."
            norm(p + "ln_1", r + "attn_norm")
            norm(p + "ln_2", r + "mlp_norm")
            add(p + "attn.c_attn.weight", (3 * d, d),
                *(Part(f"{r}attn.{w}.weight", d, k * d) for k, w in enumerate(qkv)),
                transposed=True)
            add(p + "attn.c_attn.bias", (3 * d,),
                *(Part(f"{r}attn.{w}.bias", d, k * d) for k, w in enumerate(qkv) if cfg.bias))
            linear(p + "attn.c_proj", r + "attn.wo", d, d)
            linear(p + "mlp.c_fc", r + "mlp.fc", ff, d)
            linear(p + "mlp.c_proj", r + "mlp.proj", d, ff)
    norm("gpt_neox.final_layer_norm" if neox else "transformer.ln_f", "norm")
    if not cfg.tie_embeddings:  # tied: transformers ties lm_head to the embedding itself
        # GPT-NeoX's own name for its head is embed_out (transformers before 5.13, vLLM,
        # every Pythia checkpoint); later transformers renames it to lm_head as it loads.
        add("embed_out.weight" if neox else "lm_head.weight", (vocab, d),
            whole("lm_head.weight", vocab))
    return out
