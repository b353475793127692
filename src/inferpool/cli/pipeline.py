"""``inferpool pipeline``: multi-step pipelines over data rows. This part checks pipeline files; running them is
not built yet (issue 32)."""

from __future__ import annotations

from pathlib import Path

import click

from inferpool._exceptions import TemplateError
from inferpool.cli._common import make_console
from inferpool.pipelines.spec import load_pipeline, step_needs
from inferpool.templates.rows import read_rows


@click.group()
def pipeline() -> None:
    """Multi-step pipelines over data rows: each row through a graph of prompt steps (a step's answer feeds the
    next: steps.<name>.answer). `validate` checks a pipeline file; running pipelines is not built yet."""


@pipeline.command("validate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rows", "rows_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A CSV, JSONL or Parquet file: also check that every variable the steps use is one of its "
              "columns.")  # fmt: skip
def validate(path: Path, rows_path: Path | None) -> None:
    """Check a pipeline file (YAML and template syntax, step names, what each step uses, cycles) and print its
    steps in the order they can run, with what each waits for. Exits 1 with the place of the first error."""
    columns = None
    if rows_path is not None:
        first = next(iter(read_rows(rows_path)), None)
        if isinstance(first, Exception):
            raise TemplateError(f"{rows_path}: its first row cannot be read: {first}")
        columns = list(first) if first is not None else []
    spec, order = load_pipeline(path, columns)
    needs = step_needs(spec)
    console = make_console()
    for name in order:
        step = spec.step(name)
        waits = ", ".join(sorted(needs[name])) or "nothing"
        console.print(f"{name}: model {step.model}, waits for {waits}" + (f", when {step.when}" if step.when else ""),
                      markup=False, highlight=False)  # fmt: skip
    click.echo(f"{path}: {len(order)} steps, valid", err=True)
