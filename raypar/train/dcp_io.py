"""DCP's storage layer straight against a pyarrow filesystem (local disk, s3://, gs://, ...),
hashing what it writes and checking what it reads.

Why our own: DCP's FileSystemWriter/Reader speak to local paths only, and its fsspec ones
need an fsspec implementation per store (s3fs, gcsfs), while raypar and Ray Train already
reach every store through pyarrow. Writing goes through DCP's own writer with its file
layer swapped (`ArrowFiles`); reading is ours, because DCP's reader re-reads a storage item
for every request that touches it and checks nothing.

    writer = Writer(fs, "bucket/run/checkpoints/step_00000010")
    dcp.save(state, storage_writer=writer)
    writer.entries()   # {file: {"size", "sha256", "items": [[offset, length, sha256], ...]}}

Each file's sha256 and each storage item's (a byte range DCP wrote with one tensor or
object) come from the bytes as they stream out, so a save never reads back what it
wrote. A `Reader` reads each item a rank needs once, with one ranged read, checks its
sha256 against the manifests before DCP sees a byte of it, and counts what it read.
"""
from __future__ import annotations

import hashlib
import io
import threading
import uuid
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
# Private: the function DCP's own FileSystemReader cuts a stored chunk to a request with.
from torch.distributed._shard._utils import narrow_tensor_by_index


class CorruptCheckpoint(ValueError):
    """A checkpoint's bytes differ from what its manifests recorded when it was written."""


# -- writing ---------------------------------------------------------------------------------

class _HashingStream(io.RawIOBase):
    """An output stream that hashes what passes through it: the whole file, and the bytes
    between consecutive `tell()` calls. DCP asks for the position right before and right
    after it writes each storage item (filesystem._write_item), so those segments are the
    items; one that is not (a future DCP) is hashed by reading it back (`Writer.entries`)."""

    def __init__(self, out: Any):
        super().__init__()
        self.out, self.pos, self.start = out, 0, 0
        self.file_hash, self.seg_hash = hashlib.sha256(), hashlib.sha256()
        self.segments: dict[tuple[int, int], str] = {}

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.out.write(view)
        self.file_hash.update(view)
        self.seg_hash.update(view)
        self.pos += len(view)
        return len(view)

    def tell(self) -> int:
        if self.pos > self.start:
            self.segments[(self.start, self.pos - self.start)] = self.seg_hash.hexdigest()
        self.start, self.seg_hash = self.pos, hashlib.sha256()
        return self.pos

    def close(self) -> None:
        if not self.closed:
            self.out.close()  # an object store commits the object here
        super().close()


class ArrowFiles(FileSystemBase):
    """DCP's file layer over a pyarrow filesystem; remembers every file it wrote:
    {path: (size, sha256, item segments)}."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self.written: dict[str, tuple[int, str, dict[tuple[int, int], str]]] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with self.fs.open_input_file(str(path)) as f:
                yield f
            return
        stream = _HashingStream(self.fs.open_output_stream(str(path)))
        try:
            yield stream
        finally:
            stream.close()
        with self._lock:
            self.written[str(path)] = (stream.pos, stream.file_hash.hexdigest(),
                                       stream.segments)

    def concat_path(self, path: Any, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def rename(self, path: Any, new_path: Any) -> None:
        # DCP writes .metadata as .metadata.tmp first; on an object store the move is a
        # copy, still cheaper than any re-read, and the hash moves with the name.
        self.fs.move(str(path), str(new_path))
        with self._lock:
            self.written[str(new_path)] = self.written.pop(str(path))

    def init_path(self, path: Any) -> str:
        return str(path)

    def mkdir(self, path: Any) -> None:
        self.fs.create_dir(str(path), recursive=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def exists(self, path: Any) -> bool:
        return self.fs.get_file_info(str(path)).type != pafs.FileType.NotFound

    def rm_file(self, path: Any) -> None:
        self.fs.delete_file(str(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """A small file of raypar's own (JSON, RNG state), hashed like DCP's."""
        with self.create_stream(path, "wb") as f:
            f.write(data)


class Writer(dcp.FileSystemWriter):
    """DCP's filesystem writer (its file layout, threads, staging for async_save) writing
    through `ArrowFiles`. `entries()` after the save: what the manifest lists."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        # sync_files: no fsync on an object store's stream; a torn local file is caught by
        # the manifests' sizes and hashes instead.
        super().__init__(path, sync_files=False)
        self.files = ArrowFiles(fs)
        self.fs, self.path = self.files, path
        self.results: list[Any] = []

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)  # DCP's writer finishes before returning
        self.results = list(future.wait())  # a torch.futures.Future, already done
        return future

    def entries(self) -> dict[str, dict[str, Any]]:
        """{file name: {size, sha256, items}} of every file this writer (this rank) wrote."""
        items: dict[str, list[list[Any]]] = defaultdict(list)
        for result in self.results:
            info = result.storage_data
            items[info.relative_path].append([info.offset, info.length])
        out = {}
        for path, (size, digest, segments) in self.files.written.items():
            name = path.rsplit("/", 1)[-1]
            entry: dict[str, Any] = {"size": size, "sha256": digest}
            if name in items:
                entry["items"] = [[o, n, segments.get((o, n)) or self._hash_range(path, o, n)]
                                  for o, n in sorted(items[name])]
            out[name] = entry
        return out

    def _hash_range(self, path: str, offset: int, length: int) -> str:
        with self.files.fs.open_input_file(path) as f:
            return hashlib.sha256(f.read_at(length, offset)).hexdigest()


# -- reading ---------------------------------------------------------------------------------

class ReadStats:
    """What a load read from storage: bytes, ranged reads, and files opened."""

    def __init__(self) -> None:
        self.bytes = 0
        self.reads = 0
        self.files: set[str] = set()


class Reader(dcp.StorageReader):
    """A DCP storage reader over a pyarrow filesystem that reads each storage item a rank
    needs once (one ranged read), checks its sha256 against `expected` (the manifests:
    {file: {size, sha256, items}}), and only then hands it to DCP. `metadata`: the checked
    metadata (raypar/train/safe_dcp.py), handed to DCP as is, never read again.

    One Reader serves several `dcp.load` calls of one rank (one per stage module):
    `keep` names items (by fqn) that a later call asks for again, e.g. a tied embedding's
    copy on the last stage; their bytes are kept until `release` drops them. A file that the
    manifests list without item hashes (a checkpoint from before they were recorded) is
    read whole once and checked against its file hash."""

    def __init__(self, fs: pafs.FileSystem, path: str, where: str, metadata: Metadata,
                 expected: dict[str, dict[str, Any]], stats: Optional[ReadStats] = None):
        super().__init__()
        self.fs, self.path, self.where = fs, path.rstrip("/"), where
        self.checked, self.expected = metadata, expected
        self.stats = stats or ReadStats()
        self.keep: dict[str, int] = {}  # fqn -> dcp.load calls still to ask for it
        self._kept: dict[MetadataIndex, bytes] = {}
        self._whole: dict[str, bytes] = {}  # old-format files, checked once
        self.load_id = ""

    # -- the StorageReader interface
    def reset(self, checkpoint_id: Any = None) -> None:
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata: raypar never writes it
            raise CorruptCheckpoint(f"checkpoint {self.where}: per-rank DCP metadata is not read")
        metadata = self.checked
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> "torch.futures.Future[None]":
        # Every request for one storage item shares one read of it.
        by_item: dict[MetadataIndex, list[ReadItem]] = defaultdict(list)
        for req in plan.items:
            by_item[req.storage_index].append(req)
        by_file: dict[str, list[MetadataIndex]] = defaultdict(list)
        for index in by_item:
            by_file[self.storage_data[index].relative_path].append(index)
        for name, indices in by_file.items():
            indices.sort(key=lambda i: self.storage_data[i].offset)
            with _LazyFile(self, name) as f:
                for index in indices:
                    data = self._item(f, name, index)
                    for req in by_item[index]:
                        _apply(req, data, planner)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(None)
        return future

    # -- ours
    def release(self, fqns: Any) -> None:
        """A dcp.load that asked for `fqns` is done: forget items no later call needs."""
        for fqn in fqns:
            if fqn in self.keep:
                self.keep[fqn] -= 1
        done = {i for i in self._kept if self.keep.get(i.fqn, 0) <= 0}
        for index in done:
            del self._kept[index]

    def _item(self, f: "_LazyFile", name: str, index: MetadataIndex) -> bytes:
        if index in self._kept:
            return self._kept[index]
        info = self.storage_data[index]
        entry = self.expected.get(name)
        if entry is None:
            raise CorruptCheckpoint(f"{name} not in the manifests")
        hashes = {(o, n): h for o, n, h in entry.get("items") or ()}
        if "items" not in entry:
            whole = self._whole_file(f, name, entry)
            data = whole[info.offset:info.offset + info.length]
        else:
            want = hashes.get((info.offset, info.length))
            if want is None:
                raise CorruptCheckpoint(f"{name} bytes {info.offset}..{info.offset + info.length}"
                                        f" not in the manifests")
            data = f.read_at(info.length, info.offset)
            if len(data) != info.length:
                raise CorruptCheckpoint(f"{name} has {info.offset + len(data)} bytes, shorter "
                                        f"than the manifests say (truncated)")
            if hashlib.sha256(data).hexdigest() != want:
                raise CorruptCheckpoint(f"{name} sha256 mismatch at bytes {info.offset}.."
                                        f"{info.offset + info.length} (corrupt)")
        if self.keep.get(index.fqn, 0) > 0:
            self._kept[index] = data
        return data

    def _whole_file(self, f: "_LazyFile", name: str, entry: dict[str, Any]) -> bytes:
        if name not in self._whole:
            data = f.read_at(int(entry.get("size", -1)), 0)
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise CorruptCheckpoint(f"{name} sha256 mismatch (corrupt)")
            self._whole[name] = data
        return self._whole[name]


def missing(e: OSError) -> bool:
    """Whether a storage error says the file is not there (a checkpoint whose files are
    missing is incomplete: skipped for an older one). Any other error (a throttled or
    dropped request, a full disk) is not the checkpoint's fault and is raised: the worker
    group then restarts and reads it again, instead of skipping a good checkpoint."""
    if isinstance(e, FileNotFoundError):
        return True
    text = str(e)
    return any(s in text for s in ("does not exist", "NoSuchKey", "Not Found", "HTTP 404"))


class _LazyFile:
    """One checkpoint file, opened on its first read (items served from memory open none)."""

    def __init__(self, reader: Reader, name: str):
        self.reader, self.name, self.f = reader, name, None

    def __enter__(self) -> "_LazyFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.f is not None:
            self.f.close()

    def read_at(self, length: int, offset: int) -> bytes:
        r = self.reader
        if self.f is None:
            try:
                self.f = r.fs.open_input_file(f"{r.path}/{self.name}")
            except OSError as e:
                if not missing(e):
                    raise  # transient (a 503, a dropped connection): the group restarts
                raise CorruptCheckpoint(f"{self.name} unreadable ({type(e).__name__})") from None
            r.stats.files.add(self.name)
        size = self.f.size()
        data = self.f.read_at(max(0, min(length, size - offset)), offset) if offset < size else b""
        r.stats.bytes += len(data)
        r.stats.reads += 1
        return bytes(data)


def _apply(req: ReadItem, data: bytes, planner: LoadPlanner) -> None:
    """What DCP's FileSystemReader does with one request's bytes (torch.save format, no
    transforms: safe_dcp refuses metadata that asks for any), weights_only throughout."""
    if req.type == LoadItemType.BYTE_IO:
        planner.load_bytes(req, io.BytesIO(data))
        return
    tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
    target = planner.resolve_tensor(req).detach()
    if target.size() != tensor.size():
        raise CorruptCheckpoint(f"{req.storage_index.fqn}: stored {tuple(tensor.size())}, "
                                f"wanted {tuple(target.size())}")
    target.copy_(tensor)
    planner.commit_tensor(req, target)
