"""Where the corpus lives: resolve data.path to a sorted file list, fingerprint it,
and decide each document's split.

    from raypar.data.corpus import resolve_sources
    resolve_sources("", "auto")            # the built-in corpus: the stdlib's *.py files
    resolve_sources("data/**/*.jsonl", "auto")
    resolve_sources("s3://bucket/corpus/", "parquet")

Lists are sorted, so the document order, and with it every packed block's index,
is the same on every run and machine.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import posixpath
import re
import stat
import sysconfig
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Optional

import pyarrow.fs as pafs

from raypar.config import ConfigError, DataConfig

# Bump when decoding, splitting or tokenizing changes, so old caches stop matching.
# 2: a jsonl document's id is its line's byte offset, no longer its line number (files are
# read in byte ranges, so a task cannot know line numbers); BPE trains on a bounded sample.
PIPELINE_VERSION = 2

EXTENSIONS = {
    "text": (".txt", ".text", ".md", ".rst", ".py"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MAGIC = re.compile(r"[*?\[]")


def is_uri(path: str) -> bool:
    return bool(_SCHEME.match(path))


def builtin_sources() -> list[str]:
    """The interpreter's own top-level stdlib modules: present wherever Python is."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def format_of(path: str) -> str:
    """The format 'auto' picks for one file, by its extension."""
    name = path.lower()
    for fmt in ("jsonl", "parquet"):
        if name.endswith(EXTENSIONS[fmt]):
            return fmt
    return "text"


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.replace("\\", "/").split("/"))


def _extensions(fmt: str) -> tuple[str, ...]:
    return sum(EXTENSIONS.values(), ()) if fmt == "auto" else EXTENSIONS[fmt]


def _wanted(path: str, fmt: str) -> bool:
    return path.lower().endswith(_extensions(fmt))


def _kind(fmt: str) -> str:
    return f"{'corpus' if fmt == 'auto' else fmt} ({' '.join(_extensions(fmt))})"


def _not_a_file(path: str, st: os.stat_result) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(st.st_mode)), "not a regular file")
    return f"data.path: {path} is {kind}, not a regular file; remove it or narrow data.path"


def local_stat(path: str) -> os.stat_result:
    """os.stat of a corpus file, or one line naming it when it cannot be read as a file.

    Checked before anything opens it: opening a FIFO would block the run forever, and a
    broken link would otherwise surface as a traceback from inside Ray Data.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            what = "a symlink loop"
        elif os.path.islink(path):
            what = f"a dangling symlink (to {os.readlink(path)}, which does not exist)"
        else:
            what = f"unreadable ({e.strerror})"
        raise ConfigError(f"data.path: {path} is {what}; remove it or narrow data.path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"data.path: {path} is a directory where a file was expected")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(_not_a_file(path, st))
    if not os.access(path, os.R_OK):
        raise ConfigError(f"data.path: {path} is not readable (permission denied)")
    return st


def _glob_files(pattern: str) -> list[str]:
    """The glob's matches that are files; a matched directory is skipped (`**` lists them)."""
    found = []
    for p in glob.glob(pattern, recursive=True):
        if not os.path.isdir(p):
            local_stat(p)  # refuses what is not a readable regular file
            found.append(p)
    return found


def _list_local(path: str, fmt: str) -> tuple[list[str], str]:
    """(files, what was searched); a directory or glob keeps files of the wanted format."""
    path = os.path.expanduser(path)
    if _MAGIC.search(path):
        return [os.path.abspath(p) for p in _glob_files(path)], f"files matching {path}"
    if os.path.lexists(path) and not os.path.isdir(path):
        local_stat(path)
        return [os.path.abspath(path)], path
    if not os.path.isdir(path):
        raise ConfigError(f"data.path: no such file or directory: {path}")
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files
                  if not f.startswith(".") and _wanted(f, fmt)]
    for p in found:
        local_stat(p)  # os.walk lists broken links and FIFOs among the files
    return [os.path.abspath(p) for p in found], f"{_kind(fmt)} files under {path}"


def _list_remote(uri: str, fmt: str) -> tuple[list[str], str]:
    magic = _MAGIC.search(uri)
    base = uri[:magic.start()].rsplit("/", 1)[0] if magic else uri.rstrip("/")
    try:
        fs, base_path = pafs.FileSystem.from_uri(base)
        info = fs.get_file_info(base_path)
    except Exception as e:
        raise ConfigError(f"data.path: cannot open {uri}: {str(e).splitlines()[0]}") from None
    # What from_uri strips ("s3://", "hdfs://host:port"), put back on every listed path.
    prefix = (base[:len(base) - len(base_path)] if base.endswith(base_path)
              else base.split("://", 1)[0] + "://")
    if info.type == pafs.FileType.File and not magic:
        return [uri], uri
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"data.path: no such file or directory: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
    files = [prefix + i.path for i in infos if i.type == pafs.FileType.File
             and not _hidden(i.path[len(base_path):])]
    if magic:
        return [f for f in files if fnmatchcase(f, uri)], f"files matching {uri}"
    return [f for f in files if _wanted(f, fmt)], f"{_kind(fmt)} files under {uri}"


def resolve_sources(path: str, fmt: str) -> list[str]:
    """Sorted files of the corpus data.path names (empty: the built-in corpus)."""
    if fmt not in ("auto", *EXTENSIONS):
        raise ConfigError(f"data.format: expected one of auto, text, jsonl, parquet, got {fmt!r}")
    if not path:
        files, where = builtin_sources(), ".py files in the standard library"
    elif is_uri(path):
        files, where = _list_remote(path, fmt)
    else:
        files, where = _list_local(path, fmt)
    if not files:
        raise ConfigError(f"data.path: no {where}")
    return sorted(set(files))


def resolve_format(sources: list[str], fmt: str) -> str:
    """One format for the whole run: the given one, or the one every file's extension names."""
    if fmt != "auto":
        return fmt
    found = sorted({format_of(s) for s in sources})
    if len(found) > 1:
        examples = ", ".join(next(s for s in sources if format_of(s) == f) for f in found)
        raise ConfigError(f"data.format: data.path mixes formats {', '.join(found)} "
                          f"(e.g. {examples}); point data.path at one kind or set data.format")
    return found[0]


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: Optional[int]


def file_stats(sources: list[str]) -> list[FileStat]:
    """Size and modification time of each source, local or remote (one listing call)."""
    if not sources or not is_uri(sources[0]):
        out = []
        for p in sources:
            st = local_stat(p)  # the file may have changed since it was listed
            out.append(FileStat(p, st.st_size, st.st_mtime_ns))
        return out
    fs, paths = filesystem_for(sources)
    return [FileStat(s, i.size or 0, i.mtime_ns)
            for s, i in zip(sources, fs.get_file_info(paths))]


def check_not_empty(sources: list[str], stats: list[FileStat]) -> None:
    if not any(s.size for s in stats):
        raise ConfigError(f"data.path: the corpus is empty: {len(sources)} files, all empty "
                          f"(e.g. {sources[0]})")


def filesystem_for(sources: list[str]):
    """(pyarrow filesystem or None for local files, the paths that filesystem reads)."""
    if not sources or not is_uri(sources[0]):
        return None, list(sources)
    fs, first = pafs.FileSystem.from_uri(sources[0])
    prefix = sources[0][:len(sources[0]) - len(first)]
    return fs, [s[len(prefix):] if s.startswith(prefix) else s for s in sources]


def corpus_fingerprint(sources: list[str], cfg: DataConfig,
                       stats: Optional[list[FileStat]] = None) -> str:
    """sha256 over what decides the documents and their split; a changed file changes it."""
    h = hashlib.sha256(f"raypar-data v{PIPELINE_VERSION}\n".encode())
    fmt = resolve_format(sources, cfg.format)
    h.update(f"{fmt}\n{cfg.text_column}\n{cfg.val_fraction!r}\n".encode())
    for st in stats if stats is not None else file_stats(sources):
        h.update(repr(sorted(asdict(st).items())).encode() + b"\n")
    return h.hexdigest()


def document_names(sources: list[str]) -> list[str]:
    """Each file's name relative to the corpus root: the part of a document id that
    does not depend on where the corpus is mounted, so the split does not either."""
    local = not is_uri(sources[0])
    paths = sources if local else filesystem_for(sources)[1]
    pathmod = os.path if local else posixpath
    root = pathmod.commonpath([pathmod.dirname(p) for p in paths])
    return [pathmod.relpath(p, root).replace("\\", "/") for p in paths]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """A document goes to validation iff its id hashes below val_fraction.

    sha256, not hash(): Python randomises str hashes per process.
    """
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2.0 ** 64 < val_fraction


def document_id(name: str, index: int) -> str:
    """'<file relative to the root>#<index>': the byte offset of a jsonl line, the row of a
    parquet file, 0 for a text file's single document."""
    return f"{name}#{index}"
