"""Tests of the dataset preparation (raypar/data/prepare.py, the Ray Data stages in
pipeline.py, the pieces in decode.py): large files cut into pieces without losing or
repeating a document, the written train stream equal to what the in-memory path packs,
reuse, crashed and concurrent attempts, the bounded tokenizer sample, one-line errors,
and `raypar prepare`.

Most tests run the real pieces, read tasks and write stage in this process (the
`in_process` stand-in for Ray Data); the few marked `ray` run them on a real local Ray.

    python -m pytest -q tests/test_prepare.py
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypar import cli
from raypar.config import ConfigError, DataConfig, load_spec
from raypar.data import decode, pipeline, prepare, shards
from raypar.data import tokenizer as tokenizer_mod
from raypar.data.corpus import (document_names, file_stats, filesystem_for, resolve_format,
                                resolve_sources)
from raypar.data.decode import decode_batch
from raypar.data.pipeline import split_and_pack
from raypar.data.prepare import is_prepared, prepare_dataset
from raypar.data.shards import MANIFEST, TokenDataset
from raypar.data.tokenizer import Tokenizer, expected_vocab


# ---------------------------------------------------------------- corpora

def write_jsonl(path: Path, n: int = 300, seed: int = 0) -> Path:
    """Lines of uneven length (some longer than a small chunk), blank lines, a null text,
    non-ASCII text and undecodable bytes, and no newline after the last line."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "béta", "gamma", "δelta", "日本", "x"]
    lines = []
    for i in range(n):
        if i % 37 == 5:
            lines.append(b"")
        elif i % 53 == 7:
            lines.append(json.dumps({"text": None, "id": i}).encode())
        else:
            text = f"<doc{i}> " + " ".join(rng.choice(words, int(rng.integers(1, 60))))
            line = json.dumps({"text": text, "id": i}, ensure_ascii=i % 2 == 0).encode()
            if i % 41 == 3:  # a bad byte inside the JSON string
                line = line.replace(b"<doc", b"\xff<doc", 1)
            lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines))
    return path


def write_parquet(path: Path, n: int = 200, row_group: int = 16) -> Path:
    texts = [None if i % 29 == 4 else f"row {i} " + "words " * (i % 11) for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(n)), "body": texts}), path,
                   row_group_size=row_group)
    return path


def write_texts(folder: Path, n: int = 12) -> Path:
    for i in range(n):
        (folder / f"s{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"s{i % 3}" / f"t{i:02d}.txt").write_text(f"<doc{i}> " + "text " * (3 + 7 * i))
    return folder


def whole_file_documents(cfg: DataConfig) -> pa.Table:
    """The documents as the in-memory path decoded them: every file read whole."""
    sources = resolve_sources(cfg.path, cfg.format)
    fmt = resolve_format(sources, cfg.format)
    paths = filesystem_for(sources)[1]
    files = {p: (i, name, src) for i, (p, name, src)
             in enumerate(zip(paths, document_names(sources), sources))}
    batch = pa.table({"bytes": [Path(p).read_bytes() for p in paths], "path": paths})
    return decode_batch(batch, fmt, cfg.text_column, cfg.val_fraction, files)


def reference(cfg: DataConfig, tok: Tokenizer):
    """(token arrays, is_val) of every document in (file, row) order: the old path."""
    docs = whole_file_documents(cfg)
    return ([np.array(tok.encode(t), dtype=np.int64) for t in docs["text"].to_pylist()],
            docs["val"].to_pylist())


def stream(ds, split: str) -> np.ndarray:
    """A split's shards concatenated in manifest order."""
    parts = [np.fromfile(Path(ds.path) / s["name"], dtype=ds.manifest["dtype"])
             for s in ds.manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, ds.manifest["dtype"])


def expected_stream(docs, is_val, eot: int, val: bool) -> list[int]:
    return [t for d, v in zip(docs, is_val) if v == val for t in [*d.tolist(), eot]]


def assert_matches_reference(ds, cfg: DataConfig) -> None:
    """The dataset's streams and blocks are exactly the in-memory path's (split_and_pack)."""
    docs, is_val = reference(cfg, ds.tokenizer)
    eot = ds.tokenizer.eot_id
    for split, val in (("train", False), ("val", True)):
        assert stream(ds, split).tolist() == expected_stream(docs, is_val, eot, val), split
    train, val, counts = split_and_pack(docs, is_val, ds.tokenizer, cfg)
    assert ds.n_blocks("train", cfg.seq_len) == len(train)
    assert ds.n_blocks("val", cfg.seq_len) == len(val)
    got = TokenDataset.open(ds.path).blocks(np.arange(len(train)), cfg.seq_len)
    assert got.dtype == train.dtype and np.array_equal(got, train)
    for key in ("n_docs", "train_docs", "val_docs", "train_tokens", "val_tokens",
                "tokenizer", "vocab_size"):
        assert ds.stats[key] == counts[key], key


# ---------------------------------------------------------------- Ray Data, in process

class LocalDataset:
    """Ray Data's map_batches / iter_batches over tables, run in this process."""

    def __init__(self, tables, delay: float = 0.0):
        self.tables, self.delay = tables, delay

    def map_batches(self, fn, batch_format, fn_kwargs):
        time.sleep(self.delay)
        return LocalDataset([fn(t, **fn_kwargs) for t in self.tables])

    def iter_batches(self, batch_size, batch_format):
        return iter(self.tables)


@pytest.fixture
def in_process(monkeypatch):
    """pipeline._documents with the real pieces (small: CHUNK_BYTES=512) and read tasks,
    run here instead of in Ray tasks. Returns the list of its calls."""
    calls = SimpleNamespace(sources=[], delay=0.0)

    def documents(sources, fmt, cfg):
        calls.sources.append(list(sources))
        pieces = decode.plan_pieces(sources, fmt, [s.size for s in file_stats(sources)])
        fs = filesystem_for(sources)[0]
        tables = [t for group in pipeline.group_pieces(pieces, 4)
                  for t in decode.read_pieces(group, fmt, cfg.text_column, cfg.val_fraction, fs)]
        return LocalDataset(tables, calls.delay)

    monkeypatch.setattr(pipeline, "_documents", documents)
    monkeypatch.setattr(decode, "CHUNK_BYTES", 512)
    return calls


def shard_files(folder: Path) -> set[str]:
    return {p.name for p in Path(folder).iterdir() if p.suffix in (".tok", ".docs")}


def named_files(manifest: dict) -> set[str]:
    return {name for entry in manifest["splits"].values() for s in entry["shards"]
            for name in (s["name"], s["docs_name"])}


# ---------------------------------------------------------------- pieces

@pytest.mark.parametrize("chunk", [1, 7, 100, 1000, 10**9])
def test_jsonl_byte_ranges_hold_every_line_once(tmp_path, chunk):
    path = write_jsonl(tmp_path / "c" / "a.jsonl", n=60 if chunk < 10 else 300)
    size = path.stat().st_size
    cfg = DataConfig(path=str(path), val_fraction=0.3)
    pieces = decode.plan_pieces([str(path)], "jsonl", [size], chunk=chunk)
    assert len(pieces) == math.ceil(size / chunk)
    assert [p.start for p in pieces] == list(range(0, size, chunk))
    got = pa.concat_tables([t for p in pieces for t in
                            decode.read_pieces([p], "jsonl", "text", 0.3)])
    whole = whole_file_documents(cfg)
    assert got.to_pylist() == whole.to_pylist()
    assert whole.num_rows > (50 if chunk < 10 else 250)
    assert sum(whole["replaced"].to_pylist()) > 0
    # A line's id is its byte offset: the line at that offset is the document.
    data = path.read_bytes()
    for row, text in zip(whole["row"].to_pylist()[:20], whole["text"].to_pylist()):
        assert json.loads(data[row:].split(b"\n", 1)[0].decode("utf-8", "replace"))["text"] \
            .replace("\ufffd", "") == text.replace("\ufffd", "")


@pytest.mark.parametrize("chunk", [1, 300, 10**9])
def test_parquet_row_groups_hold_every_row_once(tmp_path, chunk):
    path = write_parquet(tmp_path / "p" / "a.parquet")
    pieces = decode.plan_pieces([str(path)], "parquet", [path.stat().st_size], chunk=chunk)
    assert (len(pieces) > 1) == (chunk < path.stat().st_size)
    assert sum(len(range(p.start, p.end)) for p in pieces if p.end >= 0) in (0, 13)
    got = pa.concat_tables([t for p in pieces for t in
                            decode.read_pieces([p], "parquet", "body", 0.3)])
    whole = whole_file_documents(DataConfig(path=str(path), text_column="body",
                                            val_fraction=0.3))
    assert got.to_pylist() == whole.to_pylist()
    assert whole["row"].to_pylist()[:5] == [0, 1, 2, 3, 5]  # row 4 is null: no document


def test_text_files_are_one_piece_whatever_their_size(tmp_path):
    folder = write_texts(tmp_path / "t")
    sources = resolve_sources(str(folder), "auto")
    sizes = [s.size for s in file_stats(sources)]
    pieces = decode.plan_pieces(sources, "text", sizes, chunk=8)
    assert [(p.file, p.start, p.end) for p in pieces] == [(i, 0, n) for i, n in enumerate(sizes)]
    runs = pipeline.group_pieces(pieces, parallelism=3)
    assert [p for run in runs for p in run] == pieces  # consecutive runs, in order


def test_a_bad_line_in_a_later_range_names_its_line(tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(100)]
    lines[56] = '{"text": broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pieces = decode.plan_pieces([str(path)], "jsonl", [path.stat().st_size], chunk=100)
    errors = [e for p in pieces for t in decode.read_pieces([p], "jsonl", "text", 0.0)
              for e in t["error"].drop_null().to_pylist()]
    assert errors == [f"data.path: {path} line 57 is not valid JSON (expected one JSON "
                      f"object per line)"]


# ---------------------------------------------------------------- preparing (in process)

def test_train_stream_equals_the_in_memory_packing(tmp_path, in_process):
    write_jsonl(tmp_path / "j" / "a.jsonl", n=300)
    write_jsonl(tmp_path / "j" / "b" / "c.jsonl", n=40, seed=1)
    for cfg in (DataConfig(path=str(tmp_path / "j"), tokenizer="bpe", vocab_size=300,
                           seq_len=31, val_fraction=0.2, cache_dir=str(tmp_path / "cache")),
                DataConfig(path=str(write_texts(tmp_path / "t")), tokenizer="byte", seq_len=15,
                           val_fraction=0.3, cache_dir=str(tmp_path / "cache"))):
        ds = prepare_dataset(cfg)
        assert not ds.from_cache and ds.shards("train") > 1
        assert_matches_reference(ds, cfg)
        assert ds.manifest["split"] == {"val_fraction": cfg.val_fraction}
        assert ds.manifest["eot_id"] == ds.tokenizer.eot_id
        assert ds.manifest["dtype"] == "uint16"
        assert ds.path == str(tmp_path / "cache" / "datasets" / ds.fingerprint[:24])


def test_prepare_corpus_reads_its_arrays_from_the_dataset(tmp_path, in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     seq_len=20, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    corpus = pipeline.prepare_corpus(cfg)
    train, val, counts = split_and_pack(*reference(cfg, corpus.tokenizer), corpus.tokenizer, cfg)
    assert np.array_equal(corpus.train, train) and np.array_equal(corpus.val, val)
    assert {k: corpus.stats[k] for k in counts} == counts
    assert set(corpus.stats) >= {"n_files", "replaced_bytes", "files_with_replacements",
                                 "format"}
    assert not list((tmp_path / "cache").rglob("*.npy")), "the .npy cache is gone"
    again = pipeline.prepare_corpus(cfg)
    assert again.from_cache and again.fingerprint == corpus.fingerprint
    other = pipeline.prepare_corpus(DataConfig(**{**cfg.__dict__, "seq_len": 10}))
    assert other.from_cache and other.fingerprint != corpus.fingerprint  # one dataset
    assert len(in_process.sources) == 1


def test_a_finished_dataset_is_reused_without_any_work(tmp_path, in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="bpe",
                     vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    first = prepare_dataset(cfg)
    again = prepare_dataset(cfg)
    assert again.from_cache and not first.from_cache
    assert again.manifest == first.manifest and again.stats == first.stats
    assert again.fingerprint == first.fingerprint
    assert len(in_process.sources) == 1, "the reuse read no corpus"
    # A changed file is another corpus: prepared again, into another directory.
    (tmp_path / "a.jsonl").write_text('{"text": "new"}\n' * 50)
    changed = prepare_dataset(cfg)
    assert not changed.from_cache and changed.path != first.path
    assert is_prepared(first.path) and is_prepared(changed.path)


def test_a_prepared_directory_is_a_data_path(tmp_path, in_process):
    corpus = write_jsonl(tmp_path / "a.jsonl")
    cfg = DataConfig(path=str(corpus), tokenizer="bpe", vocab_size=300, val_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), dataset_dir=str(tmp_path / "ds"))
    made = prepare_dataset(cfg)
    assert made.path == str(tmp_path / "ds") and is_prepared(str(tmp_path / "ds"))
    assert not is_prepared(str(corpus)) and not is_prepared(str(tmp_path)) and not is_prepared("")
    # Used as it is: its tokenizer and split, whatever data.* says about a corpus.
    given = DataConfig(path=str(tmp_path / "ds"), val_fraction=0.5, vocab_size=999,
                       cache_dir=str(tmp_path / "elsewhere"))
    ds = prepare_dataset(given)
    assert ds.from_cache and ds.path == made.path and ds.fingerprint == made.fingerprint
    assert ds.tokenizer.digest == made.tokenizer.digest and ds.stats == made.stats
    assert ds.val_fraction == 0.2 and len(in_process.sources) == 1
    assert expected_vocab(given) == 300
    pipeline.check_cache_dir(given)  # nothing to write: passes, and lists no corpus
    assert not (tmp_path / "elsewhere").exists()
    corpus_view = pipeline.prepare_corpus(DataConfig(path=str(tmp_path / "ds"), seq_len=8))
    assert corpus_view.from_cache and corpus_view.train.shape[1] == 9
    # data.tokenizer is checked when it names one: byte, or a file, must be the dataset's.
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: byte is not the tokenizer the "
                                          r"prepared dataset .* was written with"):
        prepare_dataset(DataConfig(path=str(tmp_path / "ds"), tokenizer="byte"))
    made.tokenizer.save(tmp_path / "same.json")
    assert prepare_dataset(DataConfig(path=str(tmp_path / "ds"),
                                      tokenizer=str(tmp_path / "same.json"))).from_cache
    Tokenizer.byte_level().save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*other\.json is not"):
        prepare_dataset(DataConfig(path=str(tmp_path / "ds"),
                                   tokenizer=str(tmp_path / "other.json")))


def test_a_damaged_dataset_path_is_refused_naming_the_shard(tmp_path, in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"), dataset_dir=str(tmp_path / "ds"))
    ds = prepare_dataset(cfg)
    victim = ds.manifest["splits"]["train"]["shards"][1]["name"]
    data = (tmp_path / "ds" / victim).read_bytes()
    (tmp_path / "ds" / victim).write_bytes(data[:-2])
    with pytest.raises(ConfigError, match=rf"^data\.path: .*{victim}: {len(data) - 2} bytes, "
                                          rf"the manifest says {len(data)} bytes"):
        prepare_dataset(DataConfig(path=str(tmp_path / "ds")))
    (tmp_path / "ds" / MANIFEST).write_text("{not json")
    with pytest.raises(ConfigError, match=r"^data\.path: .*not a raypar token manifest"):
        prepare_dataset(DataConfig(path=str(tmp_path / "ds")))
    # Prepared from its corpus, the same directory is written again: a damaged dataset
    # is never taken for a finished one (here the manifest itself is unreadable: refused).
    with pytest.raises(ConfigError, match=r"^data\.dataset_dir: .*manifest\.json is not a "
                                          r"raypar token manifest.*choose another directory"):
        prepare_dataset(cfg)


def test_a_cut_shard_in_the_cache_is_prepared_again(tmp_path, in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"))
    ds = prepare_dataset(cfg)
    victim = Path(ds.path) / ds.manifest["splits"]["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:-2])
    again = prepare_dataset(cfg)
    assert not again.from_cache and again.path == ds.path
    assert shard_files(Path(ds.path)) == named_files(again.manifest)  # the old ones went
    assert_matches_reference(again, cfg)


class Killed(BaseException):
    """The driver dying (kill -9): nothing after it runs."""


def test_a_crashed_attempt_is_never_finished_and_the_next_one_starts_clean(tmp_path,
                                                                           in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                     dataset_dir=str(tmp_path / "ds"))

    def killed(*args, **kwargs):  # after the tasks wrote their shards, before the manifest
        raise Killed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "write_manifest", killed)
        mp.setattr(prepare, "_remove_attempt", lambda where, attempt: None)  # no clean-up
        with pytest.raises(Killed):
            prepare_dataset(cfg)
    stale = shard_files(tmp_path / "ds")
    assert stale and not (tmp_path / "ds" / MANIFEST).exists()
    assert not is_prepared(str(tmp_path / "ds"))
    sources = resolve_sources(cfg.path, "auto")
    assert not prepare.lookup(cfg, sources, file_stats(sources), tmp_path / "cache")
    with pytest.raises(ConfigError, match="no manifest.json"):
        TokenDataset.open(tmp_path / "ds")
    ds = prepare_dataset(cfg)
    assert not ds.from_cache
    assert shard_files(tmp_path / "ds") == named_files(ds.manifest)  # the stale ones went
    assert not stale & named_files(ds.manifest), "each attempt writes its own names"
    assert_matches_reference(ds, cfg)


def test_a_failed_attempt_removes_its_files(tmp_path, in_process, monkeypatch):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"), dataset_dir=str(tmp_path / "ds"))

    def fails(*args, **kwargs):
        raise RuntimeError("lost the driver's connection")
    monkeypatch.setattr(prepare, "write_manifest", fails)
    with pytest.raises(RuntimeError):
        prepare_dataset(cfg)
    assert shard_files(tmp_path / "ds") == set()


def test_force_keeps_the_finished_dataset_until_the_new_one_replaces_it(tmp_path, in_process,
                                                                        monkeypatch):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"), dataset_dir=str(tmp_path / "ds"))
    first = prepare_dataset(cfg)
    reading = TokenDataset.open(first.path)  # a run reading it meanwhile
    expected = reading.blocks(range(reading.n_blocks(15)), 15)
    real = prepare.write_manifest

    def fails(*args, **kwargs):
        raise RuntimeError("killed while writing")
    monkeypatch.setattr(prepare, "write_manifest", fails)
    with pytest.raises(RuntimeError):
        prepare_dataset(cfg, force=True)
    # The crashed forced attempt left the finished dataset as it was.
    assert is_prepared(first.path) and shard_files(tmp_path / "ds") == named_files(first.manifest)
    assert np.array_equal(reading.blocks(range(reading.n_blocks(15)), 15), expected)
    monkeypatch.setattr(prepare, "write_manifest", real)
    again = prepare_dataset(cfg, force=True)
    assert not again.from_cache and again.manifest != first.manifest
    # Once replaced, only the new manifest's files remain.
    assert shard_files(tmp_path / "ds") == named_files(again.manifest)


def test_concurrent_preparations_of_one_dataset_take_turns(tmp_path, in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                     dataset_dir=str(tmp_path / "ds"))
    in_process.delay = 0.5  # both find no manifest, then one waits for the other's turn
    results, errors = [], []

    def run():
        try:
            results.append(prepare_dataset(cfg))
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 2
    assert sorted(r.from_cache for r in results) == [False, True]
    assert results[0].manifest == results[1].manifest
    assert shard_files(tmp_path / "ds") == named_files(results[0].manifest)
    assert_matches_reference(results[0], cfg)


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, in_process,
                                                                monkeypatch):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "c"), val_fraction=0.0)
    real, written = shards._put, []

    def fills_up(target, data):
        if len(written) == 4:
            raise OSError(28, "No space left on device")
        written.append(target)
        real(target, data)
    monkeypatch.setattr(shards, "_put", fills_up)
    with pytest.raises(ConfigError, match=r"^data\.cache_dir: cannot write .*\.tok \(No space "
                                          r"left on device\); set data\.cache_dir to a "
                                          r"writable directory$"):
        prepare_dataset(cfg)
    (folder,) = (tmp_path / "c" / "datasets").iterdir()
    assert shard_files(folder) == set() and not (folder / MANIFEST).exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ConfigError, match=r"^data\.dataset_dir: cannot write .*No space"):
        prepare_dataset(DataConfig(**{**cfg.__dict__, "dataset_dir": str(tmp_path / "ds")}))


def test_another_dataset_in_the_directory_is_never_overwritten(tmp_path, in_process):
    ds_dir = str(tmp_path / "ds")
    first = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                       cache_dir=str(tmp_path / "cache"), dataset_dir=ds_dir)
    prepare_dataset(first)
    other = DataConfig(**{**first.__dict__, "path": str(write_texts(tmp_path / "t"))})
    with pytest.raises(ConfigError, match=r"^data\.dataset_dir: .*ds holds a dataset prepared "
                                          r"from another corpus or tokenizer"):
        prepare_dataset(other)
    assert prepare_dataset(first).from_cache


def test_unwritable_dataset_dir_is_refused_before_any_work(tmp_path, in_process):
    (tmp_path / "a-file").write_text("x")
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"),
                     dataset_dir=str(tmp_path / "a-file" / "ds"))
    for call in (pipeline.check_cache_dir, prepare_dataset):
        with pytest.raises(ConfigError, match=r"^data\.dataset_dir: cannot write .*a-file/ds "
                                              r"\(.*\); set data\.dataset_dir to a writable"):
            call(cfg)
    assert in_process.sources == []


def test_bpe_trains_on_a_bounded_sample_of_the_training_documents(tmp_path, in_process,
                                                                  monkeypatch):
    samples = []
    real = tokenizer_mod.train_bpe

    def recording(texts, vocab_size):
        texts = list(texts)
        samples.append(texts)
        return real(iter(texts), vocab_size)
    monkeypatch.setattr(tokenizer_mod, "train_bpe", recording)
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="bpe",
                     vocab_size=280, val_fraction=0.3, cache_dir=str(tmp_path / "cache"),
                     tokenizer_sample_bytes=1000)
    ds = prepare_dataset(cfg)
    docs = whole_file_documents(cfg)
    train_texts = [t for t, v in zip(docs["text"].to_pylist(), docs["val"].to_pylist()) if not v]
    (sample,) = samples
    assert sum(len(t.encode()) for t in sample) <= 1000
    assert sum(len(t.encode()) for t in sample) > 1000 - 4  # a cut character at most
    assert sample[:-1] == train_texts[:len(sample) - 1]  # the first ones, in order
    assert train_texts[len(sample) - 1].startswith(sample[-1])
    assert ds.manifest["meta"]["tokenizer_sample_bytes"] == 1000
    # The sample is part of the tokenizer's key: another size trains another one.
    more = prepare_dataset(DataConfig(**{**cfg.__dict__, "tokenizer_sample_bytes": 5000}))
    assert len(samples) == 2 and more.fingerprint != ds.fingerprint
    assert len(list((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))) == 2
    assert prepare_dataset(cfg).from_cache and len(samples) == 2


def test_empty_corpus_and_small_splits_keep_their_messages(tmp_path, in_process):
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n\n{"text": ""}\n')
    with pytest.raises(ConfigError, match=r"^data\.path: the corpus is empty: 1 jsonl files "
                                          r"hold no text in data\.text_column='text'$"):
        prepare_dataset(DataConfig(path=str(tmp_path / "nulls.jsonl"), tokenizer="byte",
                                   cache_dir=str(tmp_path / "c")))
    assert not list((tmp_path / "c" / "datasets").rglob("*.tok"))
    short = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", n=3)), tokenizer="byte",
                       val_fraction=0.0, seq_len=10_000, cache_dir=str(tmp_path / "c"))
    ds = prepare_dataset(short)  # seq_len is no part of a dataset: it prepares
    with pytest.raises(ConfigError, match=rf"^data\.seq_len: the training split has "
                                          rf"{ds.tokens('train')} tokens, fewer than "
                                          rf"data\.seq_len\+1 = 10001"):
        ds.check_blocks(10_000)
    with pytest.raises(ConfigError, match=r"^data\.seq_len: "):
        pipeline.prepare_corpus(short)


def test_tokenizer_sample_bytes_must_be_positive():
    with pytest.raises(ConfigError, match=r"^data\.tokenizer_sample_bytes: must be > 0, got 0"):
        load_spec(None, ["data.tokenizer_sample_bytes=0"])
    spec = load_spec(None, ["data.dataset_dir=s3://bucket/ds"])
    assert spec.data.dataset_dir == "s3://bucket/ds"
    assert spec.data.tokenizer_sample_bytes == 64_000_000


def raypar(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_cli_prepare_reuses_without_ray_and_refuses_in_one_line(tmp_path, in_process):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl")), tokenizer="byte",
                     cache_dir=str(tmp_path / "cache"))
    ds = prepare_dataset(cfg)
    sets = ["--set", f"data.path={cfg.path}", "--set", "data.tokenizer=byte",
            "--set", f"data.cache_dir={cfg.cache_dir}"]
    out = raypar("prepare", *sets)  # finished: no Ray starts (a unit test refuses ray.init)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith(f"reused {ds.path}: {ds.stats['n_docs']:,} documents, ")
    assert f"{ds.shards('train') + ds.shards('val')} shards" in line
    given = raypar("prepare", "--set", f"data.path={ds.path}")
    assert given.returncode == 0 and given.stdout.startswith(f"reused {ds.path}: ")
    for args, fragment in (((f"data.path={tmp_path / 'nowhere'}",), "data.path: no such file"),
                           (("data.tokenizer_sample_bytes=-1",), "tokenizer_sample_bytes"),
                           ((f"data.path={cfg.path}", f"data.cache_dir={tmp_path / 'a.jsonl'}"),
                            "data.cache_dir: cannot write")):
        bad = raypar("prepare", *[x for a in args for x in ("--set", a)])
        assert bad.returncode == 2, bad.stderr
        (err,) = bad.stderr.strip().splitlines()
        assert err.startswith("raypar: error: ") and fragment in err, err


# ---------------------------------------------------------------- on a real local Ray

@pytest.mark.ray
def test_ray_tasks_write_the_same_stream_as_the_in_memory_path(ray_local, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(decode, "CHUNK_BYTES", 2000)  # many read tasks over one file
    write_jsonl(tmp_path / "j" / "a.jsonl", n=400)
    write_jsonl(tmp_path / "j" / "b.jsonl", n=30, seed=2)
    cfg = DataConfig(path=str(tmp_path / "j"), tokenizer="bpe", vocab_size=300, seq_len=31,
                     val_fraction=0.2, tokenizer_sample_bytes=3000,
                     cache_dir=str(tmp_path / "cache"))
    snaps = []
    ds = prepare_dataset(cfg, progress=snaps.append, progress_every=0.05)
    assert not ds.from_cache and ds.shards("train") > 5 and ds.shards("val") > 1
    assert_matches_reference(ds, cfg)
    assert snaps and all(s["path"] == ds.path for s in snaps)
    # Parquet, cut by row groups, and the byte tokenizer.
    pq_cfg = DataConfig(path=str(write_parquet(tmp_path / "p" / "a.parquet", n=300)),
                        text_column="body", tokenizer="byte", seq_len=15, val_fraction=0.3,
                        cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(decode, "CHUNK_BYTES", 300)
    pq_ds = prepare_dataset(pq_cfg)
    assert pq_ds.shards("train") > 2
    assert_matches_reference(pq_ds, pq_cfg)

    # Reused: no Ray Data work at all.
    def no_work(*args):
        raise AssertionError("the finished dataset was prepared again")
    monkeypatch.setattr(pipeline, "_documents", no_work)
    again = prepare_dataset(cfg)
    assert again.from_cache and again.manifest == ds.manifest


@pytest.mark.ray
def test_ray_prepare_command(ray_local, tmp_path):
    corpus = write_texts(tmp_path / "t", n=20)
    sets = ["--set", f"data.path={corpus}", "--set", "data.tokenizer=byte",
            "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"data.dataset_dir={tmp_path / 'ds'}"]
    first = raypar("prepare", *sets)
    assert first.returncode == 0, first.stderr
    (line,) = first.stdout.splitlines()
    assert line.startswith(f"prepared {tmp_path / 'ds'}: 20 documents, ") and " s" in line
    again = raypar("prepare", *sets)
    assert again.returncode == 0 and again.stdout.startswith(f"reused {tmp_path / 'ds'}: ")
    forced = raypar("prepare", *sets, "--force")
    assert forced.returncode == 0 and forced.stdout.startswith("prepared ")
    manifest = shards.read_manifest(tmp_path / "ds")
    assert shard_files(tmp_path / "ds") == named_files(manifest)
    bad = (tmp_path / "bad.jsonl")
    bad.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    out = raypar("prepare", "--set", f"data.path={bad}", "--set", "data.tokenizer=byte",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"raypar: error: data.text_column: {bad} line 2 has no key 'text' (found: body)"]
