"""Corpus preparation on the driver: Ray Data reads, decodes and tokenizes; the driver packs.

    import ray
    from raypar.config import DataConfig
    from raypar.data import prepare_corpus
    ray.init()
    corpus = prepare_corpus(DataConfig(tokenizer="byte", seq_len=128))
    corpus.train.shape            # (n_blocks, seq_len + 1), uint16

Ray Data does the parallel part (read, decode, tokenize); the driver consumes the
tokenized documents in order and packs them, because packing across document
boundaries is sequential, and the packed result is small (2 bytes a token) and
needs random access by global block index for exact resume, which Ray Train's
dynamic split cannot give. Packed arrays are cached, so a second run with the
same corpus, tokenizer and seq_len starts no Ray Data work at all.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from raypar.config import ConfigError, DataConfig
from raypar.data.corpus import (check_not_empty, corpus_fingerprint, document_names, file_stats,
                                filesystem_for, resolve_format, resolve_sources)
from raypar.data.decode import decode_batch
from raypar.data.packing import pack, stream_length
from raypar.data.tokenizer import Tokenizer, build_tokenizer

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


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    # Built once per worker process, not once per batch.
    return Tokenizer.from_json(tokenizer_json)


def _tokenize_batch(batch: pa.Table, tokenizer_json: str) -> pa.Table:
    values, offsets = _tokenizer(tokenizer_json).encode_flat(batch["text"].to_pylist())
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return batch.drop_columns(["text"]).append_column("tokens", tokens)


def _documents(sources: list[str], fmt: str, cfg: DataConfig):
    """Ray Dataset of decoded documents (file, row, text, replaced, val, error), in source order."""
    # Deferred: ray.data takes seconds to import, and a cached corpus never needs it.
    import ray.data
    from ray.data import DataContext

    # Blocks come out in input order, so the document stream is the same every run.
    DataContext.get_current().execution_options.preserve_order = True
    fs, paths = filesystem_for(sources)
    files = {p: (i, name, src) for i, (p, name, src)
             in enumerate(zip(paths, document_names(sources), sources))}
    # Read as bytes for every format: decoding ourselves counts undecodable bytes,
    # and splitting jsonl/parquet ourselves numbers lines and rows for document ids.
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    return ds.map_batches(decode_batch, batch_format="pyarrow", fn_kwargs=dict(
        fmt=fmt, text_column=cfg.text_column, val_fraction=cfg.val_fraction, files=files))


def _batches(ds) -> Iterator[pa.Table]:
    """Batches in order; a user error found inside a task becomes one ConfigError here."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        errors = batch["error"].drop_null()
        if len(errors):
            raise ConfigError(errors[0].as_py())
        yield batch


def _train_texts(ds) -> Iterator[str]:
    for batch in _batches(ds):
        for text, val in zip(batch["text"].to_pylist(), batch["val"].to_pylist()):
            if not val:
                yield text


def _collect(ds) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """All tokenized documents sorted by (file, row), with their split and replaced bytes."""
    docs, files, rows, val, replaced = [], [], [], [], []
    for b in _batches(ds):
        tokens = b["tokens"].combine_chunks()
        values, offsets = tokens.values.to_numpy(), tokens.offsets.to_numpy()
        docs += [values[offsets[i]:offsets[i + 1]] for i in range(len(tokens))]
        for out, name in ((files, "file"), (rows, "row"), (val, "val"), (replaced, "replaced")):
            out.append(b[name].to_numpy(zero_copy_only=False))
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
    files, rows = cat(files, np.int64), cat(rows, np.int64)
    # preserve_order already yields this order; sorting makes it independent of that.
    order = np.lexsort((rows, files))
    return ([docs[i] for i in order], files[order], cat(val, bool)[order],
            cat(replaced, np.int64)[order])


def _cache_key(fp: str, tok: Tokenizer, seq_len: int) -> str:
    text = f"{fp}\ntokenizer {tok.digest}\nseq_len {seq_len}"
    return hashlib.sha256(text.encode()).hexdigest()


def _load_cached(entry: Path) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
    try:
        stats = json.loads((entry / "stats.json").read_text())
        return np.load(entry / "train.npy"), np.load(entry / "val.npy"), stats
    except (OSError, ValueError):
        return None


def _save_cached(entry: Path, train: np.ndarray, val: np.ndarray, stats: dict,
                 cfg: DataConfig) -> None:
    # Fill a private directory, then rename it into place: readers see all or nothing.
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry left by a crash
        tmp.mkdir(parents=True)
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    except OSError as e:  # e.g. the disk filled up since check_cache_dir looked
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(cache_dir_error(cfg, entry.parent.parent, e)) from None
    try:
        os.replace(tmp, entry)
    except OSError:  # another run got there first with the same content
        shutil.rmtree(tmp, ignore_errors=True)


def cache_dir_error(cfg: DataConfig, cache: Path, e: OSError) -> str:
    """The one line for a cache directory that cannot be written."""
    reason = e.strerror or str(e) or type(e).__name__
    if cfg.cache_dir:
        return (f"data.cache_dir: cannot write {cache} ({reason}); set data.cache_dir to a "
                f"writable directory")
    # Unset, it lies under HOME: either fix does.
    return (f"data.cache_dir: cannot write the default {cache} ({reason}); set data.cache_dir, "
            f"or HOME, to a writable directory")


class _NeedsWork(Exception):
    """Raised instead of reading the corpus: the cache cannot answer on its own."""


def _needs_work():
    raise _NeedsWork


def _cache_hit(cfg: DataConfig, sources: list[str], stats: list, cache: Path) -> bool:
    """Whether the cache already holds this config's tokenizer and packed corpus, so
    prepare_corpus would only read from it (no Ray Data work, no write)."""
    fp = corpus_fingerprint(sources, cfg, stats)
    try:
        tok = build_tokenizer(cfg, sources, cache, _needs_work, fingerprint=fp)
    except _NeedsWork:  # a bpe tokenizer that is not trained yet
        return False
    entry = cache / "corpus" / _cache_key(fp, tok, cfg.seq_len)[:24]
    return all((entry / name).is_file() for name in ("train.npy", "val.npy", "stats.json"))


def _probe_dir(folder: Path) -> None:
    """Create folder if needed and write a file in it; OSError when that fails. Folders it
    made are removed again: the check leaves nothing behind."""
    made: list[Path] = []
    probe = folder / f".raypar-probe-{os.getpid()}"
    try:
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    finally:
        for p in made:  # innermost first
            try:
                p.rmdir()
            except OSError:
                break


def check_cache_dir(cfg: DataConfig, sources: Optional[list[str]] = None,
                    stats: Optional[list] = None, cache_dir: Optional[Path] = None) -> None:
    """Refuse a cache directory this run must write but cannot, before any work: in one
    line naming data.cache_dir. A read-only cache that already holds this config's
    prepared corpus passes: a cache hit only reads. Pass the resolved sources and their
    file_stats when you have them, to save listing the corpus again."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    if sources is None:
        sources = resolve_sources(cfg.path, cfg.format)
    stats = stats if stats is not None else file_stats(sources)
    if _cache_hit(cfg, sources, stats, cache):
        return
    folders = ["corpus", "tokenizers"] if cfg.tokenizer == "bpe" else ["corpus"]
    for name in folders:
        try:
            _probe_dir(cache / name)
        except OSError as e:
            raise ConfigError(cache_dir_error(cfg, cache, e)) from None


def _report(stats: dict) -> None:
    if stats["replaced_bytes"]:
        log.warning("replaced %d undecodable bytes in %d files (not UTF-8; each run of "
                    "bad bytes reads as U+FFFD)", stats["replaced_bytes"],
                    stats["files_with_replacements"])
    log.info("corpus: %d files, %d documents, %d train / %d val blocks",
             stats["n_files"], stats["n_docs"], stats["train_blocks"], stats["val_blocks"])


def prepare_corpus(cfg: DataConfig, cache_dir: Optional[Path] = None) -> PreparedCorpus:
    """Resolve, read, tokenize, split and pack the corpus cfg names (cached by content).

    Ray must be initialised by the caller when work is needed (else ray.data starts
    a local instance). Raises ConfigError naming the data.* field on user errors.
    """
    sources = resolve_sources(cfg.path, cfg.format)
    fmt = resolve_format(sources, cfg.format)
    stats_f = file_stats(sources)
    check_not_empty(sources, stats_f)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(cfg)
    # Before any work: an unwritable cache would otherwise fail only after all of it.
    check_cache_dir(cfg, sources, stats_f, cache)
    fp = corpus_fingerprint(sources, cfg, stats_f)
    docs_ds = None

    def documents():
        nonlocal docs_ds
        if docs_ds is None:
            docs_ds = _documents(sources, fmt, cfg)
        return docs_ds

    tok = build_tokenizer(cfg, sources, cache, lambda: _train_texts(documents()), fingerprint=fp)
    key = _cache_key(fp, tok, cfg.seq_len)
    entry = cache / "corpus" / key[:24]
    cached = _load_cached(entry)
    if cached is not None:
        train, val, stats = cached
        _report(stats)
        return PreparedCorpus(tok, train, val, stats, key, from_cache=True)

    tokenized = documents().map_batches(_tokenize_batch, batch_format="pyarrow",
                                        fn_kwargs=dict(tokenizer_json=tok.to_json()))
    docs, files, is_val, replaced = _collect(tokenized)
    if not docs:
        where = "" if fmt == "text" else f" in data.text_column={cfg.text_column!r}"
        raise ConfigError(f"data.path: the corpus is empty: {len(sources)} {fmt} files hold "
                          f"no text{where}")
    train, val, counts = split_and_pack(docs, is_val, tok, cfg)
    stats = dict(n_files=len(sources), **counts, replaced_bytes=int(replaced.sum()),
                 files_with_replacements=len(np.unique(files[replaced > 0])), format=fmt)
    _save_cached(entry, train, val, stats, cfg)
    _report(stats)
    return PreparedCorpus(tok, train, val, stats, key)


def split_and_pack(docs: list[np.ndarray], is_val, tok: Tokenizer,
                   cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train blocks, val blocks, their counts) from tokenized documents and their split;
    a split too small for one block is a ConfigError naming the field that made it so."""
    block_len = cfg.seq_len + 1
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    train = pack(train_docs, tok.eot_id, block_len, tok.vocab_size)
    val = pack(val_docs, tok.eot_id, block_len, tok.vocab_size)
    n_train, n_val = stream_length(train_docs), stream_length(val_docs)
    if len(train) == 0 and cfg.val_fraction > 0 and n_train + n_val >= block_len:
        # The corpus holds a block; the validation share took it.
        raise ConfigError(f"data.val_fraction: {cfg.val_fraction} sends {len(val_docs)} of "
                          f"{len(docs)} documents to validation and leaves the training split "
                          f"{n_train} tokens, fewer than data.seq_len+1 = {block_len}; lower "
                          f"data.val_fraction")
    if len(train) == 0:
        raise ConfigError(f"data.seq_len: the training split has {n_train} tokens, fewer than "
                          f"data.seq_len+1 = {block_len}; lower data.seq_len or add data")
    if cfg.val_fraction > 0 and len(val) == 0:
        raise ConfigError(f"data.val_fraction: the validation split ({len(val_docs)} documents, "
                          f"{n_val} tokens) holds no block of data.seq_len+1 = {block_len} "
                          f"tokens; raise data.val_fraction, lower data.seq_len, or set it to 0")
    return train, val, dict(
        n_docs=len(docs), train_docs=len(train_docs), val_docs=len(val_docs),
        train_tokens=n_train - len(train_docs), val_tokens=n_val - len(val_docs),
        dropped_tokens=(n_train - train.size) + (n_val - val.size),
        train_blocks=len(train), val_blocks=len(val), tokenizer=tok.kind,
        vocab_size=tok.vocab_size)
