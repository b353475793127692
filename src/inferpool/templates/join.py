"""Results joined back to the rows they came from: each row with its answer and error as new columns.

A row's custom_id is rendered again from the job's custom_id template (kept in its metadata), so rows
and results meet however the ids were made. The output's format follows its name: ``.csv`` or ``.jsonl``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferpool._exceptions import TemplateError
from inferpool.templates.prompt import DEFAULT_CUSTOM_ID, RowCustomIds, UnrenderedRow
from inferpool.templates.rows import Row, read_rows
from inferpool.wire import BatchOutputLine

ANSWER_COLUMN = "answer"
ERROR_COLUMN = "error"


@dataclass(frozen=True)
class JoinSummary:
    rows: int
    answered: int
    failed: int
    missing: int


def join_results(rows_path: Path, results: Iterable[BatchOutputLine], output_path: Path,
                 custom_id_template: str = DEFAULT_CUSTOM_ID) -> JoinSummary:  # fmt: skip
    """Write ``rows_path``'s rows with ``answer`` and ``error`` columns to ``output_path``."""
    suffix = output_path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise TemplateError(f"{output_path}: the joined output is written as .csv or .jsonl")
    outcomes: dict[str, tuple[str, str]] = {}
    for line in results:
        if line.custom_id is not None:
            outcomes[line.custom_id] = _outcome(line)
    joined = _joined_rows(rows_path, outcomes, custom_id_template)
    counts = {"rows": 0, "answered": 0, "failed": 0, "missing": 0}
    with output_path.open("w", encoding="utf-8", newline="") as handle:
        if suffix == ".jsonl":
            for row, kind in joined:
                counts["rows"] += 1
                counts[kind] += 1
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            columns = [*_columns(rows_path), ANSWER_COLUMN, ERROR_COLUMN]
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row, kind in joined:
                counts["rows"] += 1
                counts[kind] += 1
                writer.writerow(row)
    return JoinSummary(**counts)


def _outcome(line: BatchOutputLine) -> tuple[str, str]:
    if line.response is not None:
        return line.response.body.text, ""
    return "", line.error.message if line.error is not None else "no result"


def _joined_rows(rows_path: Path, outcomes: dict[str, tuple[str, str]],
                 custom_id_template: str) -> Iterator[tuple[dict[str, Any], str]]:  # fmt: skip
    ids = RowCustomIds(custom_id_template)
    for number, row in enumerate(read_rows(rows_path), start=1):
        fields: Row = {} if isinstance(row, Exception) else dict(row)
        custom_id = ids.of(number, row)
        if isinstance(custom_id, UnrenderedRow):
            answer, error, kind = "", custom_id.message, "failed"
        else:
            found = outcomes.get(custom_id)
            if found is None:
                answer, error, kind = "", f"row {number}: no result for custom_id {custom_id!r}", "missing"
            else:
                answer, error = found
                kind = "failed" if error else "answered"
        yield {**fields, ANSWER_COLUMN: answer, ERROR_COLUMN: error}, kind


def _columns(rows_path: Path) -> list[str]:
    """Every column of the rows, in first-seen order (a JSONL row may have keys others lack)."""
    seen: dict[str, None] = {}
    for row in read_rows(rows_path):
        if not isinstance(row, Exception):
            seen.update(dict.fromkeys(row))
    return [c for c in seen if c not in (ANSWER_COLUMN, ERROR_COLUMN)]
