"""``inferpool batch``: OpenAI Batch JSONL jobs through the pool (submit, follow, fetch, cancel)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from inferpool.cli._common import load_settings, make_console
from inferpool.cli._display import answer_preview, job_progress, jobs_table, print_job
from inferpool.cli._job_input import (
    JobInput,
    cache_option,
    input_argument,
    routing_option,
    rows_option,
    template_option,
    via_option,
)
from inferpool.client.client import Client
from inferpool.model_registry.spec import Routing
from inferpool.plumbing.local_pool import LocalPool
from inferpool.plumbing.settings import Settings
from inferpool.templates.join import join_results
from inferpool.templates.prompt import CUSTOM_ID_METADATA, DEFAULT_CUSTOM_ID, UnrenderedRow, load_template
from inferpool.templates.rows import read_rows
from inferpool.wire import BatchJob, BatchOutputLine, Via

_SHOW_ANSWERS_UP_TO = 50

priority_option = click.option("--priority", type=int, default=0, show_default=True,
                               help="Higher runs first when several jobs share a model.")  # fmt: skip
window_option = click.option("--completion-window", default="24h", show_default=True,
                             help="Unfinished lines end as batch_expired after this ('30m', '24h', '2d').")  # fmt: skip
output_option = click.option("-o", "--output", "output_path", required=True,
                             type=click.Path(dir_okay=False, path_type=Path),
                             help="Where to write the OpenAI Batch output lines.")  # fmt: skip
errors_option = click.option("--errors", "errors_path", type=click.Path(dir_okay=False, path_type=Path),
                             help="Write failed lines here instead of into OUTPUT (as OpenAI does).")  # fmt: skip


@click.group()
def batch() -> None:
    """OpenAI Batch JSONL jobs: one request per line, one output line per request.

    Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}; the
    url may also be /v1/completions (a "prompt") or /v1/embeddings (an "input"), mixed in one file.
    A job's state lives in Redis: submit, exit, and come back with `status`, `wait` or `results`.
    """


def _client(ctx: click.Context) -> Client:
    settings = load_settings(ctx)
    return Client(settings=settings)


@batch.command()
@input_argument
@template_option
@rows_option
@priority_option
@window_option
@cache_option
@via_option
@routing_option
@click.pass_context
def submit(ctx: click.Context, input_path: Path | None, template_path: Path | None, rows_path: Path | None,
           priority: int, completion_window: str, cache: bool | None, via: Via,
           routing: Routing | None) -> None:  # fmt: skip
    """Validate and queue INPUT.jsonl (or --template over --rows) on the pool at REDIS_URL; print the job
    id at once."""
    source = JobInput.from_options(input_path, template_path, rows_path)
    with _client(ctx) as client:
        job = source.create(client, priority, completion_window, cache, via, routing)
    click.echo(job.id)
    click.echo(f"follow it with: inferpool batch wait {job.id}", err=True)


@batch.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as JSON.")
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job's status, counts, ETA and usage so far."""
    with _client(ctx) as client:
        job = client.batches.retrieve(job_id)
    if as_json:
        click.echo(job.model_dump_json(indent=2))
    else:
        print_job(make_console(), job)


@batch.command()
@click.argument("job_id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop waiting after this many seconds.")
@click.pass_context
def wait(ctx: click.Context, job_id: str, timeout: float | None) -> None:
    """Follow a job with a progress bar until it finishes (Ctrl-C stops waiting, not the job)."""
    with _client(ctx) as client:
        job = _follow(client, job_id, timeout)
    print_job(make_console(), job)


@batch.command()
@click.argument("job_id")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the OpenAI Batch output lines (with --join: the rows, .csv or .jsonl).")  # fmt: skip
@errors_option
@click.option("--join", "join_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The job's data rows (from --template --rows): write them with answer, error columns.")  # fmt: skip
@click.pass_context
def results(ctx: click.Context, job_id: str, output_path: Path, errors_path: Path | None,
            join_path: Path | None) -> None:  # fmt: skip
    """Write a job's output lines so far (all of them once it has finished), in completion order; or,
    with --join DATA.csv, the job's rows with each one's answer and error as new columns."""
    with _client(ctx) as client:
        job = client.batches.retrieve(job_id)
        if join_path is not None:
            template = job.metadata.get(CUSTOM_ID_METADATA, DEFAULT_CUSTOM_ID)
            summary = join_results(join_path, client.batches.results(job_id), output_path, template)
            click.echo(f"{summary.rows} rows written to {output_path}: {summary.answered} answered, {summary.failed} "
                       f"failed, {summary.missing} without a result yet", err=True)  # fmt: skip
            return
        count, _ = _write_results(client, job_id, output_path, errors_path)
    note = "" if job.status.is_final else f" (job still {job.status.value}: partial, run again later)"
    click.echo(f"{count} lines written to {output_path}{note}", err=True)


@batch.command()
@click.option("--template", "template_path", required=True, type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="The prompt template (YAML).")  # fmt: skip
@click.option("--rows", "rows_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The data rows: .csv (with a header), .jsonl or .parquet.")  # fmt: skip
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the batch JSONL.")  # fmt: skip
def build(template_path: Path, rows_path: Path, output_path: Path) -> None:
    """Render a prompt template over data rows into an OpenAI Batch JSONL file (one line per row).

    \b
    The template (YAML):
      model: smollm2-135m
      params: {temperature: 0, max_tokens: 64}
      custom_id: "{{ id }}"            # optional; default row-{{ row_number }}
      messages:
        - {role: user, content: "Capital of {{ country }}?"}

    Contents are Jinja2, rendered in its sandbox; a column the template uses and a row lacks is an
    error naming the row and the column. Such rows are reported and left out (exit status 1);
    `batch run/submit --template --rows` keep them as error lines instead.
    """
    written = 0
    problems: list[str] = []
    with output_path.open("w", encoding="utf-8") as handle:
        for line in load_template(template_path).compiled().lines(read_rows(rows_path)):
            if isinstance(line, UnrenderedRow):
                problems.append(line.message)
                continue
            handle.write(line + "\n")
            written += 1
    click.echo(f"{written} lines written to {output_path}", err=True)
    for problem in problems[:20]:
        click.echo(f"  {problem}", err=True)
    if problems:
        more = " (first 20 shown)" if len(problems) > 20 else ""
        click.echo(f"{len(problems)} rows could not be rendered and were left out{more}", err=True)
        sys.exit(1)


@batch.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job: queued lines end as batch_cancelled, running ones finish."""
    with _client(ctx) as client:
        job = client.batches.cancel(job_id)
    click.echo(f"{job.id}: {job.status.value}")


@batch.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_context
def list_jobs(ctx: click.Context, limit: int) -> None:
    """List recent jobs, newest first."""
    with _client(ctx) as client:
        jobs = client.batches.list(limit)
    make_console().print(jobs_table(jobs))


@batch.command()
@input_argument
@template_option
@rows_option
@output_option
@errors_option
@click.option("--local/--no-local", default=None,
              help="Start a private Redis, a scheduler and the workers the file needs, and stop them afterwards "
                   "(default: on when REDIS_URL is unset).")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop waiting after this many seconds.")
@click.option(
    "--show-answers/--no-show-answers",
    default=None,
    help=f"Print each answer (default: when the file has at most {_SHOW_ANSWERS_UP_TO} lines).",
)
@priority_option
@window_option
@cache_option
@via_option
@routing_option
@click.pass_context
def run(ctx: click.Context, input_path: Path | None, template_path: Path | None, rows_path: Path | None,
        output_path: Path, errors_path: Path | None, local: bool | None, timeout: float | None,
        show_answers: bool | None, priority: int, completion_window: str, cache: bool | None,
        via: Via, routing: Routing | None) -> None:  # fmt: skip
    """Submit INPUT.jsonl (or --template over --rows), follow it, write OUTPUT and print a usage summary.

    A bad line (malformed JSON, missing or duplicate custom_id, unknown model, invalid body, prompt over
    the context window, a row the template cannot be rendered with) gets its own error line with a code
    and a message; the other lines still run.
    """
    source = JobInput.from_options(input_path, template_path, rows_path)
    settings = load_settings(ctx)
    console = make_console(stderr=True)
    use_local = not settings.redis_url if local is None else local
    models = source.models(settings) if use_local else set()
    with redis_url_for(settings, use_local, models, console) as redis_url, \
            Client(settings=settings.with_redis_url(redis_url)) as client:  # fmt: skip
        started = time.monotonic()
        job = source.create(client, priority, completion_window, cache, via, routing)
        with ResultFiles(client, job.id, output_path, errors_path) as files:
            # Output lines are written while the job runs, not all at the end.
            job = _follow(client, job.id, timeout, local_pool=use_local, on_poll=files.drain)
            files.drain()
        elapsed = time.monotonic() - started
        count, first_lines = files.count, files.first
    stdout = make_console()
    if show_answers if show_answers is not None else count <= _SHOW_ANSWERS_UP_TO:
        _print_answers(stdout, first_lines)
    print_job(stdout, job)
    tokens = sum(row.completion_tokens for row in job.usage)
    stdout.print(f"{job.request_counts.total} lines in {elapsed:.1f} s: {job.request_counts.total / elapsed:.1f} "
                 f"lines/s, {tokens / elapsed:.1f} completion tokens/s", highlight=False)  # fmt: skip
    where = f"{output_path}" + (f", errors in {errors_path}" if errors_path else "")
    stdout.print(escape(f"output written to {where}"), highlight=False)


@contextlib.contextmanager
def redis_url_for(settings: Settings, local: bool, models: set[str], console: Console) -> Iterator[str]:
    """The Redis URL to use: a fresh local pool's (stopped on exit), or the configured one."""
    if not local:
        yield settings.require_redis_url()
        return
    names = ", ".join(sorted(models)) or "no model"
    with console.status(f"starting a local pool: Redis, scheduler, workers for {names} "
                        "(the first run converts the SmolLM2 model, about a minute)"):  # fmt: skip
        pool = LocalPool(models)
        pool.start()
    try:
        yield pool.redis_url
    finally:
        with console.status("stopping the local pool"):
            pool.stop()


def _follow(
    client: Client,
    job_id: str,
    timeout: float | None,
    *,
    local_pool: bool = False,
    on_poll: Callable[[], None] | None = None,
) -> BatchJob:
    console = make_console(stderr=True)
    try:
        with job_progress(console, job_id) as show_progress:

            def on_progress(job: BatchJob) -> None:
                show_progress(job)
                if on_poll is not None:
                    on_poll()

            return client.batches.wait(job_id, timeout=timeout, on_progress=on_progress)
    except KeyboardInterrupt:
        if local_pool:
            console.print(escape(f"interrupted: the local pool stops and job {job_id} with it. For jobs that outlive "
                                 "the command, run a pool on a Redis of your own and set REDIS_URL."))  # fmt: skip
        else:
            console.print(escape(f"stopped waiting; job {job_id} goes on. Reattach with: inferpool batch wait "
                                 f"{job_id}  (results: inferpool batch results {job_id} -o OUT.jsonl)"))  # fmt: skip
        sys.exit(130)


class ResultFiles:
    """Writes a job's output lines as they arrive (OUTPUT, and failed lines to ERRORS when given)."""

    def __init__(self, client: Client, job_id: str, output_path: Path, errors_path: Path | None) -> None:
        self._client = client
        self._job_id = job_id
        self._stack = contextlib.ExitStack()
        self._out = self._stack.enter_context(output_path.open("wb"))  # UTF-8 JSON lines, as pydantic makes them
        self._errors = self._stack.enter_context(errors_path.open("wb")) if errors_path else None
        self._position = "0-0"
        self.count = 0
        self.first: list[BatchOutputLine] = []

    def drain(self) -> None:
        """Write every line written since the last call."""
        while True:
            lines, position = self._client.batches.output_json_after(self._job_id, self._position)
            if position == self._position:  # a page can be empty (its results expired) with more after it
                return
            self._position = position
            for text, ok in lines:
                target = self._out if (ok or self._errors is None) else self._errors
                target.write(text + b"\n")
                if len(self.first) < _SHOW_ANSWERS_UP_TO:
                    self.first.append(BatchOutputLine.model_validate_json(text))
            self.count += len(lines)

    def __enter__(self) -> ResultFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _write_results(
    client: Client, job_id: str, output_path: Path, errors_path: Path | None
) -> tuple[int, list[BatchOutputLine]]:
    """Write the job's output lines so far; returns how many, and the first few (for printing)."""
    with ResultFiles(client, job_id, output_path, errors_path) as files:
        files.drain()
    return files.count, files.first


def _print_answers(console: Console, lines: list[BatchOutputLine]) -> None:
    """Each line's custom_id and answer (or error). Their text is the user's and the model's: escaped, never
    read as Rich markup (an answer with ``[/INST]`` in it would otherwise fail the whole print)."""
    for line in sorted(lines, key=lambda item: item.custom_id or ""):
        custom_id = escape(line.custom_id or "")
        if line.response is not None:
            body = line.response.body
            console.print(f"[bold]{custom_id}[/bold] [dim]({escape(body.model)})[/dim] "
                          f"{escape(answer_preview(body.text))}", highlight=False)  # fmt: skip
        elif line.error is not None:
            console.print(f"[bold]{custom_id}[/bold] [red]{escape(line.error.code)}[/red]: "
                          f"{escape(line.error.message)}", highlight=False)  # fmt: skip
