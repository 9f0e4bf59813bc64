"""Unit tests of the plain GPT model: python -m pytest -q tests/test_model.py"""
import math

import pytest
import torch
import torch.nn as nn

from raypar.model import GPT, GPTConfig, flops_per_token, lm_loss, param_count, param_groups

V, T = 61, 16


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=V, seq_len=T, n_layer=2, n_head=2, d_model=32)
    base.update(kw)
    return GPTConfig(**base)


def build(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_forward_shape(pos):
    model = build(pos_encoding=pos)
    idx = torch.randint(0, V, (3, T))
    assert model(idx).shape == (3, T, V)
    assert model(idx[:, :5]).shape == (3, 5, V)


def test_forward_too_long_raises():
    with pytest.raises(ValueError, match="seq_len"):
        build()(torch.zeros(1, T + 1, dtype=torch.long))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_stage_without_embedding_takes_hidden_states(pos):
    full = build(pos_encoding=pos)
    idx = torch.randint(0, V, (2, T))
    # Emulate a two-stage split: stage 0 keeps the embedding and layer 0,
    # stage 1 keeps layer 1 and the head. Chained, they equal the full model.
    first, second = build(pos_encoding=pos), build(pos_encoding=pos)
    del first.layers["1"]
    first.norm = first.lm_head = None
    del second.layers["0"]
    second.tok_emb = second.pos_emb = None
    hidden = first(idx)
    assert hidden.shape == (2, T, 32)
    torch.testing.assert_close(second(hidden), full(idx))


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_causality(pos):
    model = build(pos_encoding=pos).eval()
    idx = torch.randint(0, V, (1, T))
    t = 9
    changed = idx.clone()
    changed[0, t] = (idx[0, t] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4


CONFIGS = [
    dict(),
    dict(bias=True),
    dict(tie_embeddings=False),
    dict(pos_encoding="learned"),
    dict(pos_encoding="learned", bias=True, tie_embeddings=False),
    dict(d_ff=48, n_layer=3),
    dict(d_ff=40, bias=True, n_head=4),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_param_count_matches_model(kw):
    cfg = tiny(**kw)
    assert param_count(cfg) == GPT(cfg).num_params()


def test_param_count_by_hand():
    # V=10, d=8, ff=32, 1 layer, tied, no bias, rope:
    # tok_emb 80 + norms 3*8 + attn 4*64 + mlp 2*256 = 80 + 24 + 256 + 512
    cfg = GPTConfig(vocab_size=10, seq_len=4, n_layer=1, n_head=2, d_model=8)
    assert param_count(cfg) == 872
    assert GPT(cfg).num_params() == 872
    assert GPT(cfg).num_params(exclude_embeddings=True) == 872 - 80


def test_flops_per_token():
    cfg = GPTConfig(vocab_size=10, seq_len=4, n_layer=1, n_head=2, d_model=8)
    # Tied: the LM head's matmul counts even though its weight is the embedding.
    assert GPT(cfg).flops_per_token() == 6 * 872 + 12 * 1 * 8 * 4


def test_flops_per_token_by_hand_untied_learned_bias():
    # V=10, T=4, d=8, ff=32, 1 layer, bias, untied LM head, learned positions.
    # Matmul weights (with biases): attn 4*(64+8)=288, mlp fc 8*32+32=288, proj 32*8+8=264;
    # norms 3*(8+8)=48; LM head 10*8=80 (no bias). The tok (80) and pos (32) tables are
    # lookups: left out. N = 288 + 288 + 264 + 48 + 80 = 968.
    # Attention: 12 * layers * d * T = 12 * 1 * 8 * 4 = 384.
    cfg = GPTConfig(vocab_size=10, seq_len=4, n_layer=1, n_head=2, d_model=8, bias=True,
                    tie_embeddings=False, pos_encoding="learned")
    assert param_count(cfg) == 968 + 80 + 32
    assert flops_per_token(cfg) == 6 * 968 + 384
    assert GPT(cfg).flops_per_token() == flops_per_token(cfg)


def test_init_deterministic():
    a, b = build(seed=3).state_dict(), build(seed=3).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = build(seed=4).state_dict()
    assert not torch.equal(a["layers.0.attn.wq.weight"], c["layers.0.attn.wq.weight"])


def test_init_residual_projection_std_is_smaller():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=64))
    small = 0.02 / math.sqrt(16)
    for block in model.layers.values():
        for lin in (block.attn.wo, block.mlp.proj):
            assert abs(lin.weight.std().item() - small) < 0.2 * small
        assert abs(block.attn.wq.weight.std().item() - 0.02) < 0.004
        assert block.attn.wo.weight.std() < 0.5 * block.mlp.fc.weight.std()
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_meta_materialize_then_init_weights():
    cfg = tiny()
    with torch.device("meta"):
        meta = GPT(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.init_weights()
    ref = GPT(cfg)
    torch.manual_seed(7)
    ref.init_weights()
    assert meta.lm_head.weight is meta.tok_emb.weight  # re-tied
    for (k, x), (_, y) in zip(meta.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(x, y), k


def test_generate():
    model = build()
    prompt = torch.randint(0, V, (2, 3))
    out = model.generate(prompt, 20, temperature=1.0)  # runs past seq_len: crops context
    assert out.shape == (2, 23)
    assert torch.equal(out[:, :3], prompt)
    assert out.max() < V and out.min() >= 0
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 8, temperature=0))
    assert torch.equal(greedy, model.generate(prompt, 8, top_k=1))


def test_generate_generator_reproducible():
    model = build()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def greedy_without_cache(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reference decoding: a full forward over the growing sequence (last seq_len tokens)."""
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.cfg.seq_len:])[:, -1, :]
            idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("pos", ["rope", "learned"])
@pytest.mark.parametrize("prompt_len, n_new", [(1, 10), (5, T - 5), (3, 25), (T, 4), (T + 3, 3)])
def test_generate_kv_cache_matches_recompute(pos, prompt_len, n_new):
    # (3, 25) runs past seq_len: the cache is used up to seq_len, then recompute takes over.
    model = build(seed=3, pos_encoding=pos, bias=True)
    prompt = torch.randint(0, V, (2, prompt_len), generator=torch.Generator().manual_seed(5))
    expected = greedy_without_cache(model, prompt, n_new)
    assert torch.equal(model.generate(prompt, n_new, temperature=0), expected)
    assert torch.equal(model.generate(prompt, n_new, temperature=0, use_cache=False), expected)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_kv_cache_logits_match_full_forward(pos):
    from raypar.model import KVCache

    model = build(seed=4, pos_encoding=pos).eval()
    idx = torch.randint(0, V, (2, T))
    full = model(idx)
    cache = KVCache(T)
    # Prefill 6, then a chunk of 3 (needs an offset causal mask), then one at a time.
    parts = [model(idx[:, :6], kv_cache=cache), model(idx[:, 6:9], kv_cache=cache)]
    parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(9, T)]
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        model(idx[:, :1], kv_cache=cache)


def test_generate_keeps_training_mode():
    model = build().train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0)
    assert model.training


@pytest.mark.parametrize("tied", [True, False])
def test_param_groups(tied):
    model = build(bias=True, pos_encoding="learned", tie_embeddings=tied)
    decay, no_decay = param_groups(nn.Sequential(model), weight_decay=0.1)  # wrapped
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    expected = {n for n in names.values()
                if n.endswith(".bias") or "norm" in n or n in ("tok_emb.weight", "pos_emb.weight")}
    assert no_decay_names == expected
    decay_names = {names[id(p)] for p in decay["params"]}
    assert ("lm_head.weight" in decay_names) == (not tied)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_at_init_is_uniform():
    model = build()
    idx = torch.randint(0, V, (4, T + 1))
    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    assert abs(loss.item() - math.log(V)) < 0.5


def test_training_reduces_loss():
    model = build()
    seq = torch.arange(T + 1).remainder(7).repeat(4, 1)  # a short repeated pattern
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
