"""Raw file bytes to documents: the decode stage the Ray Data tasks run.

Text files are one document each; jsonl files one per line (the data.text_column
key); parquet files one per row (the data.text_column column). Each document
carries its id's parts (file index, line or row), the bytes that were not UTF-8,
and its split. A user error in the data (bad JSON, missing column) travels as a
value in the `error` column rather than an exception: Ray would wrap an
exception in a stack trace, and the driver is to print one line.
"""
from __future__ import annotations

import codecs
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from raypar.data.corpus import document_id, is_validation

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

    def add(self, file: int, name: str, row: int, text: str, replaced: int = 0) -> None:
        if not text:  # an empty document would pack to a bare eot token
            return
        val = is_validation(document_id(name, row), self.val_fraction)
        for key, value in zip(SCHEMA.names, (file, row, text, replaced, val, None)):
            self.cols[key].append(value)

    def error(self, file: int, message: str) -> None:
        for key, value in zip(SCHEMA.names, (file, 0, "", 0, False, message)):
            self.cols[key].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=SCHEMA)


def _jsonl(out: _Docs, file: int, name: str, src: str, data: bytes, column: str) -> None:
    # Splitting bytes on b"\n" is safe: in UTF-8 that byte never occurs inside a character.
    for n, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        text, bad = decode_utf8(line)
        try:
            obj = json.loads(text)
        except ValueError:
            return out.error(file, f"data.path: {src} line {n + 1} is not valid JSON "
                                   f"(expected one JSON object per line)")
        if not isinstance(obj, dict) or column not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            return out.error(file, f"data.text_column: {src} line {n + 1} has no key "
                                   f"{column!r} (found: {keys})")
        value = obj[column]
        if value is not None and not isinstance(value, str):
            return out.error(file, f"data.text_column: {src} line {n + 1}: {column!r} is a "
                                   f"{type(value).__name__}, expected a string")
        out.add(file, name, n, value or "", bad)


def _parquet(out: _Docs, file: int, name: str, src: str, data: bytes, column: str) -> None:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except Exception:  # pyarrow raises several types for a file that is not parquet
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
    for row, value in enumerate(pf.read(columns=[column]).column(0).to_pylist()):
        if value is None:
            continue
        text, bad = decode_utf8(value) if is_binary else (value, 0)
        out.add(file, name, row, text, bad)


def decode_batch(batch: pa.Table, fmt: str, text_column: str, val_fraction: float,
                 files: dict[str, tuple[int, str, str]]) -> pa.Table:
    """map_batches UDF: (bytes, path) rows -> document rows (see SCHEMA).

    files maps each path Ray reports to (file index, name relative to the root, source).
    """
    out = _Docs(val_fraction)
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        file, name, src = files[path]
        if fmt == "jsonl":
            _jsonl(out, file, name, src, data, text_column)
        elif fmt == "parquet":
            _parquet(out, file, name, src, data, text_column)
        else:
            text, bad = decode_utf8(data)
            out.add(file, name, 0, text, bad)
    return out.table()
