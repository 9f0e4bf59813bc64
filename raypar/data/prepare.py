"""Preparing a dataset: Ray Data tasks read, tokenize and write the corpus as token shards
into a dataset directory; the driver only ever holds the small manifest.

    from raypar.data.prepare import prepare_dataset
    ds = prepare_dataset(DataConfig(path="data/*.jsonl", tokenizer="bpe"))
    ds.path, ds.n_blocks("train", seq_len=128)          # the directory, whole blocks in it
    TokenDataset.open(ds.path).blocks([0, 7], 128)       # (raypar/data/shards.py)

Where: data.dataset_dir, else <cache_dir>/datasets/<key>, the key made of the corpus
fingerprint (files, sizes, times, format, column, split) and the tokenizer's digest, so a
second run over the same corpus and tokenizer finds it and starts no Ray Data work. A
data.path that is itself a prepared directory is used as it is (is_prepared).

Finished means manifest.json is there: shards.write_manifest writes it last, atomically,
so a directory without one is a preparation that did not finish, never a dataset. Each
preparation (attempt) names its shards <split>-<attempt>-<file>-<row>: its own names, so
stale files of a crashed attempt, or the files of an attempt running at the same time,
never end up in its manifest, which names exactly the files it wrote. In a local
directory, attempts also take turns (an flock), and a new attempt first removes what
unfinished ones left; in an object store, which has no locks, concurrent attempts each
write their own files and the last manifest wins (both describe the same stream), and
files of crashed attempts stay until removed by hand (a line in the log says so).

The train stream (the train shards in manifest order, each document followed by the
end-of-text id) is exactly what packing.pack cuts into blocks from the training
documents in (file, row) order: blocks of a run are the same as with the in-memory path.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import sys
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow.fs as pafs

from raypar.config import ConfigError, DataConfig
from raypar.data import pipeline, shards
from raypar.data.corpus import (PIPELINE_VERSION, check_not_empty, corpus_fingerprint,
                                file_stats, resolve_format, resolve_sources)
from raypar.data.shards import MANIFEST, ShardInfo, read_manifest, write_manifest
from raypar.data.tokenizer import Tokenizer, _user_file, build_tokenizer, parse_tokenizer
from raypar.train import storage

log = logging.getLogger("raypar.data")

PROGRESS_EVERY_S = 10.0
"""Seconds between progress reports while a preparation runs."""
LOCK = ".raypar-prepare.lock"
# The files a preparation writes (and _put's temporary ones): <split>-<attempt>-<file>-<row>.
_SHARD_FILE = re.compile(r"^\.?(train|val)-([0-9a-f]{8})-\d+-\d+\.(tok|docs)(\..+\.tmp)?$")
_MANIFEST_TMP = re.compile(r"^\.manifest\.json\..+\.tmp$")  # a manifest write cut short
_GLOB = re.compile(r"[*?\[]")


@dataclass
class PreparedDataset:
    path: str
    """The dataset directory holding manifest.json: an absolute local path or a URI."""
    manifest: dict
    """shards.read_manifest(path)."""
    tokenizer: Tokenizer
    stats: dict = field(default_factory=dict)
    """n_files, n_docs, train_docs, val_docs, train_tokens, val_tokens (without the eot
    tokens), replaced_bytes, files_with_replacements, format, tokenizer, vocab_size."""
    fingerprint: str = ""
    """Identifies corpus + tokenizer (not seq_len, which is no part of a dataset)."""
    from_cache: bool = False
    """True when an existing finished dataset was reused (no Ray Data work)."""
    tokenizer_s: float = 0.0
    """Seconds spent loading or training the tokenizer."""
    tokenizer_note: str = ""
    """How the tokenizer came: byte-level, loaded from the cache, trained, a file, the
    dataset's own."""

    @property
    def val_fraction(self) -> float:
        return float(self.manifest.get("split", {}).get("val_fraction", 0.0) or 0.0)

    def tokens(self, split: str) -> int:
        """Tokens of the split's stream, eot tokens included."""
        return int(self.manifest["splits"].get(split, {}).get("tokens", 0))

    def documents(self, split: str) -> int:
        return int(self.manifest["splits"].get(split, {}).get("documents", 0))

    def n_blocks(self, split: str, seq_len: int) -> int:
        """Whole blocks of seq_len + 1 tokens in the split's stream (the tail is dropped)."""
        return self.tokens(split) // (seq_len + 1)

    def shards(self, split: str) -> int:
        return len(self.manifest["splits"].get(split, {}).get("shards", []))

    def check_blocks(self, seq_len: int) -> tuple[int, int]:
        """(train blocks, val blocks) at this seq_len; a ConfigError in one line when a split
        holds no block (naming data.seq_len or data.val_fraction, as for the arrays)."""
        return pipeline.check_split_sizes(
            self.tokens("train"), self.tokens("val"), self.documents("train"),
            self.documents("val"), seq_len, self.val_fraction)


# ---------------------------------------------------------------- a prepared data.path

def is_prepared(path: str) -> bool:
    """Whether data.path names a prepared dataset directory rather than a corpus: it holds
    a manifest.json in raypar's token format, or a manifest.json beside .tok shards (a
    damaged dataset, which reading then refuses in one line)."""
    if not path or _GLOB.search(path):
        return False
    where = _normalise(path)
    target = storage.join(where, MANIFEST)
    try:
        if storage.is_uri(where):
            fs, inside = storage.pa_fs(str(target))
            if fs.get_file_info(inside).type != pafs.FileType.File:
                return False
        elif not storage.local_path(target).is_file():
            return False
    except (OSError, ValueError):  # an unreachable URI: resolve_sources says it in one line
        return False
    try:
        read_manifest(where)
        return True
    except ConfigError:  # a corpus folder may hold a manifest.json of its own
        return any(name.endswith(".tok") for name in storage.list_dir(where) or {})


def given_manifest(path: str) -> dict:
    """The manifest of the prepared dataset data.path names, or one line saying why not."""
    try:
        return read_manifest(_normalise(path))
    except ConfigError as e:
        raise ConfigError(f"data.path: {e}") from None


def _given(cfg: DataConfig) -> PreparedDataset:
    """data.path is a prepared dataset: used as it is, after its manifest and shard sizes
    check (the shards' sha256 are checked by whoever reads them)."""
    path = _normalise(cfg.path)
    manifest = given_manifest(path)
    try:
        _check_files(path, manifest)
    except ConfigError as e:
        raise ConfigError(f"data.path: {e}") from None
    tok = parse_tokenizer(manifest["tokenizer"], f"data.path: {storage.join(path, MANIFEST)}: "
                                                 f"its tokenizer")
    _check_tokenizer_setting(cfg, tok, path)
    log.info("data.path %s is a prepared dataset: its tokenizer (%s, %d tokens) and split "
             "(val_fraction %s) are used", path, tok.kind, tok.vocab_size,
             manifest.get("split", {}).get("val_fraction"))
    return PreparedDataset(path, manifest, tok, _stats_of(manifest, tok),
                           manifest["fingerprint"], from_cache=True,
                           tokenizer_note=f"the prepared dataset's own ({tok.kind}, "
                                          f"{tok.vocab_size} tokens)")


def _check_tokenizer_setting(cfg: DataConfig, tok: Tokenizer, path: str) -> None:
    """data.tokenizer beside a prepared data.path: 'bpe' (the default: 'a tokenizer
    trained on the corpus') accepts the dataset's own; 'byte' and a tokenizer.json file
    must be the tokenizer the dataset was written with."""
    if cfg.tokenizer == "bpe":
        return
    if cfg.tokenizer == "byte":
        same = tok.kind == "byte"
    else:
        same = _user_file(cfg.tokenizer).digest == tok.digest
    if not same:
        raise ConfigError(f"data.tokenizer: {cfg.tokenizer} is not the tokenizer the prepared "
                          f"dataset {path} was written with ({tok.kind}, {tok.vocab_size} "
                          f"tokens); unset data.tokenizer to use the dataset's own")


def _stats_of(manifest: dict, tok: Tokenizer) -> dict:
    """The dataset's stats: those its preparation recorded, else counted from the manifest."""
    recorded = manifest.get("meta", {}).get("stats")
    if isinstance(recorded, dict):
        return dict(recorded)
    splits = manifest["splits"]

    def count(split: str, key: str) -> int:
        return int(splits.get(split, {}).get(key, 0))
    return dict(n_files=0, n_docs=count("train", "documents") + count("val", "documents"),
                train_docs=count("train", "documents"), val_docs=count("val", "documents"),
                train_tokens=count("train", "tokens") - count("train", "documents"),
                val_tokens=count("val", "tokens") - count("val", "documents"),
                replaced_bytes=0, files_with_replacements=0, format="prepared",
                tokenizer=tok.kind, vocab_size=tok.vocab_size)


# ---------------------------------------------------------------- where a dataset goes

def _normalise(path: str) -> str:
    """A local path made absolute (Ray tasks do not share the driver's working directory);
    a URI as it is, without a trailing slash."""
    if storage.is_uri(path):
        return path.rstrip("/")
    if path.startswith("file://"):
        return path
    return os.path.abspath(os.path.expanduser(path))


def dataset_key(corpus_fp: str, tok: Tokenizer) -> str:
    """The dataset's fingerprint: its corpus and its tokenizer."""
    text = f"raypar-dataset\ncorpus {corpus_fp}\ntokenizer {tok.digest}"
    return hashlib.sha256(text.encode()).hexdigest()


def _destination(cfg: DataConfig, cache: Path, key: str) -> tuple[str, str]:
    """(dataset directory, the field that chose it)."""
    if cfg.dataset_dir:
        return _normalise(cfg.dataset_dir), "data.dataset_dir"
    return _normalise(str(cache / "datasets" / key[:24])), "data.cache_dir"


def _write_error(field_name: str, where: str, e: OSError) -> ConfigError:
    return ConfigError(f"{field_name}: cannot write {where} ({e.strerror or e}); set "
                       f"{field_name} to a writable directory")


def check_dataset_dir(dataset_dir: str) -> None:
    """Refuse a data.dataset_dir that cannot be written, before any work: a probe file is
    written and removed (through pyarrow for a URI); what the probe created goes again."""
    where = _normalise(dataset_dir)
    try:
        if storage.is_uri(where):
            fs, root = storage.pa_fs(where)
            probe = f"{root}/.raypar-probe-{uuid.uuid4().hex[:8]}"
            with fs.open_output_stream(probe) as f:
                f.write(b"")
            fs.delete_file(probe)
        else:
            pipeline._probe_dir(storage.local_path(where))
    except (OSError, ValueError) as e:  # pyarrow: OSError; a URI it cannot parse: ValueError
        reason = e if isinstance(e, OSError) else OSError(str(e).splitlines()[0])
        raise _write_error("data.dataset_dir", where, reason) from None


class _NeedsWork(Exception):
    """Raised instead of reading the corpus: the cache cannot answer on its own."""


def _needs_work():
    raise _NeedsWork


def lookup(cfg: DataConfig, sources: list[str], stats: list, cache: Path) -> bool:
    """Whether this config's tokenizer and dataset are ready, so that prepare_dataset would
    only read (no Ray Data work, no write)."""
    fp = corpus_fingerprint(sources, cfg, stats)
    try:
        tok = build_tokenizer(cfg, sources, cache, _needs_work, fingerprint=fp)
    except _NeedsWork:  # a bpe tokenizer that is not trained yet
        return False
    key = dataset_key(fp, tok)
    where, field_name = _destination(cfg, cache, key)
    try:
        return _finished(where, key, field_name, quiet=True) is not None
    except ConfigError:  # prepare_dataset says what is wrong with it
        return False


def _check_files(path: str, manifest: dict) -> None:
    """Every split's sums, and every shard present at its size (one listing)."""
    for split in manifest["splits"]:
        entry = shards._check_split(path, manifest, split)
        shards._check_sizes(path, entry["shards"])


def _finished(where: str, key: str, field_name: str, quiet: bool = False) -> Optional[dict]:
    """The manifest of the finished dataset for `key` at where; None when there is none, or
    when it is damaged (a shard missing or cut short: prepared again). Another dataset's
    manifest there is a ConfigError: it is never overwritten."""
    try:
        listing = storage.list_dir(where)
    except OSError:
        listing = None
    if not listing or MANIFEST not in listing:
        return None
    try:
        manifest = read_manifest(where)
    except ConfigError:
        raise ConfigError(f"{field_name}: {storage.join(where, MANIFEST)} is not a raypar token "
                          f"manifest this version reads; delete the directory (to prepare it "
                          f"again) or choose another directory") from None
    if manifest["fingerprint"] != key:
        raise ConfigError(f"{field_name}: {where} holds a dataset prepared from another corpus "
                          f"or tokenizer (fingerprint {str(manifest['fingerprint'])[:12]}, this "
                          f"one {key[:12]}); choose another directory or delete that one")
    try:
        _check_files(where, manifest)
    except ConfigError as e:
        if not quiet:
            log.warning("%s; preparing %s again", e, where)
        return None
    return manifest


# ---------------------------------------------------------------- preparing

def prepare_dataset(cfg: DataConfig, cache_dir: Optional[Path] = None, *,
                    progress: Optional[Callable[[dict], None]] = None,
                    progress_every: float = PROGRESS_EVERY_S,
                    force: bool = False) -> PreparedDataset:
    """The prepared dataset of the corpus cfg names: reused when finished (or when data.path
    is one), else written by Ray Data tasks. Raises ConfigError naming the data.* field on
    user errors, before any work where it can.

    Ray must be initialised by the caller when work is needed (else ray.data starts a local
    instance). progress(snapshot) is called every progress_every seconds while tasks run
    (default: a log line); force prepares again even when a finished dataset is there.
    """
    if is_prepared(cfg.path):
        return _given(cfg)
    sources = resolve_sources(cfg.path, cfg.format)
    fmt = resolve_format(sources, cfg.format)
    stats_f = file_stats(sources)
    check_not_empty(sources, stats_f)
    cache = Path(cache_dir) if cache_dir is not None else pipeline.default_cache_dir(cfg)
    # Before any work: an unwritable cache would otherwise fail only after all of it.
    pipeline.check_cache_dir(cfg, sources, stats_f, cache)
    fp = corpus_fingerprint(sources, cfg, stats_f)
    docs_ds = None

    def documents():  # one Ray Dataset serves the tokenizer's sample and the writing
        nonlocal docs_ds
        if docs_ds is None:
            docs_ds = pipeline._documents(sources, fmt, cfg)
        return docs_ds

    trained = []

    def sample():  # called only when a bpe tokenizer must be trained
        trained.append(True)
        return pipeline.sample_texts(documents(), cfg.tokenizer_sample_bytes)

    t_tok = time.monotonic()
    tok = build_tokenizer(cfg, sources, cache, sample, fingerprint=fp)
    timing = {"tokenizer_s": time.monotonic() - t_tok, "tokenizer_note": _tokenizer_note(
        cfg, tok, bool(trained))}
    key = dataset_key(fp, tok)
    where, field_name = _destination(cfg, cache, key)
    # (Checked even with force: another corpus's dataset is never overwritten.)
    manifest = _finished(where, key, field_name)
    if manifest is not None and not force:
        return _done(where, manifest, tok, key, from_cache=True, **timing)
    with _turn(where, field_name):
        # Another preparation may have finished it while this one waited for its turn.
        manifest = _finished(where, key, field_name, quiet=True)
        if manifest is not None and not force:
            return _done(where, manifest, tok, key, from_cache=True, **timing)
        # A finished dataset (force) stays whole and readable, by runs reading it too, until
        # the new manifest replaces its own; only then do its files go.
        keep = _named(manifest) if manifest is not None else set()
        _clear(where, field_name, keep)
        run = _Attempt(where, field_name, cfg, sources, fmt, stats_f, fp, key, tok)
        manifest = run.write(documents(), progress, progress_every)
        if keep:
            _delete(where, keep - _named(manifest))
    return _done(where, manifest, tok, key, from_cache=False, **timing)


def _tokenizer_note(cfg: DataConfig, tok: Tokenizer, trained: bool) -> str:
    if cfg.tokenizer == "byte":
        return "byte-level (257 tokens)"
    if cfg.tokenizer == "bpe":
        how = "trained on a sample of the corpus" if trained else "loaded from the cache"
        return f"bpe, {how} ({tok.vocab_size} tokens)"
    return f"{cfg.tokenizer} ({tok.vocab_size} tokens)"


def _named(manifest: dict) -> set[str]:
    """The files a manifest names: every shard's tokens and document ends."""
    return {name for entry in manifest["splits"].values() for s in entry["shards"]
            for name in (s["name"], s["docs_name"])}


def _delete(where: str, names: set[str]) -> None:
    """Best effort: delete these files of the dataset directory."""
    if storage.is_uri(where):
        fs, root = storage.pa_fs(where)
        for n in names:
            with suppress(Exception):
                fs.delete_file(f"{root}/{n}")
    else:
        for n in names:
            with suppress(OSError):
                (storage.local_path(where) / n).unlink()


def _done(where: str, manifest: dict, tok: Tokenizer, key: str, from_cache: bool,
          **timing) -> PreparedDataset:
    stats = _stats_of(manifest, tok)
    if from_cache:
        log.info("reusing the prepared dataset %s (%d documents, %d shards)", where,
                 stats["n_docs"], sum(len(e["shards"]) for e in manifest["splits"].values()))
    if stats.get("replaced_bytes"):
        log.warning("replaced %d undecodable bytes in %d files (not UTF-8; each run of "
                    "bad bytes reads as U+FFFD)", stats["replaced_bytes"],
                    stats["files_with_replacements"])
    return PreparedDataset(where, manifest, tok, stats, key, from_cache=from_cache, **timing)


@contextmanager
def _turn(where: str, field_name: str) -> Iterator[None]:
    """One preparation at a time in a local dataset directory: an flock the kernel releases
    however the holder ends. (An object store has none: attempts' names keep them apart.)"""
    if storage.is_uri(where):
        yield
        return
    folder = storage.local_path(where)
    for attempt in range(5):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            break
        except (FileNotFoundError, FileExistsError) as e:
            # Another run's check_cache_dir probe removes the empty folder it thinks it made.
            if attempt == 4:
                raise _write_error(field_name, str(folder), e) from None
        except OSError as e:
            raise _write_error(field_name, str(folder), e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another preparation of %s to finish", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clear(where: str, field_name: str, keep: set[str] = frozenset()) -> None:
    """Before an attempt writes into a local directory (its turn held): remove what earlier
    attempts left, and a damaged manifest; a finished one and the files it names (keep)
    stay. In an object store nothing is removed: another attempt may be writing there."""
    listing = storage.list_dir(where) or {}
    stale = [n for n in listing if (_SHARD_FILE.match(n) or _MANIFEST_TMP.match(n))
             and n not in keep]
    if storage.is_uri(where):
        if stale:
            log.info("%d files of earlier preparations are in %s; the new manifest will not "
                     "name them (delete them when no preparation is running)", len(stale), where)
        return
    folder = storage.local_path(where)
    try:
        for name in ([MANIFEST] if MANIFEST in listing and not keep else []) + stale:
            (folder / name).unlink(missing_ok=True)
    except OSError as e:
        raise _write_error(field_name, str(folder), e) from None
    if stale:
        log.info("removed %d files of an unfinished earlier preparation from %s", len(stale),
                 folder)


def _remove_attempt(where: str, attempt: str) -> None:
    """Best effort: delete what one failed attempt wrote."""
    with suppress(Exception):
        _delete(where, {n for n in (storage.list_dir(where) or {})
                        if (m := _SHARD_FILE.match(n)) and m.group(2) == attempt})


class _Attempt:
    """One preparation's writing pass: the Ray Data stages, the tally of what the tasks
    wrote, and the manifest."""

    def __init__(self, where: str, field_name: str, cfg: DataConfig, sources: list[str],
                 fmt: str, stats_f: list, fp: str, key: str, tok: Tokenizer):
        self.where, self.field_name, self.cfg = where, field_name, cfg
        self.sources, self.fmt, self.fp, self.key, self.tok = sources, fmt, fp, key, tok
        self.id = uuid.uuid4().hex[:8]
        sizes = np.array([s.size for s in stats_f], dtype=np.int64)
        self.sizes, self.before = sizes, np.concatenate([[0], np.cumsum(sizes)])
        self.rows: dict[str, list[dict]] = {"train": [], "val": []}
        self.replaced, self.replaced_files = 0, set()
        self.started = time.monotonic()
        self.position = (0, 0)  # (file, row) reached, for the progress line

    def write(self, docs, progress: Optional[Callable[[dict], None]],
              every: float) -> dict:
        kwargs = dict(tokenizer_json=self.tok.to_json(), out_dir=self.where,
                      attempt=self.id, field_name=self.field_name)
        written = docs.map_batches(pipeline.write_batch, batch_format="pyarrow",
                                   fn_kwargs=kwargs)
        log.info("preparing %s: %d %s files, %.1f MB, into %s", self.cfg.path or "the "
                 "built-in corpus", len(self.sources), self.fmt, self.before[-1] / 1e6,
                 self.where)
        _warn_if_not_shared(self.where)
        ticker = _Ticker(every, lambda: (progress or _log_progress)(self.snapshot()))
        try:
            with ticker:
                for batch in pipeline._batches(written):
                    self._tally(batch)
            manifest = self._manifest()
        except BaseException:
            _remove_attempt(self.where, self.id)
            raise
        snap = self.snapshot()
        log.info("prepared %s: %d documents, %d tokens, %d shards in %.0f s", self.where,
                 snap["documents"], snap["tokens"], snap["shards"], snap["seconds"])
        return manifest

    def _tally(self, batch) -> None:
        for row in batch.to_pylist():
            self.rows[row["split"]].append(row)
            self.replaced += row["replaced"]
            self.replaced_files.update(row["replaced_files"])
            self.position = max(self.position, (row["last_file"], row["last_row"]))

    def snapshot(self) -> dict:
        """Where the preparation is: documents, tokens and shards written so far, and the
        share of the corpus's bytes read (by document position: order is kept)."""
        rows = self.rows["train"] + self.rows["val"]
        file, row = self.position
        done = int(self.before[file]) if rows else 0
        if rows and self.fmt == "jsonl":
            done += min(row, int(self.sizes[file]))
        elif rows and self.fmt == "text":
            done += int(self.sizes[file])
        total = int(self.before[-1])
        return dict(documents=sum(r["documents"] for r in rows),
                    tokens=sum(r["tokens"] for r in rows), shards=len(rows),
                    files=min(file + 1, len(self.sources)) if rows else 0,
                    n_files=len(self.sources), bytes=done, total_bytes=total,
                    fraction=done / total if total else 1.0,
                    seconds=time.monotonic() - self.started, path=self.where)

    def _infos(self, split: str) -> list[ShardInfo]:
        """The split's shards in document order; their runs of documents must not overlap
        (each task's batch is a contiguous run: an overlap would be a bug, not bad data)."""
        rows = sorted(self.rows[split], key=lambda r: (r["file"], r["row"]))
        for a, b in zip(rows, rows[1:]):
            if (a["last_file"], a["last_row"]) >= (b["file"], b["row"]):
                raise RuntimeError(f"shards {a['name']} and {b['name']} hold overlapping "
                                   f"runs of documents")
        names = [f.name for f in ShardInfo.__dataclass_fields__.values()]
        return [ShardInfo(**{n: r[n] for n in names}) for r in rows]

    def _manifest(self) -> dict:
        infos = {split: self._infos(split) for split in ("train", "val")}
        n_docs = sum(s.documents for split in infos.values() for s in split)
        if not n_docs:
            where = "" if self.fmt == "text" else \
                f" in data.text_column={self.cfg.text_column!r}"
            raise ConfigError(f"data.path: the corpus is empty: {len(self.sources)} "
                              f"{self.fmt} files hold no text{where}")
        self._check_visible(infos)
        count = {split: (sum(s.documents for s in v), sum(s.tokens for s in v))
                 for split, v in infos.items()}
        stats = dict(
            n_files=len(self.sources), n_docs=n_docs, train_docs=count["train"][0],
            val_docs=count["val"][0], train_tokens=count["train"][1] - count["train"][0],
            val_tokens=count["val"][1] - count["val"][0], replaced_bytes=int(self.replaced),
            files_with_replacements=len(self.replaced_files), format=self.fmt,
            tokenizer=self.tok.kind, vocab_size=self.tok.vocab_size)
        bpe = self.cfg.tokenizer == "bpe"
        meta = {
            "vocab_size": self.tok.vocab_size, "eot_id": self.tok.eot_id,
            "fingerprint": self.key, "tokenizer": self.tok.to_json(),
            "split": {"val_fraction": self.cfg.val_fraction},
            "stats": stats, "corpus": self.cfg.path or "(built-in: the standard library)",
            "corpus_fingerprint": self.fp, "text_column": self.cfg.text_column,
            "tokenizer_sample_bytes": self.cfg.tokenizer_sample_bytes if bpe else None,
            "pipeline_version": PIPELINE_VERSION, "attempt": self.id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            return write_manifest(self.where, infos, meta)
        except OSError as e:
            raise _write_error(self.field_name, self.where, e) from None

    def _check_visible(self, infos: dict[str, list[ShardInfo]]) -> None:
        """Every file the tasks wrote is where the driver looks, at its size: a local
        dataset directory on a cluster of several nodes is not (each node has its own)."""
        listing = storage.list_dir(self.where) or {}
        for info in (s for split in infos.values() for s in split):
            for name, size in ((info.name, info.bytes), (info.docs_name, info.docs_bytes)):
                if listing.get(name, (False, None))[1] != size:
                    raise ConfigError(
                        f"{self.field_name}: {storage.join(self.where, name)}, which a Ray "
                        f"task wrote, is missing or incomplete here; on a cluster of several "
                        f"nodes the dataset directory must be storage they all share (s3://, "
                        f"gs://, or a shared filesystem): set data.dataset_dir")


def _warn_if_not_shared(where: str) -> None:
    """Say up front what _check_visible would find only at the end: a local dataset
    directory on a Ray cluster of several nodes works only when it is a shared filesystem."""
    ray = sys.modules.get("ray")  # (not imported: no cluster to ask)
    if storage.is_uri(where) or ray is None or not ray.is_initialized():
        return
    with suppress(Exception):
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]
        if len(nodes) > 1:
            log.warning("%s is a local directory and the Ray cluster has %d nodes whose tasks "
                        "write into it: it must be a filesystem they all share (else set "
                        "data.dataset_dir to s3://, gs://, ...)", where, len(nodes))


class _Ticker:
    """Calls report() every `every` seconds from a thread while the block runs, so that a
    long task still shows progress."""

    def __init__(self, every: float, report: Callable[[], None]):
        self.every, self.report = every, report
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raypar-prepare-progress",
                                       daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            with suppress(Exception):  # a report must never break the preparation
                self.report()

    def __enter__(self) -> "_Ticker":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def console_progress() -> tuple[Callable[[dict], None], float, Callable[[], None]]:
    """(progress callback, seconds between calls, end) that show a preparation on stderr:
    one line redrawn every second on a terminal, a plain line every PROGRESS_EVERY_S
    otherwise (logs, `ray job submit`); end() clears the terminal's line."""
    tty = sys.stderr.isatty()

    def show(snap: dict) -> None:
        line = f"raypar: preparing: {format_progress(snap)}"
        print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", file=sys.stderr,
              flush=True)

    def end() -> None:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    return show, 1.0 if tty else PROGRESS_EVERY_S, end


def _log_progress(snap: dict) -> None:
    log.info("preparing: %s", format_progress(snap))


def format_progress(snap: dict) -> str:
    """'37% (file 12 of 40), 1,234 documents, 5,678,901 tokens, 12 shards, 31 s'."""
    return (f"{snap['fraction']:.0%} (file {snap['files']} of {snap['n_files']}), "
            f"{snap['documents']:,} documents, {snap['tokens']:,} tokens, "
            f"{snap['shards']} shards, {snap['seconds']:.0f} s")
