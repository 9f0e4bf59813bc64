"""A GPT decoder in plain PyTorch: no parallel code lives here.

    model = GPT(GPTConfig(vocab_size=256, seq_len=128)); loss = lm_loss(model(x), y)

Parallel files reshape this model by module name: tensor parallelism shards
`layers.<i>.attn.w{q,k,v,o}` and `layers.<i>.mlp.{fc,proj}`, and a pipeline
stage deletes entries of `layers` or sets `tok_emb` / `norm` / `lm_head` to
None. `forward` copes with both, so every layout runs this same code.

`generate` decodes with a KV cache (`KVCache`, passed as `forward(idx, kv_cache=...)`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raypar.config import ModelArch


@dataclass(kw_only=True)
class GPTConfig(ModelArch):
    """The model's own config: the architecture fields of the run config's `model` section
    (raypar.config.ModelArch, where every field is documented) and what the data decides."""
    vocab_size: int
    """Number of token ids; the LM head predicts one logit per id."""
    seq_len: int
    """Maximum context length."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""

    def __post_init__(self):
        if self.pos_encoding not in ("rope", "learned"):
            raise ValueError(f"pos_encoding must be 'rope' or 'learned', got {self.pos_encoding!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got d_model/n_head = {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        """The MLP hidden width with the `d_ff == 0` default resolved."""
        return self.d_ff or 4 * self.d_model


def rope_cos_sin(seq_len: int, head_dim: int, device=None, base: float = 10000.0):
    """cos and sin tables of shape (seq_len, head_dim // 2) for positions 0..seq_len-1.

    Computed on the fly (cheap) rather than cached, so a model built on the meta
    device needs no buffer to be recomputed after it is materialized.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) `x` by position, rotate-half layout, in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for the positions seen so far, for generation.

        cache = KVCache(max_len=cfg.seq_len)
        logits = model(prompt, kv_cache=cache)         # prefill: positions 0..T-1
        logits = model(next_token, kv_cache=cache)     # position T, attends to 0..T

    Buffers of (B, heads, max_len, head_dim) are allocated on a layer's first
    append, in the dtype and on the device of its keys; `pos` is how many
    positions they hold, advanced by GPT.forward after all layers ran.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def layer(self, name: str) -> "LayerKV":
        return LayerKV(self, name)


class LayerKV:
    """One layer's view of a KVCache."""

    def __init__(self, cache: KVCache, name: str):
        self.cache, self.name = cache, name

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, D) keys and values at the cache's position; return all so far."""
        c, T = self.cache, k.shape[2]
        end = c.pos + T
        if end > c.max_len:
            raise ValueError(f"KV cache holds {c.max_len} positions, {end} needed")
        if self.name not in c.keys:
            shape = (k.shape[0], k.shape[1], c.max_len, k.shape[3])
            c.keys[self.name] = k.new_empty(shape)
            c.values[self.name] = v.new_empty(shape)
        kbuf, vbuf = c.keys[self.name], c.values[self.name]
        kbuf[:, :, c.pos:end] = k
        vbuf[:, :, c.pos:end] = v
        return kbuf[:, :, :end], vbuf[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope=None, kv: "LayerKV | None" = None) -> torch.Tensor:
        B, T, _ = x.shape
        # The head count comes from the projection, so a tensor-parallel shard
        # holding n_head / tp heads runs this code unchanged.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, True
        if kv is not None:
            start = kv.cache.pos
            k, v = kv.append(k, v)  # every position so far, this chunk's last
            if start > 0:
                causal = False
                if T > 1:  # query i (absolute start+i) sees keys 0..start+i
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_drop(self.wo(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope=None, kv: "LayerKV | None" = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, kv)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict, not a ModuleList: a pipeline stage deletes the layers it
        # does not own and the rest keep their global names (checkpoint keys).
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialize every parameter, GPT-2 style, from `seed` (default: the seed
        torch's global generator was last given, so `torch.manual_seed(s); GPT(cfg)` works).

        Each parameter's values are a function of (seed, its global name, its full shape)
        alone (`keyed_init_`), so a pipeline stage, a tensor-parallel shard or an FSDP
        shard built on the meta device and materialized with `to_empty()` gets exactly
        the values the single-process model has at those indices, and allocates nothing
        more than its own share. Parameters still on the meta device are skipped.
        Also re-ties the LM head where this module holds both ends (to_empty unties).
        """
        cfg = self.cfg
        if cfg.tie_embeddings and self.tok_emb is not None and self.lm_head is not None:
            self.lm_head.weight = self.tok_emb.weight
        seed = torch.initial_seed() if seed is None else seed
        rules = init_rules(self)
        for name, param in self.named_parameters():
            keyed_init_(param, *rules[name], seed=seed)

    def forward(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab).

        A pipeline stage without `tok_emb` takes hidden states (B, T, d_model)
        instead; one without `norm` / `lm_head` returns hidden states.

        With `kv_cache` the T tokens sit at positions kv_cache.pos .. pos+T-1 and
        attend to the cached positions before them; the cache then advances by T.
        """
        T = idx.shape[1]
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence length {start + T} exceeds seq_len {self.cfg.seq_len}")
        if self.tok_emb is not None:
            x = self.tok_emb(idx)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
            x = self.drop(x)
        else:
            x = idx
        rope = None
        if self.cfg.pos_encoding == "rope":
            cos, sin = rope_cos_sin(start + T, self.cfg.head_dim, device=x.device)
            rope = (cos[start:], sin[start:])
        for name, layer in self.layers.items():
            if kv_cache is None:
                x = layer(x, rope)
            else:
                x = layer(x, rope, kv_cache.layer(name))
        if kv_cache is not None:
            kv_cache.pos = start + T
        if self.norm is not None:
            x = self.norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters this module holds, a tied weight counted once.

        With `exclude_embeddings`, tok_emb and pos_emb tables are left out (with
        tied embeddings that also leaves out the LM head, which is the same tensor).
        """
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for emb in (self.tok_emb, self.pos_emb):
                if emb is not None:
                    params.pop(id(emb.weight), None)
        return sum(p.numel() for p in params.values())

    def flops_per_token(self) -> int:
        """Training FLOPs per token of the whole model: `flops_per_token(self.cfg)`. Uses
        the config, so a pipeline stage reports the full model's figure."""
        return flops_per_token(self.cfg)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); temperature 0 is greedy.

        Runs in eval mode (no dropout) and restores the previous mode afterwards.
        With the KV cache (default) the prompt is run once (prefill) and each new
        token costs one position. Once the sequence is longer than seq_len, every
        further step recomputes over the last seq_len tokens without the cache,
        as the cacheless path always does: the window slides by one token per step,
        so every position, and with it every cached key, changes. Results equal
        `use_cache=False` (up to float rounding in the logits).
        """
        was_training = self.training
        self.eval()
        seq_len = self.cfg.seq_len
        try:
            cache, logits = None, None
            if use_cache and idx.shape[1] < seq_len:
                cache = KVCache(min(seq_len, idx.shape[1] + max_new_tokens))
                logits = self(idx, kv_cache=cache)[:, -1, :]
            for i in range(max_new_tokens):
                if logits is None:
                    logits = self(idx[:, -seq_len:])[:, -1, :]
                nxt = self._sample(logits.float(), temperature, top_k, generator)
                idx = torch.cat((idx, nxt), dim=1)
                logits = None
                if cache is not None and i + 1 < max_new_tokens:
                    if idx.shape[1] <= cache.max_len:
                        logits = self(nxt, kv_cache=cache)[:, -1, :]
                    else:
                        cache = None  # past seq_len: recompute from here on
        finally:
            self.train(was_training)
        return idx

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
        """One token id per row of (B, vocab) logits: greedy at temperature 0."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


# Elements per keyed draw in `keyed_init_`: a rank materializing its shard generates at
# most this much beyond the shard at a time, whatever the parameter's size. Changing it
# changes every initial value (all layouts alike).
_INIT_CHUNK = 1 << 16


def init_rules(model: "GPT") -> dict[str, tuple[str, str, float]]:
    """{parameter name: (kind, key, std)} for every parameter `model` holds (a pipeline
    stage holds some). kind is "normal", "zeros" or "ones"; key is the global name whose
    values it takes (a stage's own copy of a tied LM head takes the embedding's)."""
    cfg = model.cfg
    small_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # residual projections (GPT-2): the
    # residual stream's variance does not grow with depth
    rules: dict[str, tuple[str, str, float]] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, nn.Linear):
            std = small_std if mname.endswith((".attn.wo", ".mlp.proj")) else 0.02
            key = "tok_emb.weight" if mname == "lm_head" and cfg.tie_embeddings else prefix + "weight"
            rules[prefix + "weight"] = ("normal", key, std)
            if module.bias is not None:
                rules[prefix + "bias"] = ("zeros", prefix + "bias", 0.0)
        elif isinstance(module, nn.Embedding):
            rules[prefix + "weight"] = ("normal", prefix + "weight", 0.02)
        elif isinstance(module, nn.LayerNorm):
            rules[prefix + "weight"] = ("ones", prefix + "weight", 0.0)
            if module.bias is not None:
                rules[prefix + "bias"] = ("zeros", prefix + "bias", 0.0)
    return rules


def _key_seed(seed: int, key: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def local_shard(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(this rank's local tensor, its offset in the full tensor) for a plain tensor or a
    DTensor shard of any placement. The offset is DTensor's own
    `compute_local_shape_and_global_offset` (the one DCP uses), which knows
    FSDP-over-tensor-parallel's strided sharding."""
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
        return param.to_local(), tuple(offset)
    return param, (0,) * param.dim()


@torch.no_grad()
def keyed_init_(param: torch.Tensor, kind: str, key: str, std: float, seed: int) -> None:
    """Fill `param` (a plain tensor or a DTensor shard of any placement) in place.

    "normal" values are drawn in runs of whole rows along dim 0 (up to `_INIT_CHUNK`
    elements), each run from a generator keyed by (seed, key, run index): the full
    tensor is the same whoever builds it, and a shard draws only the runs that overlap
    its rows, then keeps its own columns. A shard's place in the full tensor is
    `local_shard`'s.
    """
    if param.is_meta:
        return
    local, offset = local_shard(param)
    if kind != "normal":
        local.fill_(1.0 if kind == "ones" else 0.0)
        return
    if local.numel() == 0:
        return
    full = tuple(param.shape)
    row = math.prod(full[1:])
    per = max(1, _INIT_CHUNK // max(row, 1))
    r0, r1 = offset[0], offset[0] + local.shape[0]
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    for run in range(r0 // per, (r1 + per - 1) // per):
        a, b = run * per, min((run + 1) * per, full[0])
        gen = torch.Generator().manual_seed(_key_seed(seed, key, run))
        values = torch.empty((b - a,) + full[1:]).normal_(0.0, std, generator=gen)
        lo, hi = max(a, r0), min(b, r1)
        local[lo - r0:hi - r0].copy_(values[(slice(lo - a, hi - a),) + inner])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position, computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def param_count(cfg: GPTConfig) -> int:
    """Closed-form parameter count; equals `GPT(cfg).num_params()`."""
    d, f, b = cfg.d_model, cfg.ff_dim, int(cfg.bias)
    norm = d + b * d
    attn = 4 * (d * d + b * d)
    mlp = d * f + b * f + f * d + b * d
    per_layer = 2 * norm + attn + mlp
    total = cfg.vocab_size * d + cfg.n_layer * per_layer + norm
    if cfg.pos_encoding == "learned":
        total += cfg.seq_len * d
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * d
    return total


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward) of the model cfg describes, counted
    as PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's MFU estimate count them:

        6 * N + 12 * n_layer * d_model * seq_len

    6 * N: 2 FLOPs per weight in the forward matmuls and 4 in the backward. N is every
    parameter but the token and position embedding tables (lookups, not matmuls), with
    the LM head counted even when it is tied to the token embedding; norm weights and
    biases are in N too (a rounding error, as in PaLM). The second term is attention's
    two products over the context, Q K^T and scores x V: 2 * 2 * seq_len * d_model FLOPs
    per layer forward, three times that forward + backward. Softmax, GELU and the norms'
    own arithmetic are not counted.
    """
    d = cfg.d_model
    tables = cfg.vocab_size * d + (cfg.seq_len * d if cfg.pos_encoding == "learned" else 0)
    lm_head = cfg.vocab_size * d
    n = param_count(cfg) - tables + (lm_head if cfg.tie_embeddings else 0)
    return 6 * n + 12 * cfg.n_layer * d * cfg.seq_len


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; biases, norm weights and embedding tables do not.

    Embeddings are found by module type, so this works on a wrapped model (DDP)
    too; a tied LM head weight is the embedding table and is listed once.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a shared tensor once
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
