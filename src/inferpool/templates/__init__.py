"""Prompt templates over data rows: one batch line per row (see ``prompt.py``), rows read from CSV, JSONL
or Parquet (``rows.py``), and results joined back to their rows (``join.py``)."""

from inferpool.templates.prompt import PromptTemplate, UnrenderedRow, load_template
from inferpool.templates.rows import read_rows

__all__ = ["PromptTemplate", "UnrenderedRow", "load_template", "read_rows"]
