"""Corpus files to documents: the read and decode stage that Ray Data's read tasks run.

plan_pieces cuts the corpus into pieces on the driver, from the file sizes alone (and the
footer of a large parquet file), so that no task ever reads a large file whole:

- a jsonl file larger than CHUNK_BYTES becomes byte ranges of CHUNK_BYTES; a range holds
  the lines that START in it (its task reads on past the range's end to finish its last
  line, and skips the line it begins inside of, which the range before holds);
- a parquet file larger than CHUNK_BYTES becomes runs of row groups of about CHUNK_BYTES
  (compressed); a single row group larger than that stays one piece;
- a text file is one document, so it is one piece whatever its size: cutting it would cut
  the document (a 20 GB .txt is read whole by one task; use jsonl or parquet for those).

read_pieces (inside a task) turns pieces into a table of documents (SCHEMA): text files
are one document each; jsonl files one per non-blank line (the data.text_column key);
parquet files one per row (the data.text_column column). Each document carries its id's
parts (file index, and the byte offset of its jsonl line, its parquet row, or 0), the bytes
that were not UTF-8, and its split. A user error in the data (bad JSON, missing column)
travels as a value in the `error` column rather than an exception: Ray would wrap an
exception in a stack trace, and the driver is to print one line.
"""
from __future__ import annotations

import codecs
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from raypar.config import ConfigError
from raypar.data.corpus import document_id, document_names, filesystem_for, is_validation

CHUNK_BYTES = 32 << 20
"""Input bytes per piece of a large jsonl or parquet file, and about the most one read task
takes of small files together (tests monkeypatch it small, on the driver: pieces are cut
there). Also the decoded text after which a task starts a new output block."""

_replaced = threading.local()


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    # The same U+FFFD that errors='replace' gives, while counting the bytes it stands for.
    _replaced.n += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("raypar.count_replace", _count_and_replace)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text as errors='replace' decodes it, number of bytes replaced)."""
    _replaced.n = 0
    text = data.decode("utf-8", "raypar.count_replace")
    return text, _replaced.n


SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("text", pa.large_string()),
                    ("replaced", pa.int64()), ("val", pa.bool_()), ("error", pa.string())])


class _Docs:
    """Column lists of the decode stage's output table."""

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.cols: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.chars = 0
        self.failed = False

    def add(self, file: int, name: str, row: int, text: str, replaced: int = 0) -> None:
        if not text:  # an empty document would pack to a bare eot token
            return
        val = is_validation(document_id(name, row), self.val_fraction)
        for key, value in zip(SCHEMA.names, (file, row, text, replaced, val, None)):
            self.cols[key].append(value)
        self.chars += len(text)

    def error(self, file: int, message: str) -> None:
        for key, value in zip(SCHEMA.names, (file, 0, "", 0, False, message)):
            self.cols[key].append(value)
        self.failed = True

    def __len__(self) -> int:
        return len(self.cols["file"])

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=SCHEMA)


def _jsonl(out: _Docs, file: int, name: str, src: str, data: bytes, column: str,
           base: int = 0, lines_before: Callable[[], int] = lambda: 0) -> None:
    """The lines of data, which starts at byte `base` of the file. Only an error message
    needs a line number: lines_before() counts the file's lines before `base` then."""
    def line(offset: int) -> int:
        return lines_before() + data.count(b"\n", 0, offset - base) + 1

    # Splitting bytes on b"\n" is safe: in UTF-8 that byte never occurs inside a character.
    offset = base
    for raw in data.split(b"\n"):
        at, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        text, bad = decode_utf8(raw)
        try:
            obj = json.loads(text)
        except ValueError:
            return out.error(file, f"data.path: {src} line {line(at)} is not valid JSON "
                                   f"(expected one JSON object per line)")
        if not isinstance(obj, dict) or column not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            return out.error(file, f"data.text_column: {src} line {line(at)} has no key "
                                   f"{column!r} (found: {keys})")
        value = obj[column]
        if value is not None and not isinstance(value, str):
            return out.error(file, f"data.text_column: {src} line {line(at)}: {column!r} "
                                   f"is a {type(value).__name__}, expected a string")
        out.add(file, name, at, value or "", bad)


def _parquet_file(source) -> Optional[pq.ParquetFile]:
    try:
        return pq.ParquetFile(source)
    except Exception:  # pyarrow raises several types for a file that is not parquet
        return None


def _parquet(out: _Docs, file: int, name: str, src: str, pf: Optional[pq.ParquetFile],
             column: str, groups: Optional[range] = None) -> None:
    """The rows of row groups `groups` (all when None); a row's id is its row in the file."""
    if pf is None:
        return out.error(file, f"data.path: {src} is not a parquet file")
    schema = pf.schema_arrow
    if column not in schema.names:
        return out.error(file, f"data.text_column: {src} has no column {column!r} "
                               f"(columns: {', '.join(schema.names)})")
    typ = schema.field(column).type
    is_binary = pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
    if not (is_binary or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return out.error(file, f"data.text_column: column {column!r} of {src} has type "
                               f"{typ}, expected string")
    meta = pf.metadata
    groups = range(meta.num_row_groups) if groups is None else groups
    row = sum(meta.row_group(g).num_rows for g in range(groups.start))
    for g in groups:  # one row group at a time: memory is one group's column
        for value in pf.read_row_group(g, columns=[column]).column(0).to_pylist():
            if value is not None:
                text, bad = decode_utf8(value) if is_binary else (value, 0)
                out.add(file, name, row, text, bad)
            row += 1


def decode_batch(batch: pa.Table, fmt: str, text_column: str, val_fraction: float,
                 files: dict[str, tuple[int, str, str]]) -> pa.Table:
    """Whole files' bytes to documents: (bytes, path) rows -> document rows (see SCHEMA).
    The same documents and ids that read_pieces gives for those files, however cut.

    files maps each path to (file index, name relative to the root, source).
    """
    out = _Docs(val_fraction)
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        file, name, src = files[path]
        if fmt == "jsonl":
            _jsonl(out, file, name, src, data, text_column)
        elif fmt == "parquet":
            _parquet(out, file, name, src, _parquet_file(pa.BufferReader(data)),
                     text_column)
        else:
            text, bad = decode_utf8(data)
            out.add(file, name, 0, text, bad)
    return out.table()


# ---------------------------------------------------------------- pieces

@dataclass(frozen=True)
class Piece:
    """What one read task reads of one file: bytes [start, end) of a jsonl file, row groups
    [start, end) of a parquet file (end -1: to the last), or a whole text file."""
    file: int
    """Index of the file in the sorted corpus: the first part of document order."""
    path: str
    """What the filesystem opens (a local path, or the path inside a URI's filesystem)."""
    name: str
    """The file relative to the corpus root: document ids start with it."""
    src: str
    """The file as the user names it, for messages."""
    start: int
    end: int
    size: int
    """Input bytes the piece reads (compressed ones, for parquet)."""


def plan_pieces(sources: Sequence[str], fmt: str, sizes: Sequence[int],
                chunk: Optional[int] = None) -> list[Piece]:
    """The corpus cut into pieces, in document order (see the module docstring)."""
    chunk = max(1, CHUNK_BYTES if chunk is None else chunk)
    fs, paths = filesystem_for(list(sources))
    out: list[list[Piece]] = []
    footers = []  # big parquet files: their row groups come from their footers
    for i, (path, name, src, size) in enumerate(zip(paths, document_names(list(sources)),
                                                     sources, sizes)):
        if fmt == "jsonl" and size > chunk:
            out.append([Piece(i, path, name, src, a, min(a + chunk, size), min(chunk, size - a))
                        for a in range(0, size, chunk)])
        elif fmt == "parquet" and size > chunk:
            footers.append((len(out), Piece(i, path, name, src, 0, -1, size)))
            out.append([])
        else:
            out.append([Piece(i, path, name, src, 0, -1 if fmt == "parquet" else size, size)])
    # A footer is a round trip or two to an object store: read them side by side.
    with ThreadPoolExecutor(max_workers=16) as pool:
        runs = pool.map(lambda item: _parquet_pieces(fs, item[1], chunk), footers)
        for (slot, _), run in zip(footers, runs):
            out[slot] = run
    return [p for run in out for p in run]


def _parquet_pieces(fs, whole: Piece, chunk: int) -> list[Piece]:
    """Runs of whole row groups of about `chunk` compressed bytes (the footer only is read)."""
    try:
        with _open(fs, whole.path) as f:
            pf = _parquet_file(f)
            meta = pf.metadata if pf is not None else None
    except OSError as e:
        raise ConfigError(f"data.path: cannot read {whole.src} ({e.strerror or e})") from None
    if meta is None:
        raise ConfigError(f"data.path: {whole.src} is not a parquet file")
    out, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        acc += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        if acc >= chunk or g == meta.num_row_groups - 1:
            out.append(Piece(whole.file, whole.path, whole.name, whole.src, start, g + 1, acc))
            start, acc = g + 1, 0
    return out or [whole]  # no row groups: the task reports what it finds


def _open(fs, path: str):
    """A seekable binary file: local, or from the URI's pyarrow filesystem."""
    return open(path, "rb") if fs is None else fs.open_input_file(path)


def _line_range(f, start: int, end: int) -> tuple[int, bytes]:
    """(offset, bytes) of the whole lines that start in bytes [start, end) of the file."""
    lo = max(start - 1, 0)  # the byte before tells whether a line starts at `start`
    f.seek(lo)
    data = f.read(end - lo)
    first = 0
    if start > 0:
        cut = data.find(b"\n")
        if cut < 0:
            return end, b""  # a line that began in an earlier range covers this one
        first, data = lo + cut + 1, data[cut + 1:]
    if data and not data.endswith(b"\n"):  # the last line runs on past `end`: finish it
        tail = []
        while chunk := f.read(1 << 20):
            cut = chunk.find(b"\n")
            if cut >= 0:
                tail.append(chunk[:cut + 1])
                break
            tail.append(chunk)
        data += b"".join(tail)
    return first, data


def _count_lines(f, upto: int) -> int:
    """Newlines in bytes [0, upto) of the file (for an error message's line number)."""
    f.seek(0)
    count, left = 0, upto
    while left > 0 and (chunk := f.read(min(left, 8 << 20))):
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def _read_piece(out: _Docs, p: Piece, fmt: str, column: str, fs) -> None:
    with _open(fs, p.path) as f:
        if fmt == "jsonl":
            first, data = _line_range(f, p.start, p.end)
            _jsonl(out, p.file, p.name, p.src, data, column, first,
                   lambda: _count_lines(f, first))
        elif fmt == "parquet":
            pf = _parquet_file(f)
            groups = None
            if pf is not None and p.end >= 0:
                groups = range(p.start, min(p.end, pf.metadata.num_row_groups))
            _parquet(out, p.file, p.name, p.src, pf, column, groups)
        else:
            text, bad = decode_utf8(f.read())
            out.add(p.file, p.name, 0, text, bad)


def read_pieces(pieces: Sequence[Piece], fmt: str, text_column: str, val_fraction: float,
                fs=None) -> Iterator[pa.Table]:
    """A read task's body: its pieces' documents in order, as tables of SCHEMA; a new
    table after about CHUNK_BYTES of text. Stops at the first error (an `error` row)."""
    out, emitted = _Docs(val_fraction), False
    for p in pieces:
        try:
            _read_piece(out, p, fmt, text_column, fs)
        except OSError as e:  # vanished, unreadable: one line, not a task's stack trace
            out.error(p.file, f"data.path: cannot read {p.src} ({e.strerror or e})")
        if out.failed:
            break
        if out.chars >= CHUNK_BYTES:
            yield out.table()
            out, emitted = _Docs(val_fraction), True
    if len(out) or not emitted:
        yield out.table()
