"""Tests of raypar.data: packing and the global order, tokenizers, and the Ray Data
corpus preparation seen through prepare_corpus's arrays, on a real local Ray (one
instance for the module). The dataset directories themselves: tests/test_prepare.py.

    python -m pytest -q tests/test_data.py
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raypar.config import ConfigError, DataConfig
from raypar.data import (Tokenizer, block_order, build_tokenizer, global_batch_indices,
                         is_validation, pack, prepare_corpus, rank_slice, resolve_sources)
from raypar.data.corpus import builtin_sources, document_id, resolve_format
from raypar.data.decode import decode_utf8
from raypar.data.packing import stream_length
from raypar.data.tokenizer import expected_vocab

from conftest import raypar_records


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def expected_stream(docs, eot):
    return [t for d in docs for t in [*d, eot]]


# ---------------------------------------------------------------- packing

def test_pack_keeps_every_token_once_in_order():
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9, 10]]
    blocks = pack(docs, eot_id=0, block_len=4)
    stream = expected_stream(docs, 0)  # 14 tokens -> 3 blocks of 4, 2 dropped
    assert blocks.shape == (3, 4) and blocks.dtype == np.uint16
    assert blocks.reshape(-1).tolist() == stream[:12]
    assert stream_length(docs) - blocks.size == 2


def test_pack_dtype_follows_vocab():
    assert pack([[70000]], eot_id=1, block_len=2).dtype == np.uint32
    assert pack([[5]], eot_id=1, block_len=2, vocab_size=1 << 17).dtype == np.uint32
    with pytest.raises(ValueError):
        pack([[300]], eot_id=1, block_len=2, vocab_size=257)


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 299), max_size=30), max_size=20),
       block_len=st.integers(1, 17))
def test_pack_property(docs, block_len):
    blocks = pack(docs, eot_id=300, block_len=block_len, vocab_size=301)
    stream = expected_stream(docs, 300)
    n = len(stream) // block_len
    assert blocks.shape == (n, block_len)
    assert blocks.reshape(-1).tolist() == stream[:n * block_len]


# ---------------------------------------------------------------- global order

def test_block_order_is_a_seeded_permutation():
    a, b = block_order(50, seed=1, epoch=0), block_order(50, seed=1, epoch=0)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, block_order(50, seed=2, epoch=0))
    assert not np.array_equal(a, block_order(50, seed=1, epoch=1))


def test_global_batches_cross_epoch_boundary():
    n, g, seed = 10, 4, 7
    stream = np.concatenate([block_order(n, seed, e) for e in range(6)])
    for step in range(9):  # step 2 takes positions 8..11: two of epoch 0, two of epoch 1
        got = global_batch_indices(step, g, n, seed)
        assert np.array_equal(got, stream[step * g:(step + 1) * g])
    # A batch larger than the corpus spans several epochs.
    assert np.array_equal(global_batch_indices(1, 25, n, seed), stream[25:50])


def test_rank_slices_concatenate_to_the_global_batch():
    for step in range(5):
        idx = global_batch_indices(step, 8, 13, seed=3)
        assert np.array_equal(np.concatenate([rank_slice(idx, r, 2) for r in range(2)]), idx)
        assert np.array_equal(np.concatenate([rank_slice(idx, r, 4) for r in range(4)]), idx)
    with pytest.raises(AssertionError):
        rank_slice(np.arange(6), 0, 4)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_roundtrip(tmp_path):
    tok = Tokenizer.byte_level()
    text = "héllo wörld\n\t日本 \ufffd"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.eot_id == 256 and tok.vocab_size == 257
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, ""]) == [ids, []]
    assert tok.decode(tok.encode("a") + [tok.eot_id] + tok.encode("b")) == "a<|endoftext|>b"
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.kind == "byte" and again.encode(text) == ids
    assert Tokenizer.from_json(tok.to_json()).vocab_size == 257


def test_bpe_trains_roundtrips_and_is_cached(tmp_path):
    texts = [Path(p).read_text() for p in builtin_sources()[:3]]
    calls = []

    def factory():
        calls.append(1)
        return iter(texts)

    cfg = DataConfig(tokenizer="bpe", vocab_size=400)
    sources = builtin_sources()[:3]
    tok = build_tokenizer(cfg, sources, tmp_path, factory)
    assert tok.vocab_size == 400 and tok.decode([tok.eot_id]) == "<|endoftext|>"
    sample = "def f(x):\n    return x  # héllo 日本\n"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 1.5  # merges were learned
    cached = list((tmp_path / "tokenizers").glob("bpe-*.json"))
    assert len(cached) == 1
    again = build_tokenizer(cfg, sources, tmp_path, factory)
    assert len(calls) == 1 and again.to_json() == tok.to_json()
    # A path to a tokenizer.json loads it, as the HF library wrote it.
    path_cfg = DataConfig(tokenizer=str(cached[0]))
    assert build_tokenizer(path_cfg, sources, tmp_path, factory).encode(sample) == tok.encode(sample)
    # Another vocab size is another tokenizer.
    build_tokenizer(DataConfig(tokenizer="bpe", vocab_size=300), sources, tmp_path, factory)
    assert len(calls) == 2


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: no such file"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "no.json")), [], tmp_path, iter)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .* not a valid tokenizer"):
        build_tokenizer(DataConfig(tokenizer=str(bad)), [], tmp_path, iter)
    # The memory check reads it before Ray starts: the same one line there.
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .* not a valid tokenizer"):
        expected_vocab(DataConfig(tokenizer=str(bad)))


def test_decode_counts_replaced_bytes():
    for data in (b"ok", b"a\xff\xfeb", b"\xe2\x82", b"x\xc3", "日本".encode() + b"\x80"):
        text, n = decode_utf8(data)
        assert text == data.decode("utf-8", errors="replace")
    assert decode_utf8(b"a\xff\xfeb")[1] == 2 and decode_utf8(b"\xe2\x82z")[1] == 2


# ---------------------------------------------------------------- sources

def test_builtin_corpus_is_the_stdlib():
    files = resolve_sources("", "auto")
    assert len(files) > 50 and all(f.endswith(".py") and os.path.isfile(f) for f in files)
    assert files == sorted(files) and resolve_format(files, "auto") == "text"


def test_resolve_sources_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.path: no such file or directory"):
        resolve_sources(str(tmp_path / "missing"), "auto")
    with pytest.raises(ConfigError, match=r"^data\.path: no .*files under"):
        resolve_sources(str(tmp_path), "auto")
    with pytest.raises(ConfigError, match=r"^data\.path: no files matching"):
        resolve_sources(str(tmp_path / "*.txt"), "auto")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(ConfigError, match=r"^data\.format: .*mixes formats"):
        resolve_format(resolve_sources(str(tmp_path), "auto"), "auto")
    assert resolve_sources(str(tmp_path), "text") == [str(tmp_path / "a.txt")]


# ---------------------------------------------------------------- prepare_corpus

def write_text_corpus(root: Path, n: int = 16) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"sub{i % 2}/doc{i:02d}.txt"
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(f"<doc{i:02d}> " + f"words of document {i}. " * (5 + i))
        names.append(name)
    return names


def markers(tok, blocks):
    text = tok.decode(blocks.reshape(-1).tolist()).replace("<|endoftext|>", " ")
    return {m for m in text.split() if m.startswith("<doc") and m.endswith(">")}


def test_prepare_text_dir_is_deterministic_and_split_by_document(ray_local, tmp_path):
    write_text_corpus(tmp_path / "corpus")
    cfg = DataConfig(path=str(tmp_path / "corpus"), tokenizer="byte", seq_len=31,
                     val_fraction=0.3)
    a = prepare_corpus(cfg, cache_dir=tmp_path / "c1")
    b = prepare_corpus(cfg, cache_dir=tmp_path / "c2")
    assert not a.from_cache and not b.from_cache
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.shape[1] == 32 and a.stats == b.stats
    # Which file goes where depends only on its name below the corpus root.
    want_val = {f"<doc{i:02d}>" for i in range(16)
                if is_validation(document_id(f"sub{i % 2}/doc{i:02d}.txt", 0), 0.3)}
    assert 0 < len(want_val) < 16
    got_train, got_val = markers(a.tokenizer, a.train), markers(a.tokenizer, a.val)
    assert not got_train & got_val
    assert got_val <= want_val and not got_train & want_val
    assert a.stats["val_docs"] == len(want_val) and a.stats["n_docs"] == 16
    c = prepare_corpus(cfg, cache_dir=tmp_path / "c1")
    assert c.from_cache and np.array_equal(c.train, a.train) and c.stats == a.stats


def test_prepare_bpe_on_a_glob(ray_local, tmp_path):
    write_text_corpus(tmp_path / "corpus", n=8)
    cfg = DataConfig(path=str(tmp_path / "corpus" / "sub0" / "*.txt"), tokenizer="bpe",
                     vocab_size=300, seq_len=15, val_fraction=0.0)
    out = prepare_corpus(cfg, cache_dir=tmp_path / "cache")
    assert out.stats["n_files"] == 4 and out.val.shape == (0, 16)
    assert markers(out.tokenizer, out.train) == {"<doc00>", "<doc02>", "<doc04>", "<doc06>"}
    assert out.train.max() < 300


def test_prepare_jsonl_and_parquet(ray_local, tmp_path):
    rows = [{"text": f"record {i} " * (3 + i), "id": i} for i in range(30)]
    (tmp_path / "j").mkdir()
    lines = [json.dumps(r) for r in rows[:15]] + [""] + [json.dumps(r) for r in rows[15:]]
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "body": [r["text"] for r in rows]}),
                   tmp_path / "p" / "a.parquet")
    results = []
    for path, col in ((tmp_path / "j", "text"), (tmp_path / "p" / "a.parquet", "body")):
        cfg = DataConfig(path=str(path), text_column=col, tokenizer="byte", seq_len=15,
                         val_fraction=0.2)
        out = prepare_corpus(cfg, cache_dir=tmp_path / "cache")
        assert out.stats["n_docs"] == 30 and out.stats["val_docs"] > 0
        results.append(out)
    tok = results[0].tokenizer
    assert "record 0 record 0 record 0 " in tok.decode(results[0].train.reshape(-1).tolist())
    # Same texts: jsonl and parquet make the same documents, with other ids (a jsonl
    # document's is its line's byte offset, a parquet one's its row), so another split.
    assert results[1].stats["train_tokens"] + results[1].stats["val_tokens"] == \
        results[0].stats["train_tokens"] + results[0].stats["val_tokens"]


def test_prepare_reads_a_file_uri(ray_local, tmp_path):
    write_text_corpus(tmp_path / "corpus", n=4)
    cfg = DataConfig(path=(tmp_path / "corpus").as_uri(), tokenizer="byte", seq_len=15,
                     val_fraction=0.0)
    out = prepare_corpus(cfg, cache_dir=tmp_path / "cache")
    assert out.stats["n_files"] == 4
    assert markers(out.tokenizer, out.train) == {f"<doc{i:02d}>" for i in range(4)}


def test_non_utf8_bytes_are_replaced_counted_and_logged(ray_local, tmp_path, caplog):
    write_text_corpus(tmp_path / "corpus", n=4)
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"good text \xff\xfe then more " * 3)
    cfg = DataConfig(path=str(tmp_path / "corpus"), tokenizer="byte", seq_len=15,
                     val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="raypar.data"):
        out = prepare_corpus(cfg, cache_dir=tmp_path / "cache")
    assert out.stats["replaced_bytes"] == 6 and out.stats["files_with_replacements"] == 1
    assert any("replaced 6 undecodable bytes in 1 files" in r.getMessage()
               for r in raypar_records(caplog, logging.WARNING))
    assert "\ufffd\ufffd then" in out.tokenizer.decode(out.train.reshape(-1).tolist())


def test_prepare_user_errors(ray_local, tmp_path):
    def run(**kw):
        cfg = DataConfig(**{"tokenizer": "byte", "seq_len": 15, "val_fraction": 0.0, **kw})
        return prepare_corpus(cfg, cache_dir=tmp_path / "cache")

    with pytest.raises(ConfigError, match=r"^data\.path: no such file or directory"):
        run(path=str(tmp_path / "nowhere"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match=r"^data\.path: no .*files under"):
        run(path=str(tmp_path / "empty_dir"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text("")
    with pytest.raises(ConfigError, match=r"^data\.path: the corpus is empty"):
        run(path=str(tmp_path / "blank"))
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n\n{"text": ""}\n')
    with pytest.raises(ConfigError, match=r"^data\.path: the corpus is empty"):
        run(path=str(tmp_path / "nulls.jsonl"))
    pq.write_table(pa.table({"body": ["some text"] * 4}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"^data\.text_column: .*no column 'text'"):
        run(path=str(tmp_path / "t.parquet"))
    (tmp_path / "k.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    with pytest.raises(ConfigError, match=r"^data\.text_column: .*line 2 has no key"):
        run(path=str(tmp_path / "k.jsonl"), tokenizer="bpe", vocab_size=300)
    (tmp_path / "short.txt").write_text("only a few tokens")
    with pytest.raises(ConfigError, match=r"^data\.seq_len: the training split has 18 tokens"):
        run(path=str(tmp_path / "short.txt"), seq_len=1000)
    # A big training document and a validation document shorter than one block.
    names = [f"f{i}.txt" for i in range(20)]
    to_val = [n for n in names if is_validation(document_id(n, 0), 0.5)]
    to_train = [n for n in names if n not in to_val]
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / to_train[0]).write_text("long enough text " * 10)
    (tmp_path / "split" / to_val[0]).write_text("tiny")
    with pytest.raises(ConfigError, match=r"^data\.val_fraction: the validation split \(1 doc"):
        run(path=str(tmp_path / "split"), val_fraction=0.5)


def test_prepare_builtin_corpus_bytes(ray_local, tmp_path):
    out = prepare_corpus(DataConfig(tokenizer="byte", seq_len=1023), cache_dir=tmp_path)
    assert out.stats["n_files"] == len(builtin_sources())
    assert out.train.shape[1] == 1024 and len(out.train) > 1000 and len(out.val) > 0
