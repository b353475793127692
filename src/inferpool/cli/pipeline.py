"""``inferpool pipeline``: multi-step pipelines over data rows (validate, run, submit, status, wait, results,
cancel, list)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from inferpool._exceptions import TemplateError
from inferpool.cli._common import load_settings, make_console
from inferpool.cli.batch import priority_option, redis_url_for, window_option
from inferpool.client.client import Client
from inferpool.client.pipelines import PipelineProgressCallback
from inferpool.pipelines.output import write_rows
from inferpool.pipelines.spec import load_pipeline, step_needs
from inferpool.templates.rows import read_rows
from inferpool.wire import PipelineRun

_path = click.Path(dir_okay=False, path_type=Path)
rows_option = click.option("--rows", "rows_path", required=True, type=click.Path(exists=True, dir_okay=False,
                           path_type=Path), help="The rows: a CSV, JSONL or Parquet file.")  # fmt: skip
output_option = click.option("-o", "--output", "output_path", type=_path,
                             help="Write each row with its steps' answers here: .csv (a column per step and one "
                             "for its error) or .jsonl (each step's answer, usage and error).")  # fmt: skip


@click.group()
def pipeline() -> None:
    """Multi-step pipelines over data rows: each row through a graph of prompt steps, a step's answer feeding
    the steps after it ({{ steps.<name>.answer }}, .json, .usage, .finish_reason).

    A pipeline file is a list of steps, each a prompt template (model, params, messages) with a name and an
    optional `when:` condition. A row's next step is queued as soon as the steps it uses are answered, so every
    step runs at once; each (row, step) is answered exactly once, and the scheduler drives the pipeline: submit,
    exit, and come back with `status`, `wait` or `results`.
    """


def _client(ctx: click.Context) -> Client:
    return Client(settings=load_settings(ctx))


@pipeline.command("validate")
@click.argument("path", type=_path)
@click.option("--rows", "rows_path", type=_path,
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


@pipeline.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@rows_option
@priority_option
@window_option
@click.pass_context
def submit(ctx: click.Context, path: Path, rows_path: Path, priority: int, completion_window: str) -> None:
    """Check PATH against the rows, queue every row's first steps, print the pipeline's id and exit."""
    with _client(ctx) as client:
        run = client.pipelines.create(path, rows_path, priority=priority, completion_window=completion_window)
    click.echo(run.id)


@pipeline.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@rows_option
@output_option
@click.option("--resume", "resume_id", metavar="ID", help="Load the rows into this pipeline again (after a run "
              "interrupted while loading): rows and steps already there are not queued twice.")  # fmt: skip
@click.option("--local/--no-local", default=None,
              help="Start a local pool (Redis, scheduler, workers for the steps' models) for this run. Default: "
              "local when no REDIS_URL is set.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop waiting after this many seconds.")
@priority_option
@window_option
@click.pass_context
def run(ctx: click.Context, path: Path, rows_path: Path, output_path: Path | None, resume_id: str | None,
        local: bool | None, timeout: float | None, priority: int, completion_window: str) -> None:  # fmt: skip
    """Run PATH over the rows: progress per step, then usage and cost per step and in total, and the rows with
    every step's answer written to OUTPUT. A row whose step fails keeps that step's error (and the steps that
    use it are not run); the other rows go on."""
    settings = load_settings(ctx)
    console = make_console(stderr=True)
    use_local = not settings.redis_url if local is None else local
    spec, _ = load_pipeline(path)
    models = {step.model for step in spec.steps if "{" not in step.model} if use_local else set()
    with redis_url_for(settings, use_local, models, console) as redis_url, \
            Client(settings=settings.with_redis_url(redis_url)) as client:  # fmt: skip
        started = time.monotonic()
        with console.status("loading rows"):
            created = client.pipelines.create(path, rows_path, priority=priority, completion_window=completion_window,
                                              resume=resume_id)  # fmt: skip
        console.print(escape(f"pipeline {created.id}: {created.rows} rows, {len(created.steps)} steps"))
        final = _follow(client, created.id, timeout, console, local=use_local)
        elapsed = time.monotonic() - started
        if output_path is not None:
            written = write_rows(output_path, [s.name for s in final.steps], client.pipelines.results(final.id))
            console.print(escape(f"{written} rows written to {output_path}"))
    print_pipeline(make_console(), final, elapsed)


def _follow(client: Client, pipeline_id: str, timeout: float | None, console: Console, *, local: bool) -> PipelineRun:
    try:
        with pipeline_progress(console) as show:
            return client.pipelines.wait(pipeline_id, timeout=timeout, on_progress=show)
    except KeyboardInterrupt:
        if local:
            console.print(escape(f"interrupted: the local pool stops and pipeline {pipeline_id} with it."))
        else:
            console.print(escape(f"stopped waiting; pipeline {pipeline_id} goes on. Reattach with: inferpool "
                                 f"pipeline wait {pipeline_id} -o OUT.csv"))  # fmt: skip
        sys.exit(130)


@contextmanager
def pipeline_progress(console: Console) -> Iterator[PipelineProgressCallback]:
    """A bar per step: rows it is done with (answered, failed, skipped or not run) of the rows read."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console)  # fmt: skip
    tasks: dict[str, TaskID] = {}

    def update(run: PipelineRun) -> None:
        for step in run.steps:
            if step.name not in tasks:
                tasks[step.name] = progress.add_task(step.name, total=None, detail="")
            detail = f"{step.failed} failed, {step.skipped} skipped, {step.not_run} not run, ${step.cost_usd:.4f}"
            progress.update(tasks[step.name], completed=step.settled, total=run.rows or None, detail=detail)

    with progress:
        yield update


def print_pipeline(console: Console, run: PipelineRun, elapsed: float | None = None) -> None:
    table = Table(title=f"pipeline {run.id}: {run.status.value}, {run.rows} rows")
    for column in ("step", "answered", "failed", "skipped", "not run", "prompt tok", "completion tok", "cost $"):
        table.add_column(column, justify="left" if column == "step" else "right")
    totals = [0, 0, 0, 0, 0, 0]
    for step in run.steps:
        prompt = sum(row.prompt_tokens for row in step.usage)
        completion = sum(row.completion_tokens for row in step.usage)
        values = [step.completed, step.failed, step.skipped, step.not_run, prompt, completion]
        totals = [a + b for a, b in zip(totals, values, strict=True)]
        table.add_row(escape(step.name), *map(str, values), f"{step.cost_usd:.6f}")
    table.add_row("total", *map(str, totals), f"{run.cost_usd:.6f}")
    console.print(table)
    if elapsed is not None and elapsed > 0:
        console.print(f"{run.rows} rows in {elapsed:.1f} s: {run.rows / elapsed:.1f} rows/s", highlight=False)
    for error in run.errors:
        console.print(escape(f"error: {error}"))


@pipeline.command()
@click.argument("pipeline_id")
@click.option("--json", "as_json", is_flag=True, help="Print the pipeline object as JSON.")
@click.pass_context
def status(ctx: click.Context, pipeline_id: str, as_json: bool) -> None:
    """A pipeline's status, and per step its rows answered, failed, skipped and not run, usage and cost."""
    with _client(ctx) as client:
        run = client.pipelines.retrieve(pipeline_id)
    if as_json:
        click.echo(run.model_dump_json(indent=2))
    else:
        print_pipeline(make_console(), run)


@pipeline.command()
@click.argument("pipeline_id")
@output_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop waiting after this many seconds.")
@click.pass_context
def wait(ctx: click.Context, pipeline_id: str, output_path: Path | None, timeout: float | None) -> None:
    """Follow a pipeline until it ends (progress per step), then print its usage (and write OUTPUT)."""
    with _client(ctx) as client:
        final = _follow(client, pipeline_id, timeout, make_console(stderr=True), local=False)
        if output_path is not None:
            write_rows(output_path, [s.name for s in final.steps], client.pipelines.results(final.id))
    print_pipeline(make_console(), final)


@pipeline.command()
@click.argument("pipeline_id")
@click.option("-o", "--output", "output_path", required=True, type=_path,
              help="Where to write the rows with their steps' answers (.csv or .jsonl).")  # fmt: skip
@click.pass_context
def results(ctx: click.Context, pipeline_id: str, output_path: Path) -> None:
    """Write every row with each step's answer and error so far (a running pipeline's rows too)."""
    with _client(ctx) as client:
        run = client.pipelines.retrieve(pipeline_id)
        written = write_rows(output_path, [s.name for s in run.steps], client.pipelines.results(pipeline_id))
    click.echo(f"{written} rows written to {output_path} (pipeline {run.status.value})", err=True)


@pipeline.command()
@click.argument("pipeline_id")
@click.pass_context
def cancel(ctx: click.Context, pipeline_id: str) -> None:
    """Queue no more steps and cancel the steps' jobs (lines already running finish)."""
    with _client(ctx) as client:
        run = client.pipelines.cancel(pipeline_id)
    click.echo(f"{run.id}: {run.status.value}")


@pipeline.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_context
def list_pipelines(ctx: click.Context, limit: int) -> None:
    """The newest pipelines: status, rows, and rows done with per step."""
    with _client(ctx) as client:
        runs = client.pipelines.list(limit)
    table = Table()
    for column in ("id", "status", "rows", "steps (done/rows)", "cost $"):
        table.add_column(column)
    for run in runs:
        steps = ", ".join(f"{s.name} {s.settled}/{run.rows}" for s in run.steps)
        table.add_row(run.id, run.status.value, str(run.rows), escape(steps), f"{run.cost_usd:.6f}")
    make_console().print(table)
