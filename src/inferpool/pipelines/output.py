"""A pipeline's output as files: each row joined with its steps' answers and errors.

JSONL: one object per row, ``{"row_number", "row": {columns}, "steps": {name: outcome or null}}`` (an outcome
has ``answer``, ``json``, ``usage``, ``finish_reason``, ``cost_usd``, ``error``, ``skipped`` where set). CSV: the
row's columns, then per step a column with its answer and one (``<step>_error``) with ``code: message``,
``skipped``, or ``not run`` for a step the pipeline ended before (cancelled or expired).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from inferpool.wire import PipelineRow, StepOutcome


def _error_cell(outcome: StepOutcome | None) -> str:
    if outcome is None:
        return "not run"
    if outcome.skipped:
        return "skipped"
    return f"{outcome.error.code}: {outcome.error.message}" if outcome.error else ""


def write_rows(path: Path, steps: list[str], rows: Iterable[PipelineRow]) -> int:
    """Write the rows to ``path`` (``.csv``, else JSONL); returns how many."""
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        if path.suffix.lower() == ".csv":
            writer: csv.DictWriter[str] | None = None
            for row in rows:
                record = {"row_number": row.row_number, **{k: v for k, v in row.row.items() if k != "row_number"}}
                for name in steps:
                    outcome = row.steps.get(name)
                    record[name] = outcome.answer if outcome and outcome.answer is not None else ""
                    record[f"{name}_error"] = _error_cell(outcome)
                if writer is None:
                    writer = csv.DictWriter(handle, fieldnames=list(record), extrasaction="ignore")
                    writer.writeheader()
                writer.writerow(record)
                count += 1
            return count
        for row in rows:
            steps_json = {name: json.loads(o.model_dump_json(by_alias=True, exclude_defaults=True)) if o else None
                          for name, o in row.steps.items()}  # fmt: skip
            handle.write(json.dumps({"row_number": row.row_number, "row": row.row, "steps": steps_json},
                                    ensure_ascii=False) + "\n")  # fmt: skip
            count += 1
    return count
