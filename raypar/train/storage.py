"""Paths in a run's storage, local or remote: local paths (and file:// URIs) directly,
s3://, gs://, ... URIs through pyarrow's filesystems, which Ray Train itself uses.

    entries = list_dir("s3://bucket/run/checkpoints/step_00000010")   # {name: (is_dir, size)}
    digest = sha256(join(folder, "__0_0.distcp"))

Nothing here copies a whole folder to read it: checkpoints are read where they are.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import pyarrow.fs as pafs

PathLike = Union[str, Path]
_HASH_CHUNK = 1 << 20



def is_uri(path: PathLike) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path(path: PathLike) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(path: PathLike, name: str) -> PathLike:
    return f"{str(path).rstrip('/')}/{name}" if is_uri(path) else local_path(path) / name


def basename(path: PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else local_path(path).name


def pa_fs(uri: str):
    return pafs.FileSystem.from_uri(uri)  # (filesystem, path inside it)


def filesystem(path: PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path or a URI: one way to read and
    write both (checkpoints are written and read through it, raypar/train/dcp_io.py)."""
    if is_uri(path):
        return pa_fs(str(path))
    return pafs.LocalFileSystem(), str(local_path(path).absolute())


def list_dir(path: PathLike) -> Optional[dict[str, tuple[bool, int]]]:
    """{name: (is_dir, size)} of the direct children of path; None if path is not a folder."""
    if not is_uri(path):
        p = local_path(path)
        if not p.is_dir():
            return None
        out = {}
        for child in p.iterdir():
            try:
                st = child.stat()
            except FileNotFoundError:  # removed while listing
                continue
            out[child.name] = (child.is_dir(), st.st_size)
        return out
    fs, root = pa_fs(str(path))
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        # Object stores have no folders: a prefix with objects under it still lists.
        if info.type != pafs.FileType.NotFound:
            return None
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return None
    if not infos and info.type == pafs.FileType.NotFound:
        return None
    return {i.base_name: (i.type == pafs.FileType.Directory, i.size or 0) for i in infos}


@contextmanager
def open_read(path: PathLike) -> Iterator[io.RawIOBase]:
    if not is_uri(path):
        with open(local_path(path), "rb") as f:
            yield f
        return
    fs, p = pa_fs(str(path))
    with fs.open_input_stream(p) as f:
        yield f


def read_bytes(path: PathLike) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_json(path: PathLike) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def move(src: PathLike, dst: PathLike) -> None:
    """Rename a folder (local), or copy it and delete the original (object stores, which
    cannot rename a prefix)."""
    if not is_uri(src):
        os.replace(local_path(src), local_path(dst))
        return
    fs, src_path = pa_fs(str(src))
    _, dst_path = pa_fs(str(dst))
    pafs.copy_files(src_path, dst_path, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(src_path)
