"""Data rows for templates: CSV (header row), JSONL (one object per line) or Parquet (``pip install
"inferpool[parquet]"``), read one at a time. A row that cannot be read (a JSONL line that is not an
object) comes as an exception in its place, so it becomes that row's error and the rest still run."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inferpool._exceptions import TemplateError

Row = dict[str, Any]
ROW_FORMATS = (".csv", ".jsonl", ".ndjson", ".parquet")

#: The largest CSV field read: the default limit on one batch line (Python's csv module stops at 128 KiB).
#: A row with a larger field is that row's error; the line it would render to could not be sent anyway.
MAX_CSV_FIELD_CHARS = 1_000_000


def read_rows(path: str | Path) -> Iterator[Row | Exception]:
    """The rows of ``path`` in order, by its extension; ``TemplateError`` if it cannot be read at all."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ROW_FORMATS:
        raise TemplateError(f"{path}: rows must be a {', '.join(ROW_FORMATS)} file")
    if not path.is_file():
        raise TemplateError(f"{path}: no such rows file")
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    return _jsonl_rows(path)


def _csv_rows(path: Path) -> Iterator[Row | Exception]:
    if csv.field_size_limit() < MAX_CSV_FIELD_CHARS:
        csv.field_size_limit(MAX_CSV_FIELD_CHARS)  # process-wide, and only ever raised
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            try:
                header = reader.fieldnames
            except csv.Error as exc:
                raise TemplateError(f"{path}: the CSV header row cannot be read: {exc}") from exc
            if not header:
                raise TemplateError(f"{path}: the CSV file has no header row naming its columns")
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # this row only (an oversized field, a NUL byte): the reader goes on
                    yield ValueError(f"not a readable CSV row ({exc}; fields may be up to {MAX_CSV_FIELD_CHARS} "
                                     "characters)")  # fmt: skip
                    continue
                # A short row leaves its last columns None: missing, so a template using them says so.
                yield {k: v for k, v in row.items() if k is not None and v is not None}
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _jsonl_rows(path: Path) -> Iterator[Row | Exception]:
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                yield ValueError(f"not JSON ({exc})")
                continue
            yield value if isinstance(value, dict) else ValueError("not a JSON object")


def _parquet_rows(path: Path) -> Iterator[Row | Exception]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise TemplateError('reading Parquet needs pyarrow: pip install "inferpool[parquet]"') from exc
    try:
        for batch in parquet.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TemplateError(f"{path}: not a readable Parquet file: {exc}") from exc
