"""Reading a DCP checkpoint without letting its files run code.

torch.distributed.checkpoint reads a checkpoint's `.metadata` with `pickle.load`, and its
non-tensor entries (the optimizer's param_groups values) with `torch.load(weights_only=False)`.
Both would run whatever a forged file asks for, and the manifests' hashes do not help:
whoever can write the folder can rewrite them too. So raypar reads both itself:

- `.metadata` through an unpickler that admits only the types DCP's metadata is made of
  (its metadata dataclasses, the filesystem's storage info, torch.Size, dtypes, layouts;
  a path becomes its text) and refuses any other global by name; it fills in instances
  of those dataclasses only (a pickle's BUILD could otherwise set attributes on an
  admitted class itself); and every entry must point into a file the manifests list,
  within its size, with no transforms;
- non-tensor entries with `torch.load(weights_only=True)`, which admits only tensors and
  plain containers of numbers and strings.

Tensors themselves DCP already reads with weights_only=True. A refusal raises
UnsafeCheckpoint naming the file and what it asked for.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
from typing import Any, Optional

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem
# Private names: _StorageInfo and _get_layout are what DCP's metadata pickles refer to;
# set_element is the one function DCP's own planner puts a value back into a nested state
# dict with (re-implementing its path rules would be the riskier choice).
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.serialization import _get_layout as _layout

from raypar.errors import ConfigError
from raypar.train import storage
from raypar.train.storage import PathLike

METADATA = ".metadata"


def _path(*parts: str) -> str:
    """What a pickled path becomes: its text. No pathlib class is handed to the pickle."""
    return os.path.join(*parts)


# The globals a DCP .metadata pickle refers to besides the metadata module's own classes
# and torch's dtypes (found by recording find_class over checkpoints of every layout), and
# what each is given as.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout,
    # StorageMeta.checkpoint_id (pathlib moved its classes to pathlib._local in 3.13)
    **{(module, name): _path for module in ("pathlib", "pathlib._local")
       for name in ("PosixPath", "PurePosixPath")},
}


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file asked for something a checkpoint never holds: refused unread."""


def _metadata_class(name: str) -> Optional[type]:
    obj = getattr(dcp_metadata, name, None)
    return obj if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__ else None


@functools.cache  # once per process: BUILD runs for every entry of a large checkpoint
def _instance_types() -> tuple[type, ...]:
    """The classes whose instances a metadata pickle may fill in (BUILD)."""
    return (_StorageInfo, *(c for c in map(_metadata_class, dir(dcp_metadata))
                            if c is not None and dataclasses.is_dataclass(c)))


# The pure-Python unpickler, because its opcodes can be overridden one by one: the C one
# only lets find_class be replaced, and BUILD (set the state of the object on the stack)
# would otherwise let a pickle set attributes on an allowed class or function itself.
class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        cls = _metadata_class(name) if module == dcp_metadata.__name__ else None
        if cls is not None:
            return cls
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")

    def load_build(self) -> None:
        target = self.stack[-2]  # under the state BUILD applies to it
        if isinstance(target, type) or not isinstance(target, _instance_types()):
            raise pickle.UnpicklingError(f"it sets the state of a {type(target).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_metadata(path: PathLike, files: Optional[dict[str, int]] = None,
                  data: Optional[bytes] = None) -> Metadata:
    """A checkpoint folder's DCP metadata (a local path or a URI), read with the
    allow-listed unpickler. files ({name: size}, from the manifests): every entry must point
    into one of them, within its size. data: the file's bytes, when the caller has read
    (and checked) them already."""
    where = f"checkpoint {path}: {METADATA}"
    try:
        if data is None:
            with storage.open_read(storage.join(path, METADATA)) as f:
                data = f.read()
    except OSError as e:
        raise UnsafeCheckpoint(f"{where} cannot be read ({e.strerror or type(e).__name__})"
                               ) from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{where} refused: {e}, which a checkpoint never holds (a "
                               f"tampered or foreign file)") from None
    except Exception as e:  # noqa: BLE001 - anything else a damaged pickle raises
        raise UnsafeCheckpoint(f"{where} is damaged ({type(e).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{where} refused: it holds a {type(metadata).__name__}, not "
                               f"DCP metadata")
    problem = _bad_entry(metadata, files)
    if problem:
        raise UnsafeCheckpoint(f"{where} refused: {problem}")
    return metadata


def _bad_entry(metadata: Metadata, files: Optional[dict[str, int]]) -> Optional[str]:
    """Why an entry of the metadata points somewhere a checkpoint's data never is."""
    if not isinstance(metadata.storage_data, dict):
        return "its storage_data is not a table"
    for index, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo):
            return f"the entry of {getattr(index, 'fqn', index)} is not storage info"
        name, offset, length = info.relative_path, info.offset, info.length
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            return f"an entry points outside the checkpoint ({name!r})"
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0
                and length >= 0):
            return f"an entry of {name} has offset {offset!r} and length {length!r}"
        if info.transform_descriptors:
            return f"an entry of {name} asks for transforms {info.transform_descriptors!r}"
        if files is not None and (name not in files or offset + length > files[name]):
            return (f"an entry points to {name} bytes {offset}..{offset + length}, which no "
                    f"manifest lists")
    return None


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries load weights_only."""

    def __init__(self, where: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.where = where

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a paragraph; the line naming a GLOBAL says what the entry
            # asked for.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "?")
            raise UnsafeCheckpoint(f"checkpoint {self.where}: entry {fqn} refused ({reason})"
                                   ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
