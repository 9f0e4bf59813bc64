"""A prepared token dataset: token shards plus a manifest, and the block reader over them.

A dataset directory (local, file://, or a pyarrow URI such as s3://) holds
train-000000.tok (token ids, little-endian uint16 when the vocabulary fits, else uint32),
train-000000.docs (little-endian uint64 end offset of each document in the shard), the
same for val-*, and manifest.json, written LAST and atomically: a directory without it is
not a dataset (its preparation did not finish). write_shard appends the end-of-text id to
every document when given eot_id (preparation does), so a split's shards concatenated are
exactly the stream packing.pack cuts, and a document's end offset counts its eot. seq_len
is no part of a dataset: block b is tokens [b*L, (b+1)*L) of the stream, L = seq_len + 1.

    infos = [write_shard(d, i, docs, np.uint16, eot_id=256) for i, docs in enumerate(parts)]
    write_manifest(d, infos, {"vocab_size": 257, "eot_id": 256, "fingerprint": fp,
                              "tokenizer": tok.to_json()})
    TokenDataset.open(d, cache_dir="/local/cache").blocks([3, 0, 7], seq_len=128)  # (3, 129)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from raypar.data.packing import token_dtype
from raypar.errors import ConfigError
from raypar.train import storage

MANIFEST = "manifest.json"
FORMAT, VERSION = "raypar-tokens", 1
DTYPES = ("uint16", "uint32")
_DEFAULT_CACHE = "~/.cache/raypar/shards"
PathLike = Union[str, Path]


@dataclass(frozen=True)
class ShardInfo:
    """One written shard, as the manifest records it."""
    name: str
    tokens: int
    bytes: int
    sha256: str
    dtype: str
    documents: int
    docs_name: str
    docs_bytes: int
    docs_sha256: str


def write_shard(fs_dir: PathLike, index: int, token_arrays: Sequence[np.ndarray], dtype,
                *, eot_id: Optional[int] = None, split: str = "train",
                stem: Optional[str] = None) -> ShardInfo:
    """Write shard `index` of `split`: the documents' ids concatenated in order (each
    followed by eot_id unless it is None), and their end offsets. Returns its ShardInfo.
    The files are <stem>.tok and <stem>.docs; stem defaults to "<split>-<index:06d>" (a
    preparation passes its own: names unique to its attempt, see data/prepare.py)."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.name not in DTYPES:
        raise ValueError(f"dtype: {dt.name} is not one of {DTYPES}")
    stream, ends = _concat(token_arrays, dt, eot_id)
    if stem is not None and (not stem or "/" in stem or "\\" in stem or stem.startswith(".")):
        raise ValueError(f"stem: a plain file name stem is needed, got {stem!r}")
    stem, sizes = stem or f"{split}-{int(index):06d}", []
    for name, arr in ((stem + ".tok", stream), (stem + ".docs", ends.astype("<u8"))):
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        _put(storage.join(fs_dir, name), data)
        sizes += [data.nbytes, hashlib.sha256(data).hexdigest()]
    return ShardInfo(stem + ".tok", int(stream.size), *sizes[:2], dt.name,
                     int(ends.size), stem + ".docs", *sizes[2:])


def _concat(arrays: Sequence[np.ndarray], dt: np.dtype,
            eot_id: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    docs = [np.asarray(a).reshape(-1) for a in arrays]
    lengths = np.array([d.size for d in docs], dtype=np.int64) + (eot_id is not None)
    ends = np.cumsum(lengths, dtype=np.int64)
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    if flat.size and flat.dtype.kind not in "iu":
        raise ValueError(f"token_arrays: ids must be integers, got {flat.dtype}")
    ids = [int(flat.min()), int(flat.max())] if flat.size else []
    ids += [] if eot_id is None else [int(eot_id)]
    if ids and (min(ids) < 0 or max(ids) > np.iinfo(dt).max):  # a cast would wrap silently
        raise ValueError(f"token_arrays: ids span [{min(ids)}, {max(ids)}], "
                         f"{dt.name} holds [0, {np.iinfo(dt).max}]; use uint32")
    out = np.full(int(ends[-1]) if ends.size else 0, eot_id or 0, dtype=dt)
    keep = np.ones(out.size, dtype=bool)
    keep[ends[:0] if eot_id is None else ends - 1] = False  # the eot slots keep the fill
    out[keep] = flat
    return out, ends


def _put(target: PathLike, data) -> None:
    """Write a whole file so that no reader ever sees part of it."""
    if storage.is_uri(str(target)):
        fs, path = storage.pa_fs(str(target))
        # An object store publishes an upload whole, when it completes: no rename needed.
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = storage.local_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the name appears: survives a crash
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(fs_dir: PathLike, shards, meta: Mapping) -> dict:
    """Write manifest.json, after every shard. shards: {split: [ShardInfo, ...]} in stream
    order (a list: the train split); meta: vocab_size, fingerprint, tokenizer (JSON text),
    optional eot_id and split (e.g. {"val_fraction": 0.1}), the rest kept under "meta"."""
    splits = {"train": list(shards)} if not isinstance(shards, Mapping) else dict(shards)
    missing = [k for k in ("vocab_size", "fingerprint", "tokenizer") if k not in meta]
    if missing:
        raise ValueError(f"meta: {', '.join(missing)} missing")
    if "seq_len" in meta:
        raise ValueError("meta: seq_len is not part of a dataset; blocks are cut at read time")
    dtypes = {s.dtype for infos in splits.values() for s in infos}
    if len(dtypes) > 1:
        raise ValueError(f"shards: mixed dtypes {sorted(dtypes)}; write all with one dtype")
    dtype = dtypes.pop() if dtypes else token_dtype(int(meta["vocab_size"])).name
    if int(meta["vocab_size"]) > np.iinfo(dtype).max + 1:
        raise ValueError(f"meta: vocab_size {meta['vocab_size']} does not fit {dtype}")
    names = [s.name for infos in splits.values() for s in infos]
    if len(set(names)) != len(names):
        raise ValueError("shards: a shard name appears twice")
    rest = {k: v for k, v in meta.items()
            if k not in ("vocab_size", "eot_id", "fingerprint", "tokenizer", "split")}
    manifest = {
        "format": FORMAT, "version": VERSION, "dtype": dtype,
        "vocab_size": int(meta["vocab_size"]), "eot_id": meta.get("eot_id"),
        "fingerprint": meta["fingerprint"], "tokenizer": meta["tokenizer"],
        "split": meta.get("split", {}), "meta": rest,
        "splits": {name: _split_entry(infos) for name, infos in splits.items()},
    }
    _put(storage.join(fs_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _split_entry(infos: list[ShardInfo]) -> dict:
    offsets = np.cumsum([0] + [s.tokens for s in infos], dtype=np.int64)
    return {"tokens": int(offsets[-1]), "documents": sum(s.documents for s in infos),
            "offsets": offsets.tolist(), "shards": [asdict(s) for s in infos]}


def read_manifest(path: PathLike) -> dict:
    """The manifest of the dataset at path; ConfigError when there is none or it is bad."""
    target = storage.join(path, MANIFEST)
    try:
        raw = storage.read_bytes(target)
    except OSError:
        raise ConfigError(f"{path}: no {MANIFEST}, so not a prepared dataset (or its "
                          f"preparation did not finish); prepare it again") from None
    try:
        m = json.loads(raw.decode("utf-8"))
        ok = m["format"] == FORMAT and m["dtype"] in DTYPES and isinstance(m["splits"], dict)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{target}: not a raypar token manifest; prepare the dataset again")
    if m.get("version") != VERSION:
        raise ConfigError(f"{target}: format version {m.get('version')}, this raypar reads "
                          f"{VERSION}; prepare the dataset again")
    return m


def _check_split(path: PathLike, m: dict, split: str) -> dict:
    """The split's entry, its sums checked against the manifest's own numbers."""
    if split not in m["splits"]:
        raise ConfigError(f"{storage.join(path, MANIFEST)}: no split {split!r}, it has "
                          f"{sorted(m['splits'])}")
    entry, item = m["splits"][split], np.dtype(m["dtype"]).itemsize
    try:
        tokens = [0] + [s["tokens"] for s in entry["shards"]]
        sound = (entry["offsets"] == np.cumsum(tokens, dtype=np.int64).tolist()
                 and all(s["bytes"] == s["tokens"] * item for s in entry["shards"]))
    except (KeyError, TypeError, ValueError):
        sound = False
    if not sound:
        raise ConfigError(f"{storage.join(path, MANIFEST)}: offsets or sizes of split "
                          f"{split!r} do not add up; prepare the dataset again")
    return entry


def _check_sizes(path: PathLike, shards: list[dict]) -> None:
    """Every shard present at its recorded size: one listing, also for an object store."""
    listing = storage.list_dir(path) or {}
    for s in shards:
        size = listing.get(s["name"], (False, None))[1]
        if size != s["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ConfigError(f"{storage.join(path, s['name'])}: {found}, the manifest says "
                              f"{s['bytes']} bytes; the shard is truncated or damaged, "
                              f"prepare the dataset again")


def _verify(where: PathLike, got: str, want: str) -> None:
    if got != want:
        raise ConfigError(f"{where}: sha256 {got[:16]}... differs from the manifest's "
                          f"{want[:16]}...; the shard was changed or damaged, prepare the "
                          f"dataset again")


class TokenDataset:
    """One split of a prepared dataset, read by global block index from memory-mapped
    shards: in place when local, else (or whenever cache_dir is given) from copies in a
    node-local cache shared by the node's processes, each verified by sha256 once."""

    def __init__(self, path: PathLike, manifest: dict, split: str,
                 cache_dir: Optional[PathLike], cache_bytes: Optional[int]):
        self.path, self.manifest, self.split = path, manifest, split
        entry = manifest["splits"][split]
        self.shards: list[dict] = entry["shards"]
        self.offsets = np.asarray(entry["offsets"], dtype=np.int64)
        self.tokens = int(self.offsets[-1])
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.vocab_size, self.eot_id = int(manifest["vocab_size"]), manifest["eot_id"]
        if cache_dir is None and storage.is_uri(str(path)):
            cache_dir = _DEFAULT_CACHE  # a remote shard is always read from a local copy
        self.cache_dir, self.cache_bytes = cache_dir and Path(cache_dir).expanduser(), cache_bytes
        self._maps: dict[int, np.ndarray] = {}
        self._files: dict[int, Optional[Path]] = {}
        self._verified: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: PathLike, cache_dir: Optional[PathLike] = None, *,
             split: str = "train", cache_bytes: Optional[int] = None,
             manifest: Optional[dict] = None) -> "TokenDataset":
        """Read and check the manifest and the shards' sizes; shard data is read later,
        when a block needs it. cache_bytes bounds the cache (soft: evicts whole shards,
        least recently used first, never one this process maps). manifest: the one
        read_manifest(path) returned already (opening a second split reads it once)."""
        manifest = read_manifest(path) if manifest is None else manifest
        _check_sizes(path, _check_split(path, manifest, split)["shards"])
        self = cls(path, manifest, split, cache_dir, cache_bytes)
        if self.cache_dir is not None:  # fail now, in one line, not at the first fetch
            probe = self.cache_dir / f".probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"data.cache_dir: cannot write {self.cache_dir} "
                                  f"({e.strerror or e}); set it to a writable directory") from None
        return self

    def n_blocks(self, seq_len: int) -> int:
        """Whole blocks of seq_len + 1 tokens in the stream (the tail is never read)."""
        if seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
        return self.tokens // (seq_len + 1)

    def block(self, b: int, seq_len: int) -> np.ndarray:
        """Block b: tokens [b*(seq_len+1), (b+1)*(seq_len+1)) of the split's stream."""
        return self.blocks([b], seq_len)[0]

    def blocks(self, indices, seq_len: int) -> np.ndarray:
        """Blocks at the given global indices, (len(indices), seq_len + 1), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n, width = self.n_blocks(seq_len), seq_len + 1
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"block indices span [{idx.min()}, {idx.max()}], the split has "
                             f"{n} blocks of {width} tokens")
        out = np.empty((idx.size, width), dtype=self.dtype)
        starts = idx * width
        shard = np.searchsorted(self.offsets, starts, side="right") - 1  # skips empty shards
        inside = starts + width <= self.offsets[shard + 1]
        rows = np.flatnonzero(inside)
        rows = rows[np.argsort(shard[rows], kind="stable")]
        for group in np.split(rows, np.flatnonzero(np.diff(shard[rows])) + 1):
            if group.size:  # one shard's blocks: one gather from a strided view, no copy
                s = int(shard[group[0]])
                windows = sliding_window_view(self._map(s), width)
                out[group] = windows[starts[group] - self.offsets[s]]
        for j in np.flatnonzero(~inside):  # straddlers: at most one per shard boundary
            out[j] = self._span(int(starts[j]), width)
        return out

    def _span(self, start: int, width: int) -> np.ndarray:
        """Tokens [start, start + width) gathered across however many shards hold them."""
        parts, pos, end = [], start, start + width
        s = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        while pos < end:
            hi = min(end, int(self.offsets[s + 1]))
            if hi > pos:
                base = int(self.offsets[s])
                parts.append(self._map(s)[pos - base:hi - base])
            pos, s = max(pos, hi), s + 1
        return np.concatenate(parts)

    def shards_for(self, indices, seq_len: int) -> list[int]:
        """The non-empty shards that hold any token of these blocks: what to prefetch."""
        width = seq_len + 1
        starts = np.asarray(indices, dtype=np.int64).reshape(-1) * width
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        last = np.searchsorted(self.offsets, starts + width - 1, side="right") - 1
        found: set[int] = set()
        for a, b in set(zip(first.tolist(), last.tolist())):
            found.update(range(a, b + 1))
        return sorted(s for s in found if self.shards[s]["tokens"] > 0)

    def prefetch(self, shard_ids: Sequence[int]) -> None:
        """Fetch, verify and map these shards now (e.g. from a background thread)."""
        for s in shard_ids:
            self._map(int(s))

    def release(self, keep: Sequence[int] = ()) -> None:
        """Unmap every shard not in keep, so the cache may evict it."""
        keep = {int(s) for s in keep}
        with self._lock:
            for s in [s for s in self._maps if s not in keep]:
                del self._maps[s], self._files[s]

    def mapped(self) -> list[int]:
        """The shards this object maps now (what it holds open), in order."""
        with self._lock:
            return sorted(self._maps)

    def _map(self, s: int) -> np.ndarray:
        with self._lock:
            got = self._maps.get(s)
        if got is not None:
            return got
        tokens = self.shards[s]["tokens"]
        path, arr = None, np.zeros(0, dtype=self.dtype)  # mmap cannot map an empty file
        for attempt in (range(3) if tokens else ()):
            path = self._local_file(s)
            # FileNotFoundError: another process evicted it just now, so fetch it again.
            with suppress(*(() if attempt == 2 else (FileNotFoundError,))):
                arr = np.memmap(path, dtype=self.dtype, mode="r", shape=(tokens,))
                break
        with self._lock:
            self._maps[s], self._files[s] = arr, path
        return arr

    def _local_file(self, s: int) -> Path:
        """A local file holding shard s whose sha256 matches the manifest."""
        info = self.shards[s]
        src = storage.join(self.path, info["name"])
        if self.cache_dir is None:  # read in place: verify once in this process
            if s not in self._verified:
                _verify(src, storage.sha256(src), info["sha256"])
                self._verified.add(s)
            return storage.local_path(src)
        return self._fetch(s, src)

    def _fetch(self, s: int, src: PathLike) -> Path:
        """Copy shard s into the cache unless there already, verified; named by content, so
        datasets sharing a shard share its copy, and a finished name is a verified file."""
        info = self.shards[s]
        dst = self.cache_dir / f"{info['sha256']}.tok"
        tmp = self.cache_dir / f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        # One fetch per shard per node: the others wait on its lock (processes and threads
        # alike: each holder opens the file), then find the shard there.
        lock = os.open(self.cache_dir / f".{dst.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if dst.is_file() and dst.stat().st_size == info["bytes"]:
                os.utime(dst)  # recently used, for eviction
                return dst
            self._evict(info["bytes"])
            _verify(src, _copy_hashing(src, tmp), info["sha256"])
            os.replace(tmp, dst)  # readers see no file or the whole, verified file
            return dst
        finally:
            tmp.unlink(missing_ok=True)
            os.close(lock)  # releases the lock

    def _evict(self, need: int) -> None:
        """Delete least recently used cached shards until `need` more bytes fit the bound.
        Deleting one that another process maps is safe on POSIX: its mapping keeps the
        data until it unmaps, and it fetches the shard again if it needs it later."""
        if self.cache_bytes is None:
            return
        cached = []
        for p in self.cache_dir.glob("*.tok"):
            with suppress(FileNotFoundError):  # evicted by another process meanwhile
                st = p.stat()
                cached.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in cached)
        with self._lock:
            mine = set(self._files.values())
        for _, size, p in sorted(cached):
            if total + need <= self.cache_bytes:
                break
            if p not in mine:
                p.unlink(missing_ok=True)
                total -= size


def _copy_hashing(src: PathLike, dst: Path) -> str:
    """Copy src (local or URI) to dst in chunks; the sha256 of what was copied."""
    h = hashlib.sha256()
    with storage.open_read(src) as f, open(dst, "wb") as out:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()
