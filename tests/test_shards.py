"""The O(1)-memory block order (data/order.py) and the token shard dataset (data/shards.py):
pure unit tests, no Ray."""
import json
import os
import threading

import numpy as np
import pytest

from raypar.data import shards
from raypar.data.order import BlockOrder, stream_indices
from raypar.data.shards import (MANIFEST, TokenDataset, read_manifest, write_manifest,
                                write_shard)
from raypar.errors import ConfigError

# ---------------------------------------------------------------- the block order


def _is_permutation(p: np.ndarray, n: int) -> bool:
    return p.dtype == np.int64 and p.size == n and np.array_equal(np.sort(p), np.arange(n))


def test_every_small_n_is_a_bijection_in_every_epoch():
    for n in range(1, 2001):
        both = BlockOrder(n, seed=n % 7).blocks(0, 2 * n)  # epochs 0 and 1 in one call
        assert _is_permutation(both[:n], n), n
        assert _is_permutation(both[n:], n), n


@pytest.mark.parametrize("n", [2**16, 2**16 + 1, 100_003, 3 * 2**17 - 1])
def test_medium_n_exhaustive(n):
    order = BlockOrder(n, seed=5)
    assert _is_permutation(order.epoch(0), n)
    assert _is_permutation(order.epoch(3), n)


def test_large_n_distinct_and_in_range_by_sampling():
    rng = np.random.default_rng(0)
    sizes = [2**40, 2**40 - 1, 2**40 + 1, 10**12 + 39, 2**33 + 5]
    sizes += rng.integers(10**6, 2**40, size=4).tolist()
    for n in sizes:
        order = BlockOrder(n, seed=1337)
        start = int(rng.integers(0, n - 200_000))
        got = order.blocks(start, 200_000)  # distinct positions of one epoch
        assert got.min() >= 0 and got.max() < n
        assert np.unique(got).size == got.size, n
        epoch_7 = order.blocks(7 * n + start, 50_000)  # another epoch, another order
        assert not np.array_equal(epoch_7, got[:50_000])


def test_deterministic_and_independent_of_instance():
    a = BlockOrder(12_345, seed=42).blocks(1_000, 5_000)
    b = BlockOrder(12_345, seed=42).blocks(1_000, 5_000)
    assert np.array_equal(a, b)
    assert np.array_equal(stream_indices(1_000, 5_000, 12_345, 42), a)


def test_seeds_epochs_and_sizes_give_different_orders():
    n = 1_000
    orders = {tuple(BlockOrder(n, seed=s).epoch(0)) for s in range(20)}
    assert len(orders) == 20
    order = BlockOrder(n, seed=3)
    assert len({tuple(order.epoch(e)) for e in range(20)}) == 20
    assert not np.array_equal(BlockOrder(n, 3).epoch(0)[:500], BlockOrder(n + 1, 3).epoch(0)[:500])


@pytest.mark.parametrize("n", [1, 2, 3, 97, 1024, 5_000])
def test_slicing_is_consistent(n):
    order = BlockOrder(n, seed=9)
    rng = np.random.default_rng(n)
    for _ in range(20):
        a, b, c = (int(x) for x in rng.integers(0, 3 * n + 5, size=3))
        whole = order.blocks(a, b + c)
        assert np.array_equal(whole, np.concatenate([order.blocks(a, b), order.blocks(a + b, c)]))
    many = order.blocks(0, 7 * n)  # across epochs = epoch by epoch
    assert np.array_equal(many, np.concatenate([order.epoch(e) for e in range(7)]))


def test_tiny_corpus_many_epochs():
    assert np.array_equal(BlockOrder(1, seed=0).blocks(10**9, 1000), np.zeros(1000, np.int64))
    two = BlockOrder(2, seed=0).blocks(0, 20_000).reshape(-1, 2)
    assert (np.sort(two, axis=1) == [0, 1]).all()
    assert 0.4 < (two[:, 0] == 0).mean() < 0.6  # both orders of 2 occur, about equally


def test_roughly_uniform():
    """Where block 0 lands, over many epochs, spreads evenly over positions; and the order
    is not correlated with the identity."""
    epochs = 8_000
    for n in (10, 16):  # cycle walking, and a power of two
        perms = BlockOrder(n, seed=11).blocks(0, n * epochs).reshape(epochs, n)
        counts = np.bincount(np.argmax(perms == 0, axis=1), minlength=n)
        chi2 = ((counts - epochs / n) ** 2 / (epochs / n)).sum()
        assert chi2 < 60, counts  # 9 or 15 degrees of freedom: p < 1e-6 above 60
    big = BlockOrder(100_000, seed=11).epoch(0)
    assert abs(np.corrcoef(big, np.arange(big.size))[0, 1]) < 0.02
    assert abs(np.corrcoef(big[:-1], big[1:])[0, 1]) < 0.02


def test_bad_arguments():
    for n in (0, -1, 2**62 + 1):
        with pytest.raises(ValueError, match="n_blocks"):
            BlockOrder(n, seed=0)
    with pytest.raises(ValueError):
        BlockOrder(10, seed=0).blocks(-1, 3)
    assert BlockOrder(10, seed=0).blocks(5, 0).shape == (0,)


# ---------------------------------------------------------------- the token dataset

EOT, VOCAB = 299, 300
# Documents per shard: uneven, with empty shards, and a one-token one (2 with its eot), so
# that long blocks straddle three or more shards.
SHARD_DOCS = [17, 0, 1, 40, 0, 0, 5, 23, 2]


def _docs(rng, count, vocab=VOCAB - 1, short=False):
    if short:
        return [rng.integers(0, vocab, size=1) for _ in range(count)]
    return [rng.integers(0, vocab, size=int(rng.integers(0, 60))) for _ in range(count)]


def _write_dataset(root, rng, vocab=VOCAB, eot=EOT, dtype=np.uint16):
    """A dataset with train and val splits; returns {split: the reference stream}."""
    shards, streams = {}, {}
    for split, layout in (("train", SHARD_DOCS), ("val", [3, 0, 4])):
        infos, parts = [], []
        for i, count in enumerate(layout):
            docs = _docs(rng, count, vocab=eot, short=(split, i) == ("train", 2))
            infos.append(write_shard(root, i, docs, dtype, eot_id=eot, split=split))
            parts += [np.append(d, eot) for d in docs]
        shards[split], streams[split] = infos, np.concatenate(parts).astype(np.int64)
    write_manifest(root, shards, {"vocab_size": vocab, "eot_id": eot, "fingerprint": "fp",
                                  "tokenizer": json.dumps({"kind": "test"}),
                                  "split": {"val_fraction": 0.1}})
    return streams


@pytest.fixture
def dataset(tmp_path):
    return tmp_path / "ds", _write_dataset(tmp_path / "ds", np.random.default_rng(1))


def _reference(stream, seq_len):
    width = seq_len + 1
    n = stream.size // width
    return stream[:n * width].reshape(n, width)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 31, 64, 129, 400])
def test_blocks_equal_slices_of_the_stream(dataset, seq_len):
    root, streams = dataset
    ds = TokenDataset.open(root)
    ref = _reference(streams["train"], seq_len)
    assert ds.n_blocks(seq_len) == len(ref) > 0
    assert np.array_equal(ds.blocks(np.arange(len(ref)), seq_len), ref)
    order = np.random.default_rng(seq_len).permutation(len(ref))  # any order, repeats too
    order = np.concatenate([order, order[:3]])
    assert np.array_equal(ds.blocks(order, seq_len), ref[order])
    assert np.array_equal(ds.block(len(ref) - 1, seq_len), ref[-1])
    assert ds.blocks([], seq_len).shape == (0, seq_len + 1)
    with pytest.raises(IndexError):
        ds.blocks([len(ref)], seq_len)


def test_random_layouts(tmp_path, monkeypatch):
    """Many shard layouts (runs of empty and tiny shards): every block of every seq_len is
    the stream's slice, and shards_for names every shard a batch reads."""
    rng = np.random.default_rng(7)
    for k in range(25):
        root, parts, infos = tmp_path / str(k), [], []
        for i in range(int(rng.integers(1, 12))):
            docs = _docs(rng, int(rng.choice([0, 0, 1, 2, 5])), short=bool(rng.integers(2)))
            infos.append(write_shard(root, i, docs, np.uint16, eot_id=EOT))
            parts += [np.append(d, EOT) for d in docs]
        write_manifest(root, infos, {"vocab_size": VOCAB, "fingerprint": "f", "tokenizer": "{}"})
        stream = np.concatenate(parts or [np.zeros(0, np.int64)])
        for seq_len in (1, 3, 8, 50):
            ds, ref = TokenDataset.open(root), _reference(stream, seq_len)
            idx = rng.permutation(len(ref))[:7]
            ds.prefetch(ds.shards_for(idx, seq_len))
            with monkeypatch.context() as m:  # everything needed is mapped already
                m.setattr(ds, "_local_file", lambda s: pytest.fail(f"shard {s} not prefetched"))
                assert np.array_equal(ds.blocks(idx, seq_len), ref[idx])
            assert np.array_equal(ds.blocks(np.arange(len(ref)), seq_len), ref)


def test_a_block_straddles_three_shards(dataset):
    root, streams = dataset
    ds = TokenDataset.open(root)
    start = int(ds.offsets[2])  # shard 1 is empty; shard 2 holds a 2-token document
    assert ds.shards[2]["tokens"] == 2 and ds.shards[1]["tokens"] == 0
    found = 0
    for seq_len in range(3, 30):
        width = seq_len + 1
        b = (start - 1) // width  # the block holding shard 0's last token
        if (b + 1) * width >= start + 3:  # ... and shard 3's first
            found += 1
            assert ds.shards_for([b], seq_len) == [0, 2, 3]
            assert np.array_equal(ds.block(b, seq_len), _reference(streams["train"], seq_len)[b])
        assert 1 not in ds.shards_for(np.arange(ds.n_blocks(seq_len)), seq_len)  # empty
    assert found > 5


def test_val_split_and_manifest(dataset):
    root, streams = dataset
    val = TokenDataset.open(root, split="val")
    assert np.array_equal(val.blocks(np.arange(val.n_blocks(4)), 4),
                          _reference(streams["val"], 4))
    m = read_manifest(root)
    assert m["version"] == 1 and m["dtype"] == "uint16" and "seq_len" not in json.dumps(m)
    train = m["splits"]["train"]
    assert train["offsets"] == np.cumsum([0] + [s["tokens"] for s in train["shards"]]).tolist()
    assert train["tokens"] == streams["train"].size and m["split"] == {"val_fraction": 0.1}
    assert val.vocab_size == VOCAB and val.eot_id == EOT
    ends = np.fromfile(root / train["shards"][0]["docs_name"], dtype="<u8")
    assert ends.size == SHARD_DOCS[0] and ends[-1] == train["shards"][0]["tokens"]
    first = np.fromfile(root / train["shards"][0]["name"], dtype="<u2")
    assert (first[ends.astype(np.int64) - 1] == EOT).all()  # every document ends in eot
    with pytest.raises(ConfigError, match="no split 'test'"):
        TokenDataset.open(root, split="test")


def test_dtype_follows_the_vocabulary(tmp_path):
    rng = np.random.default_rng(2)
    big = [rng.integers(60_000, 70_000, size=50) for _ in range(5)]
    info = write_shard(tmp_path, 0, big, np.uint32, eot_id=69_999)
    assert info.dtype == "uint32" and info.bytes == 4 * info.tokens
    write_manifest(tmp_path, [info], {"vocab_size": 70_000, "eot_id": 69_999,
                                      "fingerprint": "fp", "tokenizer": "{}"})
    ds = TokenDataset.open(tmp_path)
    stream = np.concatenate([np.append(d, 69_999) for d in big])
    assert ds.dtype == np.uint32 and np.array_equal(ds.blocks([0, 1], 9), _reference(stream, 9)[:2])
    with pytest.raises(ValueError, match="uint16 holds"):
        write_shard(tmp_path / "x", 0, big, np.uint16, eot_id=0)
    small = write_shard(tmp_path / "y", 0, [np.arange(5)], np.uint16)
    assert small.dtype == "uint16" and small.bytes == 10 and small.tokens == 5  # no eot
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_manifest(tmp_path / "y", [small], {"vocab_size": 70_000, "fingerprint": "f",
                                                 "tokenizer": "{}"})
    with pytest.raises(ValueError, match="seq_len"):
        write_manifest(tmp_path / "y", [small], {"vocab_size": 9, "fingerprint": "f",
                                                 "tokenizer": "{}", "seq_len": 8})


def _one_line_naming(err, name):
    text = str(err.value)
    assert name in text and "\n" not in text, text


def test_truncated_shard_is_refused(dataset):
    root, _ = dataset
    name = read_manifest(root)["splits"]["train"]["shards"][3]["name"]
    with open(root / name, "r+b") as f:
        f.truncate(os.path.getsize(root / name) - 2)
    with pytest.raises(ConfigError) as err:
        TokenDataset.open(root)
    _one_line_naming(err, name)
    os.remove(root / name)
    with pytest.raises(ConfigError, match="missing") as err:
        TokenDataset.open(root)
    _one_line_naming(err, name)


@pytest.mark.parametrize("cached", [False, True])
def test_edited_shard_is_refused(dataset, tmp_path, cached):
    root, _ = dataset
    name = read_manifest(root)["splits"]["train"]["shards"][3]["name"]
    data = bytearray((root / name).read_bytes())
    data[10] ^= 0xFF
    (root / name).write_bytes(bytes(data))  # same size: only the checksum tells
    cache = tmp_path / "cache" if cached else None
    ds = TokenDataset.open(root, cache_dir=cache)
    ds.blocks([0], 4)  # shard 0 is intact
    with pytest.raises(ConfigError, match="sha256") as err:
        ds.blocks(np.arange(ds.n_blocks(4)), 4)
    _one_line_naming(err, name)
    if cached:  # nothing of the bad copy is left in the cache
        sha = read_manifest(root)["splits"]["train"]["shards"][3]["sha256"]
        assert not list(cache.glob("*.tmp")) and not (cache / f"{sha}.tok").exists()


def test_directory_without_manifest_is_refused(tmp_path):
    write_shard(tmp_path, 0, [np.arange(10)], np.uint16, eot_id=9)  # half-written
    with pytest.raises(ConfigError, match="no manifest.json") as err:
        TokenDataset.open(tmp_path)
    _one_line_naming(err, str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match="not a raypar token manifest"):
        TokenDataset.open(tmp_path)
    with pytest.raises(ConfigError, match="no manifest.json"):
        TokenDataset.open(tmp_path / "nowhere")


def test_manifest_is_written_atomically(tmp_path, monkeypatch):
    info = write_shard(tmp_path, 0, [np.arange(10)], np.uint16, eot_id=9)
    meta = {"vocab_size": 10, "eot_id": 9, "fingerprint": "f", "tokenizer": "{}"}

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_manifest(tmp_path, [info], meta)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.docs", "train-000000.tok"]
    write_manifest(tmp_path, [info], meta)
    assert TokenDataset.open(tmp_path).tokens == 11


@pytest.mark.parametrize("as_uri", [False, True])
def test_read_through_the_cache(dataset, tmp_path, monkeypatch, as_uri):
    root, streams = dataset
    path = f"file://{root}" if as_uri else str(root)
    cache = tmp_path / "cache"
    ds = TokenDataset.open(path, cache_dir=cache)
    ref = _reference(streams["train"], 15)
    assert np.array_equal(ds.blocks(np.arange(len(ref)), 15), ref)
    cached = sorted(p.name for p in cache.glob("*.tok"))
    shas = sorted(f"{s['sha256']}.tok" for s in ds.shards if s["tokens"])
    assert cached == shas  # content-addressed copies, only of non-empty shards
    assert not list(cache.glob("*.tmp"))
    again = TokenDataset.open(path, cache_dir=cache)  # reuses the copies: no re-read

    def refuse(*args):
        raise AssertionError("copied a shard that the cache holds")
    monkeypatch.setattr(shards, "_copy_hashing", refuse)
    assert np.array_equal(again.blocks(np.arange(len(ref)), 15), ref)


def test_cache_is_bounded_lru(dataset, tmp_path):
    root, streams = dataset
    cache = tmp_path / "cache"
    ds = TokenDataset.open(root, cache_dir=cache, cache_bytes=1)  # room for one at a time
    ref = _reference(streams["train"], 3)
    for s in ds.shards_for(np.arange(len(ref)), 3):
        ds.release()
        ds.prefetch([s])
        assert [p.name for p in cache.glob("*.tok")] == [f"{ds.shards[s]['sha256']}.tok"]
    ds.release()
    assert np.array_equal(ds.blocks(np.arange(len(ref)), 3), ref)  # mapped ones stay


def test_release_keeps_what_is_asked_and_a_manifest_is_read_once(dataset, monkeypatch):
    root, streams = dataset
    m = read_manifest(root)
    monkeypatch.setattr(shards, "read_manifest", lambda *a: pytest.fail("read again"))
    ds = TokenDataset.open(root, split="val", manifest=m)
    assert ds.mapped() == []
    ds.prefetch([0, 2])
    assert ds.mapped() == [0, 2]
    ds.release(keep=[2, 5])
    assert ds.mapped() == [2]
    ds.release()
    assert ds.mapped() == []
    assert np.array_equal(ds.blocks([0], 2), _reference(streams["val"], 2)[:1])


def test_concurrent_readers_share_one_cache(dataset, tmp_path):
    root, streams = dataset
    cache, ref = tmp_path / "cache", _reference(streams["train"], 6)
    results, errors = [], []

    def read():
        try:
            ds = TokenDataset.open(f"file://{root}", cache_dir=cache)
            results.append(ds.blocks(np.arange(len(ref))[::-1], 6))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert all(np.array_equal(r, ref[::-1]) for r in results)
    assert not list(cache.glob(".*.tmp"))


def test_unwritable_cache_dir_is_one_line(dataset, tmp_path):
    root, _ = dataset
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="data.cache_dir") as err:
        TokenDataset.open(root, cache_dir=blocker / "cache")
    _one_line_naming(err, str(blocker))
