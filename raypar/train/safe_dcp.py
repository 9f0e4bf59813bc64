"""Reading a DCP checkpoint without letting its files run code.

torch.distributed.checkpoint reads a checkpoint's `.metadata` with `pickle.load`, and its
non-tensor entries (the optimizer's param_groups values) with `torch.load(weights_only=False)`.
Both would run whatever a forged file asks for, and the manifests' hashes do not help:
whoever can write the folder can rewrite them too. So raypar reads both itself:

- `.metadata` through an unpickler that admits only the types DCP's metadata is made of
  (its metadata dataclasses, the filesystem's storage info, torch.Size, dtypes, layouts,
  a path) and refuses any other global by name;
- non-tensor entries with `torch.load(weights_only=True)`, which admits only tensors and
  plain containers of numbers and strings.

Tensors themselves DCP already reads with weights_only=True. A refusal raises
UnsafeCheckpoint naming the file and what it asked for.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
# Private, but the one function DCP's own planner uses to put a value back into a nested
# state dict; re-implementing its path rules would be the riskier choice.
from torch.distributed.checkpoint._traverse import set_element

from raypar.errors import ConfigError
from raypar.train import storage
from raypar.train.storage import PathLike

METADATA = ".metadata"
# Globals a DCP .metadata pickle refers to besides the metadata module's own classes and
# torch's dtypes (found by recording find_class over checkpoints of every layout).
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name, from a fixed table
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
}


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file asked for something a checkpoint never holds: refused unread."""


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED:
        return True
    if module == dcp_metadata.__name__:
        obj = getattr(dcp_metadata, name, None)
        return isinstance(obj, type) and obj.__module__ == module
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def read_metadata(path: PathLike) -> Metadata:
    """A checkpoint folder's DCP metadata (a local path or a URI), read with the
    allow-listed unpickler."""
    try:
        with storage.open_read(storage.join(path, METADATA)) as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, TypeError) as e:
        raise UnsafeCheckpoint(f"checkpoint {path}: {METADATA} refused: {e}, which a "
                               f"checkpoint never holds (a tampered or foreign file)") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"checkpoint {path}: {METADATA} refused: it holds a "
                               f"{type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """DCP's filesystem reader, with the metadata read by `read_metadata` above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata: raypar never writes it
            raise UnsafeCheckpoint(f"checkpoint {self.path}: per-rank DCP metadata is not "
                                   f"read")
        metadata = read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
