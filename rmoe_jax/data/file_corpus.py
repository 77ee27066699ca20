"""Documents from a user's own files: which files the globs name, and the documents inside.

Formats (`data.file_format`; `auto` picks by extension, `.gz` allowed on txt and jsonl):
  txt      .txt .text .md    the file is one document, or documents separated by
                             `data.document_delimiter` (e.g. '\\n\\n'; `\\n`, `\\t`, `\\\\` escapes)
  jsonl    .jsonl .ndjson    one JSON object per line; the text is field `data.text_field`
  parquet  .parquet          the text is column `data.text_field`

Files are read as streams: a delimited text, JSONL or Parquet file is never held in memory
whole (one document is). The corpus is cut into *units* of work, tokenized independently:
a file, a byte range of a big uncompressed JSONL file (cut at line starts), or a run of row
groups of a big Parquet file. Every document has a *position*, its byte offset in its file
(txt, jsonl) or its row (parquet); with the file's index it keys the seeded held-out choice,
so that choice does not depend on how the corpus was cut into units.

Whitespace-only documents are skipped (a trailing delimiter makes one). Everything that
cannot be read raises `BadInputError` naming the file and the line, byte or row.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence

from rmoe_jax.data.errors import BadInputError

EXTENSIONS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".parquet": "parquet"}
# A unit is at most this many bytes of a file (uncompressed JSONL, Parquet row groups), so a
# few big files still keep every worker busy and an interrupted run loses little.
UNIT_BYTES = 64 << 20
_BLOCK = 4 << 20


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How documents are read out of the files (the `data.*` fields of the same names)."""

    file_format: str = "auto"
    text_field: str = "text"
    document_delimiter: str = ""
    encoding_errors: str = "error"

    @property
    def delimiter(self) -> bytes:
        """The delimiter as UTF-8 bytes, with `\\n`, `\\t`, `\\r`, `\\\\` written as escapes
        decoded (a shell passes '\\n\\n' as backslash-n)."""
        text = self.document_delimiter
        out, i = [], 0
        while i < len(text):
            if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "ntr\\":
                out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[text[i + 1]])
                i += 2
            else:
                out.append(text[i])
                i += 1
        return "".join(out).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: documents of `path` from `start` to `stop` (bytes for txt/jsonl,
    row groups for parquet; stop = -1: to the end). `role` is the split the file was given
    for (train files may also feed held-out splits)."""

    index: int
    path: str
    file_index: int
    role: str
    kind: str
    compressed: bool
    start: int
    stop: int
    size: int  # bytes of the file this unit covers, for progress


def file_kind(path: str, file_format: str) -> tuple[str, bool]:
    """(txt | jsonl | parquet, gzip-compressed?) of `path` under `data.file_format`."""
    compressed = path.endswith(".gz")
    base = path[:-3] if compressed else path
    kind = file_format if file_format != "auto" else EXTENSIONS.get(os.path.splitext(base)[1])
    if kind is None:
        raise BadInputError(
            f"{path}: cannot tell the format from the extension (known: "
            f"{', '.join(sorted(EXTENSIONS))}, optionally .gz); set data.file_format to txt, "
            "jsonl or parquet")
    if kind == "parquet" and compressed:
        raise BadInputError(f"{path}: a gzipped Parquet file; Parquet compresses itself, "
                            "decompress it first")
    return kind, compressed


def expand_files(spec: str, field: str, file_format: str = "auto") -> list[str]:
    """The absolute, sorted, de-duplicated files that `spec` (comma-separated globs or folders,
    `**` recursive) names. A folder gives every file in it, recursively, with a known
    extension (or every file when `file_format` is not auto).

    Raises:
      BadInputError: a glob or folder names no file; the message names `field`.
    """
    files: set[str] = set()
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        full = os.path.abspath(os.path.expanduser(pattern))
        if os.path.isdir(full):
            found = [os.path.join(root, name) for root, _, names in os.walk(full)
                     for name in names if file_format != "auto" or _known(name)]
            where = f"folder {full} holds no file with a known extension ({', '.join(sorted(EXTENSIONS))})"
        else:
            found = [p for p in glob.glob(full, recursive=True) if os.path.isfile(p)]
            where = f"{pattern!r} matches no files (looked for {full})"
        if not found:
            raise BadInputError(f"{field}: {where}")
        files.update(os.path.realpath(p) for p in found)
    if not files:
        raise BadInputError(f"{field}: names no files")
    return sorted(files)


def _known(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return os.path.splitext(base)[1] in EXTENSIONS


def plan_units(files_by_role: dict[str, Sequence[str]], file_format: str,
               unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """The units of work, in stream order: roles in the given order, files in order.

    Raises:
      BadInputError: an empty file, an unreadable one, or an unknown format.
    """
    units: list[Unit] = []
    for role, paths in files_by_role.items():
        for file_index, path in enumerate(paths):
            kind, compressed = file_kind(path, file_format)
            try:
                size = os.path.getsize(path)
            except OSError as e:
                raise BadInputError(f"{path}: cannot be read ({e.strerror})") from None
            if size == 0:
                raise BadInputError(f"{path}: the file is empty (0 bytes); remove it or narrow "
                                    f"data.{role}_files")
            for start, stop, part in _pieces(path, kind, compressed, size, unit_bytes):
                units.append(Unit(len(units), path, file_index, role, kind, compressed,
                                  start, stop, part))
    return units


def _pieces(path: str, kind: str, compressed: bool, size: int, unit_bytes: int):
    if kind == "jsonl" and not compressed and size > unit_bytes:
        starts = list(range(0, size, unit_bytes))
        return [(s, min(s + unit_bytes, size), min(unit_bytes, size - s)) for s in starts]
    if kind == "parquet":
        metadata = _parquet_file(path).metadata
        pieces, first, group_bytes = [], 0, 0
        for group in range(metadata.num_row_groups):
            group_bytes += metadata.row_group(group).total_byte_size
            if group_bytes >= unit_bytes or group == metadata.num_row_groups - 1:
                pieces.append((first, group + 1, max(size * (group + 1 - first)
                                                     // max(metadata.num_row_groups, 1), 1)))
                first, group_bytes = group + 1, 0
        return pieces or [(0, 0, size)]
    return [(0, -1, size)]


def _parquet_file(path: str):
    import pyarrow.parquet as pq  # local: only Parquet corpora pay for pyarrow

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise BadInputError(f"{path}: not a readable Parquet file ({str(e)[:200]}); set "
                            "data.file_format if the extension is misleading") from None


def read_documents(unit: Unit, options: ReadOptions) -> Iterator[tuple[int, str, int]]:
    """(position, text, UTF-8 bytes of text) of every document of `unit`, in order.

    Raises:
      BadInputError: naming the file and the line, byte or row that cannot be read.
    """
    if unit.kind == "txt":
        documents = _txt_documents(unit, options)
    elif unit.kind == "jsonl":
        documents = _jsonl_documents(unit, options)
    else:
        documents = _parquet_documents(unit, options)
    found = False
    for document in documents:
        found = True
        yield document
    if not found and unit.start == 0 and unit.stop in (-1, unit.size) and unit.kind != "parquet":
        raise BadInputError(f"{unit.path}: holds no text (every document is empty or "
                            f"whitespace); remove it or narrow data.{unit.role}_files")


def _open(unit: Unit):
    try:
        return gzip.open(unit.path, "rb") if unit.compressed else open(unit.path, "rb")
    except OSError as e:
        raise BadInputError(f"{unit.path}: cannot be read ({e.strerror})") from None


def _line_of(unit: Unit, offset: int) -> int:
    """The 1-based line holding byte `offset` (of the decompressed stream); counted only when
    an error needs it."""
    line, done = 1, 0
    with _open(unit) as f:
        while done < offset:
            block = f.read(min(_BLOCK, offset - done))
            if not block:
                break
            line += block.count(b"\n")
            done += len(block)
    return line


def _decode(raw: bytes, unit: Unit, offset: int, options: ReadOptions) -> str:
    """`raw` as text; with encoding_errors=replace invalid bytes become U+FFFD (so count a
    document's bytes from the text returned, as the byte tokenizer will)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if options.encoding_errors == "replace":
            return raw.decode("utf-8", errors="replace")
        where = offset + e.start
        raise BadInputError(
            f"{unit.path}: line {_line_of(unit, where)} (byte {where:,}): invalid UTF-8 "
            f"({e.reason}); fix the file, or set data.encoding_errors=replace to read such "
            "bytes as U+FFFD") from None


def _text_and_size(raw: bytes, unit: Unit, offset: int, options: ReadOptions) -> tuple[str, int]:
    """(text, its UTF-8 bytes): the raw size, unless invalid bytes were replaced."""
    text = _decode(raw, unit, offset, options)
    return text, len(raw) if options.encoding_errors == "error" else len(text.encode("utf-8"))


def _gz_guard(unit: Unit, read):
    try:
        return read()
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise BadInputError(f"{unit.path}: damaged gzip file ({e})") from None


def _txt_documents(unit: Unit, options: ReadOptions):
    delimiter = options.delimiter
    with _open(unit) as f:
        if not delimiter:
            raw = _gz_guard(unit, f.read)
            if raw.strip():
                yield (0,) + _text_and_size(raw, unit, 0, options)
            return
        buffer, buffer_offset = b"", 0  # buffer starts at byte buffer_offset of the stream
        while True:
            block = _gz_guard(unit, lambda: f.read(_BLOCK))
            buffer += block
            start = 0
            while (end := buffer.find(delimiter, start)) >= 0 or (not block and start < len(buffer)):
                end = len(buffer) if end < 0 else end
                raw = buffer[start:end]
                if raw.strip():
                    where = buffer_offset + start
                    yield (where,) + _text_and_size(raw, unit, where, options)
                start = end + len(delimiter)
            if not block:
                return
            buffer, buffer_offset = buffer[start:], buffer_offset + start


def _jsonl_documents(unit: Unit, options: ReadOptions):
    field = options.text_field
    with _open(unit) as f:
        offset = unit.start
        if offset > 0:  # a line belongs to the unit its first byte lies in
            f.seek(offset - 1)
            offset += len(f.readline()) - 1
        stop = unit.stop if unit.stop >= 0 else float("inf")
        while offset < stop:
            line = _gz_guard(unit, f.readline)
            if not line:
                return
            line_offset, offset = offset, offset + len(line)
            if not line.strip():
                continue
            text = _decode(line, unit, line_offset, options)
            where = lambda: f"{unit.path}: line {_line_of(unit, line_offset)}"  # noqa: E731
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadInputError(f"{where()}: not JSON ({e.msg} at column {e.colno}); each "
                                    "line of a .jsonl file must be one JSON object") from None
            if not isinstance(record, dict) or field not in record:
                fields = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
                raise BadInputError(f"{where()}: no field {field!r} (has {fields}); set "
                                    "data.text_field to the field holding the text")
            value = record[field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise BadInputError(f"{where()}: field {field!r} holds {type(value).__name__}, "
                                    "not text")
            if value.strip():
                yield line_offset, value, len(value.encode("utf-8", errors="surrogatepass"))


def _parquet_documents(unit: Unit, options: ReadOptions):
    import pyarrow as pa

    column = options.text_field
    parquet = _parquet_file(unit.path)
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise BadInputError(f"{unit.path}: no column {column!r} (columns: {schema.names[:20]}); "
                            "set data.text_field to the column holding the text")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise BadInputError(f"{unit.path}: column {column!r} holds {kind}, not text")
    metadata = parquet.metadata
    row = sum(metadata.row_group(g).num_rows for g in range(unit.start))
    groups = list(range(unit.start, unit.stop))
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=4096, columns=[column], row_groups=groups):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                value = _parquet_text(value, unit, row, options)
            if value is not None and value.strip():
                yield row, value, len(value.encode("utf-8", errors="surrogatepass"))
            row += 1


def _parquet_text(raw: bytes, unit: Unit, row: int, options: ReadOptions) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if options.encoding_errors == "replace":
            return raw.decode("utf-8", errors="replace")
        raise BadInputError(f"{unit.path}: row {row}: invalid UTF-8 at byte {e.start} of the "
                            "value; fix the file, or set data.encoding_errors=replace") from None
