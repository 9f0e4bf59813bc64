"""The Ray Data stages of corpus preparation, and the in-memory block arrays built on them.

    import ray
    from raypar.config import DataConfig
    from raypar.data import prepare_corpus
    ray.init()
    corpus = prepare_corpus(DataConfig(tokenizer="byte", seq_len=128))
    corpus.train.shape            # (n_blocks, seq_len + 1), uint16

Ray Data does all the work that grows with the corpus: read tasks read pieces of the
files (decode.py: byte ranges of a big jsonl file, row groups of a big parquet file) and
decode them to documents, and the next stage, fused into the same tasks, tokenizes each
block of documents and writes it as token shards into the dataset directory
(write_batch). What comes back to the driver is one small row per shard written; the
driver assembles the manifest from them (prepare.py). Documents keep their order in the
stream by their (file, row) position, whatever order tasks finish in.

prepare_corpus is the small-corpus view for code that wants whole arrays (the bench's
baselines, tests): it prepares the dataset (or reuses it) and reads all its blocks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from raypar.config import ConfigError, DataConfig
from raypar.data import decode
from raypar.data.corpus import file_stats, filesystem_for, resolve_sources
from raypar.data.packing import pack, stream_length, token_dtype
from raypar.data.shards import ShardInfo, TokenDataset, write_shard
from raypar.data.tokenizer import Tokenizer
from raypar.train import storage

log = logging.getLogger("raypar.data")


@dataclass
class PreparedCorpus:
    tokenizer: Tokenizer
    train: np.ndarray
    """Training blocks, (n, seq_len + 1); block i has global index i."""
    val: np.ndarray
    """Validation blocks, (m, seq_len + 1); m may be 0 only when val_fraction is 0."""
    stats: dict = field(default_factory=dict)
    fingerprint: str = ""
    """Identifies corpus + tokenizer + seq_len: log it to tell runs' data apart."""
    from_cache: bool = False


def default_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or "~/.cache/raypar").expanduser()


# ---------------------------------------------------------------- the cache directory

def cache_dir_error(cfg: DataConfig, cache: Path, e: OSError) -> str:
    """The one line for a cache directory that cannot be written."""
    reason = e.strerror or str(e) or type(e).__name__
    if cfg.cache_dir:
        return (f"data.cache_dir: cannot write {cache} ({reason}); set data.cache_dir to a "
                f"writable directory")
    # Unset, it lies under HOME: either fix does.
    return (f"data.cache_dir: cannot write the default {cache} ({reason}); set data.cache_dir, "
            f"or HOME, to a writable directory")


def _probe_dir(folder: Path) -> None:
    """Create folder if needed and write a file in it; OSError when that fails. Folders it
    made are removed again: the check leaves nothing behind. (Another run probing the same
    new folder may remove it under this one: then it tries again.)"""
    for attempt in range(5):
        made: list[Path] = []
        probe = folder / f".raypar-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            made = [p for p in (folder, *folder.parents) if not p.exists()]
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
            return
        except (FileNotFoundError, FileExistsError):  # (mkdir's, when one is removed)
            if attempt == 4:
                raise
        finally:
            for p in made:  # innermost first
                try:
                    p.rmdir()
                except OSError:
                    break


def check_cache_dir(cfg: DataConfig, sources: Optional[list[str]] = None,
                    stats: Optional[list] = None, cache_dir: Optional[Path] = None) -> None:
    """Refuse a cache or dataset directory this run must write but cannot, before any work:
    in one line naming data.cache_dir or data.dataset_dir. A read-only cache that already
    holds this config's tokenizer and prepared dataset passes: reusing them only reads, and
    so does a data.path that is itself a prepared dataset. Pass the resolved sources and
    their file_stats when you have them, to save listing the corpus again."""
    from raypar.data import prepare  # (prepare imports this module)
    if prepare.is_prepared(cfg.path):
        return
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    if sources is None:
        sources = resolve_sources(cfg.path, cfg.format)
    stats = stats if stats is not None else file_stats(sources)
    if prepare.lookup(cfg, sources, stats, cache):
        return
    folders = ["tokenizers"] if cfg.tokenizer == "bpe" else []
    folders += [] if cfg.dataset_dir else ["datasets"]
    for name in folders:
        try:
            _probe_dir(cache / name)
        except OSError as e:
            raise ConfigError(cache_dir_error(cfg, cache, e)) from None
    if cfg.dataset_dir:
        prepare.check_dataset_dir(cfg.dataset_dir)


# ---------------------------------------------------------------- Ray Data: read

@lru_cache(maxsize=None)
def _corpus_datasource():
    """The Datasource class over decode.py's pieces, defined on first use: importing
    ray.data takes seconds, and a run whose dataset is already prepared never needs it.
    (A custom Datasource rather than read_binary_files: that one reads every file whole.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class CorpusDatasource(Datasource):
        """Read tasks over runs of consecutive pieces, in document order."""

        def __init__(self, pieces: list[decode.Piece], fmt: str, text_column: str,
                     val_fraction: float, fs):
            super().__init__()
            self.pieces, self.fs = pieces, fs
            self.args = (fmt, text_column, val_fraction)

        def estimate_inmemory_data_size(self) -> int:
            return sum(p.size for p in self.pieces)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                           data_context=None) -> list:
            tasks = []
            for group in group_pieces(self.pieces, parallelism):
                meta = BlockMetadata(num_rows=None, size_bytes=sum(p.size for p in group),
                                     input_files=sorted({p.src for p in group}),
                                     exec_stats=None)
                tasks.append(ReadTask(partial(decode.read_pieces, group, *self.args,
                                              fs=self.fs), meta, schema=decode.SCHEMA,
                                      per_task_row_limit=per_task_row_limit))
            return tasks

    return CorpusDatasource


def group_pieces(pieces: list[decode.Piece], parallelism: int) -> list[list[decode.Piece]]:
    """Consecutive pieces in runs of about total/parallelism bytes, at most
    decode.CHUNK_BYTES a run (a single larger piece, a big text file, is a run alone):
    many small files share a task, and a big corpus gets tasks of CHUNK_BYTES."""
    total = sum(p.size for p in pieces)
    target = max(1, min(decode.CHUNK_BYTES, -(-total // max(1, parallelism))))
    runs: list[list[decode.Piece]] = []
    size = 0
    for p in pieces:
        if not runs or size + p.size > target:
            runs.append([])
            size = 0
        runs[-1].append(p)
        size += p.size
    return runs


def _documents(sources: list[str], fmt: str, cfg: DataConfig):
    """Ray Dataset of decoded documents (file, row, text, replaced, val, error), in order."""
    # Deferred: ray.data takes seconds to import, and a prepared dataset never needs it.
    import ray.data

    pieces = decode.plan_pieces(sources, fmt, [s.size for s in file_stats(sources)])
    fs, _ = filesystem_for(sources)
    ds = ray.data.read_datasource(_corpus_datasource()(
        pieces, fmt, cfg.text_column, cfg.val_fraction, fs))
    # Blocks come out in document order: the tokenizer's sample is the corpus's first
    # training documents, and each block handed to write_batch is a contiguous run of them.
    ds.context.execution_options.preserve_order = True
    return ds


def _batches(ds) -> Iterator[pa.Table]:
    """Batches in order; a user error found inside a task becomes one ConfigError here.
    Closing this generator early stops the Ray Data execution behind it."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for batch in it:
            errors = batch["error"].drop_null()
            if len(errors):
                raise ConfigError(errors[0].as_py())
            yield batch
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def sample_texts(ds, budget: int) -> Iterator[str]:
    """The training documents' texts in document order, up to `budget` UTF-8 bytes in all
    (the last one cut short): the tokenizer's deterministic, bounded sample. Only what the
    sample needs is read: the iteration stops there."""
    taken = 0
    batches = _batches(ds)
    try:
        for batch in batches:
            for text, val in zip(batch["text"].to_pylist(), batch["val"].to_pylist()):
                if val:
                    continue
                data = text.encode("utf-8")
                if taken + len(data) >= budget:
                    yield data[:budget - taken].decode("utf-8", "ignore")
                    return
                taken += len(data)
                yield text
    finally:
        batches.close()


# ---------------------------------------------------------------- Ray Data: tokenize, write

_SHARD_FIELDS = [(f.name, pa.string() if f.type in (str, "str") else pa.int64())
                 for f in fields(ShardInfo)]
WRITE_SCHEMA = pa.schema(
    [("split", pa.string()), ("file", pa.int32()), ("row", pa.int64()),
     ("last_file", pa.int32()), ("last_row", pa.int64()), *_SHARD_FIELDS,
     ("replaced", pa.int64()), ("replaced_files", pa.list_(pa.int32())),
     ("error", pa.string())])
"""write_batch's output: one row per shard written (its ShardInfo, the (file, row) of its
first and last document, bytes replaced in decoding), or one row with `error` set."""

_ENCODE_CHARS = 4 << 20  # text encoded per call: bounds the tokenizer's Python lists


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    # Built once per worker process, not once per batch.
    return Tokenizer.from_json(tokenizer_json)


def shard_stem(split: str, attempt: str, file: int, row: int) -> str:
    """A shard's file name stem: its split, the preparation attempt that wrote it, and the
    (file, row) of its first document, which fixes its place in the stream."""
    return f"{split}-{attempt}-{int(file):07d}-{int(row):013d}"


def _encode(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's token ids, encoded a few MB of text at a time."""
    out: list[np.ndarray] = []
    start = 0
    while start < len(texts):
        stop, chars = start, 0
        while stop < len(texts) and (stop == start or chars < _ENCODE_CHARS):
            chars += len(texts[stop])
            stop += 1
        values, offsets = tok.encode_flat(texts[start:stop])
        out += [values[offsets[i]:offsets[i + 1]] for i in range(stop - start)]
        start = stop
    return out


def _write_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=WRITE_SCHEMA)


def write_batch(batch: pa.Table, tokenizer_json: str, out_dir: str, attempt: str,
                field_name: str) -> pa.Table:
    """map_batches UDF: a contiguous run of documents -> its train documents tokenized
    into one shard and its validation documents into another (each document followed by
    the end-of-text id), written to out_dir; returns one row per shard (WRITE_SCHEMA).

    A write that fails (disk full, permission) comes back as an `error` row naming
    field_name (data.cache_dir or data.dataset_dir), like the decode stage's errors."""
    errors = batch["error"].drop_null()
    if len(errors):
        return _write_rows([{"error": errors[0].as_py()}])
    tok = _tokenizer(tokenizer_json)
    dtype = token_dtype(tok.vocab_size)
    is_val = batch["val"].to_numpy(zero_copy_only=False)
    rows = []
    for split, mask in (("train", ~is_val), ("val", is_val)):
        idx = np.flatnonzero(mask)
        if not idx.size:
            continue
        part = batch.take(pa.array(idx))
        files = part["file"].to_numpy(zero_copy_only=False)
        docs_at = part["row"].to_numpy(zero_copy_only=False)
        stem = shard_stem(split, attempt, files[0], docs_at[0])
        try:
            info = write_shard(out_dir, 0, _encode(tok, part["text"].to_pylist()), dtype,
                               eot_id=tok.eot_id, split=split, stem=stem)
        except OSError as e:
            target = storage.join(out_dir, stem + ".tok")
            return _write_rows([{"error": f"{field_name}: cannot write {target} "
                                          f"({e.strerror or e}); set {field_name} to a "
                                          f"writable directory"}])
        replaced = part["replaced"].to_numpy(zero_copy_only=False)
        rows.append({"split": split, "file": int(files[0]), "row": int(docs_at[0]),
                     "last_file": int(files[-1]), "last_row": int(docs_at[-1]),
                     **{name: getattr(info, name) for name, _ in _SHARD_FIELDS},
                     "replaced": int(replaced.sum()),
                     "replaced_files": sorted({int(f) for f in files[replaced > 0]})})
    return _write_rows(rows)


# ---------------------------------------------------------------- whole arrays

def check_split_sizes(n_train: int, n_val: int, train_docs: int, val_docs: int,
                      seq_len: int, val_fraction: float) -> tuple[int, int]:
    """(train blocks, val blocks) of splits whose streams (eot included) hold n_train and
    n_val tokens; a split too small for one block is a ConfigError naming the field that
    made it so."""
    block_len = seq_len + 1
    n_train_blocks, n_val_blocks = n_train // block_len, n_val // block_len
    if n_train_blocks == 0 and val_fraction > 0 and n_train + n_val >= block_len:
        # The corpus holds a block; the validation share took it.
        raise ConfigError(f"data.val_fraction: {val_fraction} sends {val_docs} of "
                          f"{train_docs + val_docs} documents to validation and leaves the "
                          f"training split {n_train} tokens, fewer than data.seq_len+1 = "
                          f"{block_len}; lower data.val_fraction")
    if n_train_blocks == 0:
        raise ConfigError(f"data.seq_len: the training split has {n_train} tokens, fewer than "
                          f"data.seq_len+1 = {block_len}; lower data.seq_len or add data")
    if val_fraction > 0 and n_val_blocks == 0:
        raise ConfigError(f"data.val_fraction: the validation split ({val_docs} documents, "
                          f"{n_val} tokens) holds no block of data.seq_len+1 = {block_len} "
                          f"tokens; raise data.val_fraction, lower data.seq_len, or set it to 0")
    return n_train_blocks, n_val_blocks


def split_and_pack(docs: list[np.ndarray], is_val, tok: Tokenizer,
                   cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train blocks, val blocks, their counts) from tokenized documents and their split,
    all in memory: the reference a prepared dataset's blocks equal (tests); a split too
    small for one block is a ConfigError naming the field that made it so."""
    block_len = cfg.seq_len + 1
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    n_train, n_val = stream_length(train_docs), stream_length(val_docs)
    check_split_sizes(n_train, n_val, len(train_docs), len(val_docs), cfg.seq_len,
                      cfg.val_fraction)
    train = pack(train_docs, tok.eot_id, block_len, tok.vocab_size)
    val = pack(val_docs, tok.eot_id, block_len, tok.vocab_size)
    return train, val, dict(
        n_docs=len(docs), train_docs=len(train_docs), val_docs=len(val_docs),
        train_tokens=n_train - len(train_docs), val_tokens=n_val - len(val_docs),
        dropped_tokens=(n_train - train.size) + (n_val - val.size),
        train_blocks=len(train), val_blocks=len(val), tokenizer=tok.kind,
        vocab_size=tok.vocab_size)


def _blocks(ds, split: str, n: int, seq_len: int, cache: Path) -> np.ndarray:
    """All n blocks of a split of a prepared dataset, in one array."""
    if n == 0:
        return np.zeros((0, seq_len + 1), dtype=np.dtype(ds.manifest["dtype"]))
    # A local dataset is read in place; a remote one through copies of its shards in the cache.
    shard_cache = cache / "shards" if storage.is_uri(ds.path) else None
    return TokenDataset.open(ds.path, shard_cache, split=split).blocks(np.arange(n), seq_len)


def prepare_corpus(cfg: DataConfig, cache_dir: Optional[Path] = None) -> PreparedCorpus:
    """The corpus cfg names as whole arrays of blocks: prepare (or reuse) its dataset with
    prepare.prepare_dataset, then read every block. For small corpora only (the arrays are
    the whole corpus); training reads blocks from the dataset instead.

    Ray must be initialised by the caller when work is needed (else ray.data starts
    a local instance). Raises ConfigError naming the data.* field on user errors.
    """
    from raypar.data.prepare import prepare_dataset  # (prepare imports this module)
    ds = prepare_dataset(cfg, cache_dir)
    n_train, n_val = ds.check_blocks(cfg.seq_len)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    train = _blocks(ds, "train", n_train, cfg.seq_len, cache)
    val = _blocks(ds, "val", n_val, cfg.seq_len, cache)
    streams = sum(ds.manifest["splits"].get(s, {}).get("tokens", 0) for s in ("train", "val"))
    stats = {**ds.stats, "dropped_tokens": streams - train.size - val.size,
             "train_blocks": len(train), "val_blocks": len(val)}
    log.info("corpus: %d files, %d documents, %d train / %d val blocks",
             stats["n_files"], stats["n_docs"], stats["train_blocks"], stats["val_blocks"])
    key = hashlib.sha256(f"{ds.fingerprint}\nseq_len {cfg.seq_len}".encode()).hexdigest()
    return PreparedCorpus(ds.tokenizer, train, val, stats, key, from_cache=ds.from_cache)
