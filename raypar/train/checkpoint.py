"""Checkpoints: torch.distributed.checkpoint (DCP) shards, one writer per rank, verified.

Every rank writes its shard straight into the checkpoint's folder in the run's storage
(a local path or an s3://, gs://, ... URI, through pyarrow: raypar/train/dcp_io.py), named
`step_<8 digits>` (`step_<8 digits>.<k>` for a step trained again after a restart whose
first folder is still there, see `dir_name`); Ray Train registers that folder as it is. So
that a crash half-way through a save can never be mistaken for a checkpoint, every rank
writes `manifest-<rank>.json` last: the name, byte size and sha256 of every file it
wrote, and of every DCP storage item in them (offset, length, sha256), with the step and
the world size, all hashed as the bytes streamed out. A folder is a checkpoint only when
the manifests of all `world_size` ranks are there and every file they list has its size
(`verify(path, hashes=False)`, what a worker's start checks) and, for `verify(path)`,
its sha256; `latest_valid` picks the newest such folder and says why it skipped any newer
one.

Loading (`Source`, `load`) reads in place: each rank reads `.metadata` and, by ranged
reads, each storage item its state needs, once, and checks the item's sha256 before DCP
uses it; a mismatch raises CorruptCheckpoint naming the file.

Rank 0 adds `meta.json` (model config, run spec, tokenizer JSON) and
`train_state.json` (step, tokens seen, ...), so a checkpoint is self-describing:
`raypar generate` and `raypar export` need nothing else. A rank may add files of
its own through `extra_files`, e.g. its RNG state as `rng-<rank>.pt`
(`rng_state_bytes` / `read_rng_state`).

Nothing read from storage can run code: raypar's own metadata is JSON, DCP's `.metadata`
is read by an allow-listed unpickler and every other entry with
`torch.load(weights_only=True)` (raypar/train/safe_dcp.py).

Why our own manifest: DCP's `.metadata` says which tensors exist and where, but
not whether the bytes behind it arrived whole, and Ray records a checkpoint
once every worker has reported, not whether every rank's write completed
after a node died. A per-rank list with hashes answers both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Optional, Union

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
# Private: the one function DCP's planner flattens a state dict's names with; a Source
# uses it to find the entries two stage modules both ask for.
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException

from raypar.config import ConfigError
from raypar.model import GPTConfig
from raypar.train import dcp_io, storage
from raypar.train.dcp_io import CorruptCheckpoint
from raypar.train.safe_dcp import SafePlanner, UnsafeCheckpoint, read_metadata
from raypar.train.rundir import CHECKPOINTS
from raypar.train.storage import PathLike

if TYPE_CHECKING:  # ray.train is slow to import; `raypar generate` does not need it
    from ray.train import Checkpoint
    from torch.distributed.checkpoint.metadata import Metadata

PREFIX = "step_"
META = "meta.json"
TRAIN_STATE = "train_state.json"
DCP_METADATA = ".metadata"
MANIFEST_FORMAT = 2  # 2: DCP files list each storage item's byte range and sha256
_STEP_DIR = re.compile(rf"^{PREFIX}(\d+)(?:\.(\d+))?$")
_RESERVED = re.compile(r"^(manifest-\d+\.json|meta\.json|train_state\.json|\.metadata|.*\.distcp)$")



def dir_name(step: int, taken: Collection[str] = ()) -> str:
    """The folder a checkpoint of `step` is stored in: `step_<N>`, or `step_<N>.<k>` when
    a folder of that name is among `taken` (the storage listing when this worker group
    started). A step is trained again after a restart when its first checkpoint was
    skipped as corrupt; Ray Train's bookkeeping deletes checkpoints by folder, so reusing
    the folder would let it delete the new checkpoint when it retires the old one (and
    its snapshot would then list a folder that is gone, which stops every later start)."""
    name, k = f"{PREFIX}{step:08d}", 1
    while name in taken:
        k += 1
        name = f"{PREFIX}{step:08d}.{k}"
    return name


def _order(path: PathLike) -> tuple[int, int]:
    m = _STEP_DIR.match(storage.basename(path))
    return (int(m.group(1)), int(m.group(2) or 1)) if m else (-1, 0)


def manifest_name(rank: int) -> str:
    return f"manifest-{rank}.json"


def rng_name(rank: int) -> str:
    return f"rng-{rank}.pt"


# -- rank and process group ----------------------------------------------------------------

def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    return (dist.get_rank(group), dist.get_world_size(group)) if _dist() else (0, 1)


@contextmanager
def _quiet_single_process():
    # DCP warns on every call without a process group that it assumes one process:
    # that is exactly what we mean there, so the warning is noise.
    with warnings.catch_warnings():
        if not _dist():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# -- save ----------------------------------------------------------------------------------
# A destination: a local path or URI, or (pyarrow filesystem, path inside it), which is
# what Ray Train's storage context gives: a checkpoint reported on that very filesystem
# object is one Ray Train registers without copying it (checkpoint_upload_mode=NO_UPLOAD).
Dest = Union[PathLike, tuple["pafs.FileSystem", str]]


def _resolve(dest: Optional[Dest]) -> tuple["pafs.FileSystem", str, PathLike]:
    """(filesystem, path in it, the path as raypar names it) of a destination; None: a
    fresh local temporary directory."""
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix="raypar-ckpt-"))
    if isinstance(dest, tuple):
        fs, fs_path = dest
        return fs, fs_path, fs_path
    fs, fs_path = storage.filesystem(dest)
    return fs, fs_path, dest if storage.is_uri(dest) else storage.local_path(dest)


def save(state: dict[str, Any], train_state: dict[str, Any], meta: dict[str, Any],
         extra_files: Optional[dict[str, bytes]] = None, *, dest: Optional[Dest] = None,
         process_group: Optional[dist.ProcessGroup] = None,
         before_manifest: Optional[Callable[[], None]] = None) -> "Checkpoint":
    """Write this rank's part of a checkpoint (see `write`); returns it for `ray.train.report`
    (with checkpoint_upload_mode=NO_UPLOAD: it is already where it belongs).
    before_manifest: called once this rank's data is written, before its manifest (the
    recovery tests' crash in the middle of a save)."""
    from ray.train import Checkpoint  # deferred: slow to import, and only a training rank saves

    fs, fs_path, _ = _resolve(dest)
    writer, _ = _writer(extra_files, (fs, fs_path), process_group)
    with _quiet_single_process():
        dcp.save(state, storage_writer=writer, process_group=process_group)
    _complete(writer, train_state, meta, extra_files, process_group, before_manifest)
    return Checkpoint(fs_path, filesystem=fs)


def write(state: dict[str, Any], train_state: dict[str, Any], meta: dict[str, Any],
          extra_files: Optional[dict[str, bytes]] = None, *, dest: Optional[Dest] = None,
          process_group: Optional[dist.ProcessGroup] = None) -> PathLike:
    """Write this rank's part of a checkpoint straight into its folder; returns the folder.

    state: a DCP state dict keyed by global names, e.g. {"model": ..., "optim": ...}
    from `torch.distributed.checkpoint.state_dict.get_state_dict` (DTensors are
    fine). Every rank of the process group must call this (DCP is collective), with the
    same dest; without a process group it saves the whole state from this process.
    train_state and meta (JSON-serialisable) are written by rank 0 only;
    extra_files ({name: bytes}, e.g. `{rng_name(rank): rng_state_bytes()}`) by
    the rank that passes them. dest: the checkpoint's folder, local or in object storage
    (default: a fresh temporary directory); it must be empty or missing. process_group:
    the ranks that save (default: all); a rank's number in it names its manifest.
    """
    writer, where = _writer(extra_files, dest, process_group)
    with _quiet_single_process():
        dcp.save(state, storage_writer=writer, process_group=process_group)
    _complete(writer, train_state, meta, extra_files, process_group)
    return where


class PendingSave:
    """A checkpoint being written in the background (`write_async`): `done()` polls,
    `finish()` waits for the shard, adds the JSON files and the manifest, and returns
    the folder (collective: every rank calls it at the same point)."""

    def __init__(self, future, writer: dcp_io.Writer, where: PathLike,
                 train_state: dict[str, Any], meta: dict[str, Any],
                 extra_files: Optional[dict[str, bytes]],
                 ranks: Optional[dist.ProcessGroup] = None):
        self.future, self.writer, self.where, self.ranks = future, writer, where, ranks
        self.train_state, self.meta, self.extra_files = train_state, meta, extra_files
        self.step = int(train_state.get("step", -1))

    def done(self) -> bool:
        return self.future.done()

    def finish(self) -> PathLike:
        self.future.result()
        _complete(self.writer, self.train_state, self.meta, self.extra_files, self.ranks)
        return self.where


def write_async(state: dict[str, Any], train_state: dict[str, Any], meta: dict[str, Any],
                extra_files: Optional[dict[str, bytes]] = None, *, dest: Optional[Dest] = None,
                process_group: Optional[dist.ProcessGroup] = None) -> PendingSave:
    """Like `write`, but returns once DCP has staged the state into host memory; a
    background thread writes the shards straight to dest. process_group: a group of its
    own for DCP's collectives (they run on that thread, concurrently with training's), over
    the ranks that save."""
    writer, where = _writer(extra_files, dest, process_group)
    with _quiet_single_process():
        future = dcp.async_save(state, storage_writer=writer, process_group=process_group)
    future = getattr(future, "upload_completion", future)  # AsyncSaveResponse or Future
    return PendingSave(future, writer, where, train_state, meta, extra_files, process_group)


def _writer(extra_files: Optional[dict[str, bytes]], dest: Optional[Dest],
            group: Optional[dist.ProcessGroup]) -> tuple[dcp_io.Writer, PathLike]:
    for name in extra_files or {}:
        if "/" in name or "\\" in name or name in ("", ".", "..") or _RESERVED.match(name):
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name")
    fs, fs_path, where = _resolve(dest)
    # Rank 0 looks before DCP's first collective: no rank writes a byte before it, so
    # a used folder (which could mix two saves' files) is refused without a race.
    if _rank_world(group)[0] == 0:
        info = fs.get_file_info(fs_path)
        if info.type == pafs.FileType.File or (info.type == pafs.FileType.Directory and
                                               fs.get_file_info(pafs.FileSelector(fs_path))):
            raise ValueError(f"checkpoint directory {where} is not empty")
    return dcp_io.Writer(fs, fs_path), where


def _complete(writer: dcp_io.Writer, train_state: dict[str, Any], meta: dict[str, Any],
              extra_files: Optional[dict[str, bytes]],
              group: Optional[dist.ProcessGroup] = None,
              before_manifest: Optional[Callable[[], None]] = None) -> None:
    """This rank's small files, then its manifest, last: what this rank wrote (the sizes and
    hashes taken as the bytes streamed out, each DCP item's too). A folder is a checkpoint
    once every rank's manifest is there."""
    rank, world = _rank_world(group)
    step = int(train_state.get("step", -1))
    files = writer.files
    if rank == 0:
        files.write_bytes(files.concat_path(writer.path, META), _json(meta))
        files.write_bytes(files.concat_path(writer.path, TRAIN_STATE), _json(train_state))
    for name, data in (extra_files or {}).items():
        files.write_bytes(files.concat_path(writer.path, name), data)
    manifest = {"format": MANIFEST_FORMAT, "rank": rank, "world_size": world, "step": step,
                "files": writer.entries()}
    if before_manifest is not None:
        before_manifest()
    with files.fs.open_output_stream(files.concat_path(writer.path, manifest_name(rank))) as f:
        f.write(_json(manifest))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")


def rng_state_bytes() -> bytes:
    """This process's torch RNG states (CPU, and every CUDA device) as torch.save bytes of
    plain tensors, for `save(..., extra_files={rng_name(rank): rng_state_bytes()})`."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_rng_state(path: PathLike, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """The RNG states rank `rank` saved, or None if that rank saved none (e.g. after a
    resize). Loaded with weights_only=True: plain tensors only, no code runs."""
    target = storage.join(path, rng_name(rank))
    listing = storage.list_dir(path) or {}
    if rng_name(rank) not in listing:
        return None
    return _rng_from(storage.read_bytes(target), target)


def _rng_from(data: bytes, where: PathLike) -> dict[str, torch.Tensor]:
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: not an RNG state (expected a dict of tensors)")
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Apply what `read_rng_state` returned to this process."""
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda")),
                                     key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


# -- verify and find -----------------------------------------------------------------------

def verify(path: PathLike, hashes: bool = True) -> Optional[str]:
    """None when the checkpoint at path is complete and intact, else a short reason.

    Complete: manifest-0.json present and naming world_size W, manifests 0..W-1
    present and agreeing on the step, every file they list present with the
    listed size (and, with hashes, sha256), and meta.json, train_state.json and DCP's
    .metadata among them. Sizes come from one listing; only hashes=True reads the files.
    A training start checks sizes only: a load checks the hash of every byte it reads
    (`Source`), so a corrupt file it needs is found there.
    """
    listing = storage.list_dir(path)
    if listing is None:
        return "not a directory"
    manifests = _read_manifests(path, listing)
    if isinstance(manifests, str):
        return manifests
    expected = _listed_files(manifests)
    if isinstance(expected, str):
        return expected
    return _check_files(path, listing, expected, hashes)


def _read_manifests(path: PathLike, listing: dict[str, tuple[bool, int]]
                    ) -> Union[dict[int, Any], str]:
    """Every rank's manifest, or the reason they cannot all be read."""
    first = manifest_name(0)
    if first not in listing:
        return f"{first} missing (incomplete save)"
    try:
        m0 = storage.read_json(storage.join(path, first))
        world, _ = int(m0["world_size"]), m0["step"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{first} unreadable ({type(e).__name__})"
    if world < 1:
        return f"{first}: world_size {world}"
    manifests = {0: m0}
    for r in range(1, world):
        name = manifest_name(r)
        if name not in listing:
            return f"{name} missing of world_size {world} (incomplete save)"
        try:
            manifests[r] = storage.read_json(storage.join(path, name))
        except ValueError:
            return f"{name} unreadable"
    return manifests


def _listed_files(manifests: dict[int, Any]) -> Union[dict[str, dict], str]:
    """{file name: {size, sha256}} over all manifests, or why they do not make one save."""
    world, step = int(manifests[0]["world_size"]), manifests[0]["step"]
    expected: dict[str, dict] = {}
    for r, m in manifests.items():
        name = manifest_name(r)
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            return f"{name} malformed"
        if m.get("rank") != r or m.get("step") != step or m.get("world_size") != world:
            return (f"{name} is from another save (rank {m.get('rank')}, step {m.get('step')}, "
                    f"world_size {m.get('world_size')}; expected rank {r}, step {step}, "
                    f"world_size {world})")
        for fname, entry in m["files"].items():
            if fname in expected:
                return f"{fname} listed by two ranks"
            expected[fname] = entry
    for required in (META, TRAIN_STATE, DCP_METADATA):
        if required not in expected:
            return f"{required} not in the manifests"
    return expected


def _check_files(path: PathLike, listing: dict[str, tuple[bool, int]],
                 expected: dict[str, dict], hashes: bool = True) -> Optional[str]:
    """Every listed file present with its size (all sizes first: cheap), then its hash."""
    for fname, entry in expected.items():
        if fname not in listing or listing[fname][0]:
            return f"{fname} missing"
        size = listing[fname][1]
        if size != entry.get("size"):
            return f"{fname} has {size} bytes, manifest says {entry.get('size')}"
    for fname, entry in (expected.items() if hashes else ()):
        try:
            digest = storage.sha256(storage.join(path, fname))
        except OSError as e:
            return f"{fname} unreadable ({type(e).__name__})"
        if digest != entry.get("sha256"):
            return f"{fname} sha256 mismatch (corrupt)"
    return None


def step_of(path: PathLike) -> Optional[int]:
    """N of a `step_<N>` checkpoint folder's path, else None."""
    m = _STEP_DIR.match(storage.basename(path))
    return int(m.group(1)) if m else None


def candidates(root: PathLike) -> list[PathLike]:
    """Checkpoint folders (`step_<N>`) newest first, unverified.

    root may be a run directory (its `checkpoints/` folder is searched, where
    Ray Train puts them), the checkpoints folder itself, or one `step_<N>`
    folder. Local roots give Paths; URIs give URI strings.
    """
    if not storage.is_uri(root):
        root = storage.local_path(root)
    if step_of(root) is not None:
        return [root] if storage.list_dir(root) is not None else []
    found: dict[str, PathLike] = {}
    for base in (root, storage.join(root, CHECKPOINTS)):
        for name, (is_dir, _) in (storage.list_dir(base) or {}).items():
            if step_of(name) is not None and is_dir:
                found.setdefault(name, storage.join(base, name))
    return sorted(found.values(), key=_order, reverse=True)


def latest_valid(root: PathLike, log: logging.Logger = logging.getLogger("raypar"),
                 skipped: Optional[list[list[str]]] = None, hashes: bool = True,
                 older_than: Optional[PathLike] = None) -> Optional[PathLike]:
    """The newest checkpoint under root that verifies (`verify(path, hashes)`), or None.
    Each newer one that fails verification is skipped with one warning naming it and the
    reason, and appended to `skipped` (if given) as [path, reason]. older_than: only
    candidates older than that checkpoint (the next one to try after it failed to load)."""
    for path in candidates(root):
        if older_than is not None and _order(path) >= _order(older_than):
            continue
        reason = verify(path, hashes)
        if reason is None:
            return path
        log.warning("checkpoint %s skipped: %s", path, reason)
        if skipped is not None:
            skipped.append([str(path), reason])
    return None


# -- read and load -------------------------------------------------------------------------

def read_meta(path: PathLike) -> dict[str, Any]:
    return storage.read_json(storage.join(path, META))


def read_train_state(path: PathLike) -> dict[str, Any]:
    return storage.read_json(storage.join(path, TRAIN_STATE))


def read_manifest(path: PathLike, rank: int = 0) -> dict[str, Any]:
    return storage.read_json(storage.join(path, manifest_name(rank)))


class Source:
    """A checkpoint opened for loading on this rank, straight from storage: its manifests
    and DCP metadata read once, then every storage item this rank needs read once, with one
    ranged read, and its sha256 checked against the manifests before it is used
    (raypar/train/dcp_io.py). A mismatch raises CorruptCheckpoint naming the file.

        source = Source(path)
        source.load([stage0_state, stage1_state], process_group)   # collective
        train_state = source.read_json(TRAIN_STATE)
    """

    def __init__(self, path: PathLike):
        self.path = path
        self.fs, self.fs_path = storage.filesystem(path)
        manifests = _read_manifests(path, storage.list_dir(path) or {})
        listed = _listed_files(manifests) if not isinstance(manifests, str) else manifests
        if isinstance(listed, str):
            raise dcp_io.CorruptCheckpoint(f"not a valid checkpoint ({listed})")
        self.expected: dict[str, dict] = listed
        self.stats = dcp_io.ReadStats()
        self.metadata = read_metadata(path, {name: int(e.get("size", -1))
                                             for name, e in listed.items()},
                                      data=self.read_bytes(DCP_METADATA))

    def read_bytes(self, name: str) -> bytes:
        """A whole file the manifests list, checked against its size and sha256."""
        entry = self.expected.get(name)
        if entry is None:
            raise dcp_io.CorruptCheckpoint(f"{name} not in the manifests")
        try:
            data = storage.read_bytes(storage.join(self.path, name))
        except OSError as e:
            if not dcp_io.missing(e):
                raise  # transient: see dcp_io.missing
            raise dcp_io.CorruptCheckpoint(f"{name} unreadable ({type(e).__name__})") from None
        self.stats.bytes += len(data)
        self.stats.reads += 1
        self.stats.files.add(name)
        if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise dcp_io.CorruptCheckpoint(f"{name} sha256 mismatch (corrupt)")
        return data

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name).decode("utf-8"))

    def rng_state(self, rank: int) -> Optional[dict[str, torch.Tensor]]:
        """The RNG states rank `rank` saved (see `read_rng_state`), checked."""
        if rng_name(rank) not in self.expected:
            return None
        return _rng_from(self.read_bytes(rng_name(rank)), storage.join(self.path, rng_name(rank)))

    def load(self, states: list[dict[str, Any]],
             process_group: Optional[dist.ProcessGroup] = None) -> None:
        """DCP load into each of `states` in place, in turn (one per stage module: a rank
        hosting an embedding and its tied copy asks for the same entries twice, whose
        requests would collide in one dict; the bytes are read once and kept for the
        second). Collective over process_group, like `load`."""
        reader = dcp_io.Reader(self.fs, self.fs_path, str(self.path), self.metadata,
                               self.expected, self.stats)
        wanted = [set(flatten_state_dict(s)[0]) for s in states]
        counts: dict[str, int] = {}
        for fqns in wanted:
            for fqn in fqns:
                counts[fqn] = counts.get(fqn, 0) + 1
        reader.keep = {fqn: n for fqn, n in counts.items() if n > 1}
        for state, fqns in zip(states, wanted):
            self._load_one(state, reader, process_group)
            reader.release(fqns)

    def _load_one(self, state: dict[str, Any], reader: dcp_io.Reader,
                  process_group: Optional[dist.ProcessGroup]) -> None:
        with _quiet_single_process():
            try:
                dcp.load(state, storage_reader=reader, planner=SafePlanner(str(self.path)),
                         process_group=process_group)
            except CheckpointException as e:  # a failure on any rank: say which, in one line
                for kind in (UnsafeCheckpoint, dcp_io.CorruptCheckpoint):
                    inner = _failure(e, kind)
                    if inner is not None:
                        raise inner from None
                raise


def load(state: dict[str, Any], path: PathLike,
         process_group: Optional[dist.ProcessGroup] = None) -> dcp_io.ReadStats:
    """DCP load into `state` in place (same keys as saved, any layout: DCP reshards
    by global names), straight from storage, every byte read checked (`Source`).
    Collective over process_group (default: all ranks) when a process group is
    initialized. Loads only the keys `state` has, so {"model": ...} alone skips the
    optimizer. Returns what it read."""
    source = Source(path)
    source.load([state], process_group)
    return source.stats


def checked_metadata(path: PathLike) -> "Metadata":
    """The checkpoint's DCP metadata, read without running code, every entry pointing into
    a file its manifests list (raypar/train/safe_dcp.py)."""
    manifests = _read_manifests(path, storage.list_dir(path) or {})
    listed = _listed_files(manifests) if not isinstance(manifests, str) else manifests
    if isinstance(listed, str):
        raise ConfigError(f"checkpoint {path}: not a valid checkpoint ({listed})")
    return read_metadata(path, {name: int(entry.get("size", -1))
                                for name, entry in listed.items()})


def _failure(e: CheckpointException, kind: type) -> Optional[Exception]:
    """The exception of that kind inside DCP's collective exception, if that is what failed."""
    for failure in getattr(e, "failures", {}).values():  # rank -> (exception, traceback)
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, kind):
            return inner
    return None


def load_model_state(path: PathLike, model: torch.nn.Module) -> None:
    """Load the model part of a checkpoint into a plain (unsharded) module, in one process.

    A tensor shared under two names (tied embeddings: lm_head.weight is tok_emb.weight)
    is read once, under its first name, so a checkpoint that stored only one works too.
    """
    full = model.state_dict()
    seen: dict[int, str] = {}
    wanted = {}
    for name, t in full.items():
        if t.untyped_storage().data_ptr() in seen and t.numel() > 0:
            continue
        seen[t.untyped_storage().data_ptr()] = name
        wanted[name] = t
    state = {"model": wanted}
    load(state, path)
    # Only the aliases skipped above can be missing; they share the loaded storage.
    model.load_state_dict(state["model"], strict=False)


def check_compatible(meta: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    """Raise ConfigError (a ValueError) naming every model field where the checkpoint's
    meta.json and this run's model config (GPTConfig fields) differ.

    The fields compared are model_cfg's; one the checkpoint lacks (saved before the
    field existed) counts as GPTConfig's default.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)
                if f.default is not dataclasses.MISSING}
    saved = meta.get("model") or {}
    diffs = []
    for key in sorted(model_cfg):
        a, b = saved.get(key, defaults.get(key, "<unset>")), model_cfg[key]
        if a != b:
            diffs.append(f"checkpoint has model.{key}={a}, this run has {b}")
    if diffs:
        raise ConfigError("checkpoint does not match this model: " + "; ".join(diffs))
