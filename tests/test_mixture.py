"""Mixtures of datasets (data.sources): the keyed order that draws each position's source,
the blocks it reads, the shared tokenizer, per-source token counts, and one-line errors.
The training parity of a mixture on Ray (with a source in S3) is in tests/test_s3.py.

    python -m pytest -q tests/test_mixture.py
"""
from __future__ import annotations

import numpy as np
import pytest

from raypar.config import ConfigError, DataConfig, load_spec
from raypar.data import mixture
from raypar.data.blocks import open_mixture, open_splits
from raypar.data.order import BlockOrder, MixtureOrder, order_version
from raypar.data.tokenizer import Tokenizer, expected_vocab

from test_prepare import in_process, write_jsonl  # noqa: F401 - in_process is a fixture


# ---------------------------------------------------------------- the order

def test_the_source_of_a_position_follows_the_weights_and_nothing_else():
    mix = MixtureOrder([5000, 300, 40], [0.5, 0.3, 0.2], seed=7)
    src = mix.sources(0, 60_000)
    share = np.bincount(src, minlength=3) / src.size
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.01)
    # A pure function of (seed, position): any chunking gives the same blocks.
    whole = mix.blocks(1000, 5000)
    parts = np.concatenate([mix.blocks(1000 + lo, n) for lo, n in
                            [(0, 1), (1, 999), (1000, 3001), (4001, 999)]])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(MixtureOrder([5000, 300, 40], [0.5, 0.3, 0.2], 7)
                                  .blocks(1000, 5000), whole)
    assert not np.array_equal(MixtureOrder([5000, 300, 40], [0.5, 0.3, 0.2], 8)
                              .blocks(1000, 5000), whole)
    # Weights are shares, not counts: scaling them changes nothing.
    np.testing.assert_array_equal(MixtureOrder([5000, 300, 40], [5, 3, 2], 7)
                                  .blocks(1000, 5000), whole)


def test_each_source_reads_every_block_once_per_pass_in_its_own_order():
    """A rarely drawn source still reads its blocks in its own seeded order: its k-th draw
    is position k of that order, so its first n_s draws are n_s distinct blocks."""
    sizes = [5000, 300, 40]
    mix = MixtureOrder(sizes, [0.9, 0.08, 0.02], seed=3)
    offsets = np.cumsum([0] + sizes[:-1])
    n = 60_000
    src, blocks = mix.sources(0, n), mix.blocks(0, n)
    for s, size in enumerate(sizes):
        mine = blocks[src == s]
        assert ((mine >= offsets[s]) & (mine < offsets[s] + size)).all()
        assert mine.size >= 2 * size  # (each source is drawn for two passes at least)
        np.testing.assert_array_equal(mine[:size], offsets[s] + mix.orders[s].blocks(0, size))
        assert sorted(mine[:size]) == list(range(offsets[s], offsets[s] + size))
        assert sorted(mine[size:2 * size]) == list(range(offsets[s], offsets[s] + size))
    # counts() in small chunks equals the draws; draws_before adds them up.
    np.testing.assert_array_equal(mix.counts(17, 2500, chunk=64),
                                  np.bincount(mix.sources(17, 2500), minlength=3))
    np.testing.assert_array_equal(mix.draws_before(n), np.bincount(src, minlength=3))


def test_a_resume_continues_each_sources_order_from_the_checkpoints_draws():
    """Any chunking, any number of remembered positions (the memo is bounded), a fresh
    order and one told the draws at a checkpoint all read the same blocks."""
    sizes, weights = [2000, 90], [0.7, 0.3]
    whole = MixtureOrder(sizes, weights, 11).blocks(0, 30_000)
    chunked = MixtureOrder(sizes, weights, 11)
    got = np.concatenate([chunked.blocks(lo, 37) for lo in range(0, 30_000, 37)])[:30_000]
    np.testing.assert_array_equal(got, whole)
    assert len(chunked._memo) <= MixtureOrder.MEMO
    at = 12_345
    draws = MixtureOrder(sizes, weights, 11).draws_before(at)
    resumed = MixtureOrder(sizes, weights, 11)
    resumed.remember(at, draws)
    np.testing.assert_array_equal(resumed.blocks(at, 1000), whole[at:at + 1000])
    with pytest.raises(ValueError, match="do not add up"):
        resumed.remember(at, draws + 1)


def test_one_dataset_keeps_its_order_and_a_mixture_records_its_sources():
    assert BlockOrder(500, 1).ident() == {"version": order_version(), "n_blocks": 500}
    assert order_version() == "raypar block order v1"  # what checkpoints of one dataset hold
    ident = MixtureOrder([400, 100], [3.0, 1.0], 1).ident()
    assert ident["n_blocks"] == 500 and ident["mixture"] == [[400, 3.0], [100, 1.0]]
    with pytest.raises(ValueError, match="one positive weight per source"):
        MixtureOrder([10, 10], [1.0, 0.0], 1)


# ---------------------------------------------------------------- datasets and blocks

def _prepared(tmp_path, name: str, n: int, seed: int, **kw) -> str:
    cfg = DataConfig(path=str(write_jsonl(tmp_path / f"{name}.jsonl", n=n, seed=seed)),
                     tokenizer=kw.pop("tokenizer", "byte"), val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), dataset_dir=str(tmp_path / name), **kw)
    return mixture.prepare_all(cfg)[0].path


def test_a_mixture_reads_each_sources_blocks_and_counts_them(tmp_path, in_process):
    a, b = _prepared(tmp_path, "code", 120, 1), _prepared(tmp_path, "prose", 60, 2)
    sources = [{"path": a, "weight": 3.0, "name": "code"},
               {"path": b, "weight": 1.0, "name": "prose"}]
    train, val = open_mixture(sources, seq_len=16)
    (ta, va), (tb, vb) = open_splits(a, 16), open_splits(b, 16)
    assert train.n_blocks == ta.n_blocks + tb.n_blocks
    idx = train.order(seed=5).blocks(0, 64)
    got = train.blocks(idx)
    for i, g in zip(idx, got):
        want = ta.blocks([i]) if i < ta.n_blocks else tb.blocks([i - ta.n_blocks])
        np.testing.assert_array_equal(g, want[0])
    counts = train.source_counts(idx)
    assert counts == {"code": int((idx < ta.n_blocks).sum()),
                      "prose": int((idx >= ta.n_blocks).sum())}
    assert sum(counts.values()) == 64 and counts["code"] > counts["prose"]
    # Validation interleaves the sources: the first 2k indices hold k blocks of each.
    np.testing.assert_array_equal(val.blocks([0, 1, 2, 3]),
                                  np.concatenate([va.blocks([0]), vb.blocks([0]),
                                                  va.blocks([1]), vb.blocks([1])]))
    assert val.n_blocks == 2 * max(va.n_blocks, vb.n_blocks)


def test_sources_share_the_first_sources_tokenizer(tmp_path, in_process):
    """With the default bpe tokenizer, the first corpus trains it and the second is
    tokenized with it; a prepared source with another tokenizer is refused by name."""
    one = write_jsonl(tmp_path / "one.jsonl", n=150, seed=1)
    two = write_jsonl(tmp_path / "two.jsonl", n=80, seed=2)
    cfg = load_spec(None, [f"data.sources=[{{path: {one}, weight: 2}}, {{path: {two}}}]",
                           f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300",
                           "data.val_fraction=0.2"]).data
    mixture.precheck(cfg)
    first, second = mixture.prepare_all(cfg)
    assert first.tokenizer.kind == "hf" and first.tokenizer.vocab_size == 300
    assert second.tokenizer.digest == first.tokenizer.digest
    assert mixture.ready(cfg, tmp_path / "cache") is False  # (bpe: known only once built)
    again = mixture.prepare_all(cfg)
    assert [d.from_cache for d in again] == [True, True]
    assert mixture.blocks_of(again, cfg, 16)[0] == (first.n_blocks("train", 16)
                                                     + second.n_blocks("train", 16))
    byte_ds = _prepared(tmp_path, "bytes", 40, 3)
    other = load_spec(None, [f"data.sources=[{{path: {first.path}}}, {{path: {byte_ds}}}]",
                             f"data.cache_dir={tmp_path / 'cache'}"]).data
    assert expected_vocab(other) == 300  # the memory check's vocabulary: the first source's
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.path: .*bytes was prepared "
                                          r"with another tokenizer \(byte, 257 tokens\)"):
        mixture.prepare_all(other)
    assert isinstance(Tokenizer.from_file(tmp_path / "cache" / "tokenizers" /
                                          f"mixture-{first.tokenizer.digest[:16]}.json"),
                      Tokenizer)


def test_bad_sources_are_one_line_naming_the_source(tmp_path, in_process):
    good = _prepared(tmp_path, "good", 80, 1)
    missing = load_spec(None, [f"data.sources=[{{path: {good}}}, "
                               f"{{path: {tmp_path / 'nope'}}}]"]).data
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.path: no such file or "
                                          r"directory: .*nope"):
        mixture.precheck(missing)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", n=3, seed=4)
    small = load_spec(None, [f"data.sources=[{{path: {good}}}, {{path: {tiny}, name: t}}]",
                             "data.tokenizer=byte", "data.val_fraction=0.0",
                             f"data.cache_dir={tmp_path / 'cache'}"]).data
    datasets = mixture.prepare_all(small)
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.path: .*tiny\.jsonl holds "
                                          r"\d+ training tokens, not one block"):
        mixture.blocks_of(datasets, small, 4096)
    for bad, message in [
            (["data.sources=[{path: a, weight: -1}]"], r"^data\.sources\[0\]\.weight: must be > 0"),
            (["data.sources=[{path: a}]", "data.path=b"], r"^data\.sources: a mixture replaces "
                                                          r"data\.path"),
            (["data.sources=[{path: a}]", "data.dataset_dir=d"], r"^data\.dataset_dir: one "
                                                                 r"directory cannot hold"),
            (["data.sources=[{}]"], r"^data\.sources\[0\]\.path: a corpus or prepared"),
            (["data.sources=[{path: a, name: 'x y'}]"], r"^data\.sources\[0\]\.name: letters")]:
        with pytest.raises(ConfigError, match=message):
            load_spec(None, bad)
