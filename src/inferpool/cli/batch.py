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
from inferpool.client.client import Client
from inferpool.jobstore import BatchJob
from inferpool.local_pool import LocalPool
from inferpool.model_registry.registry import Registry
from inferpool.scheduler.batch_input import AcceptedLine, BatchLineParser
from inferpool.scheduler.router import Router
from inferpool.settings import Settings
from inferpool.wire import BatchOutputLine

_SHOW_ANSWERS_UP_TO = 50

input_argument = click.argument(
    "input_path", metavar="INPUT.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
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

    Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
    A job's state lives in Redis: submit, exit, and come back with `status`, `wait` or `results`.
    """


def _client(ctx: click.Context) -> Client:
    settings = load_settings(ctx)
    return Client(settings=settings)


@batch.command()
@input_argument
@priority_option
@window_option
@click.pass_context
def submit(ctx: click.Context, input_path: Path, priority: int, completion_window: str) -> None:
    """Validate and queue INPUT.jsonl on the pool at REDIS_URL; print the job id at once."""
    with _client(ctx) as client:
        job = client.batches.create(input_path, priority=priority, completion_window=completion_window)
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
@output_option
@errors_option
@click.pass_context
def results(ctx: click.Context, job_id: str, output_path: Path, errors_path: Path | None) -> None:
    """Write a job's output lines so far (all of them once it has finished), in completion order."""
    with _client(ctx) as client:
        job = client.batches.retrieve(job_id)
        count, _ = _write_results(client, job_id, output_path, errors_path)
    note = "" if job.status.is_final else f" (job still {job.status.value}: partial, run again later)"
    click.echo(f"{count} lines written to {output_path}{note}", err=True)


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
@click.pass_context
def run(ctx: click.Context, input_path: Path, output_path: Path, errors_path: Path | None, local: bool | None,
        timeout: float | None, show_answers: bool | None, priority: int, completion_window: str) -> None:  # fmt: skip
    """Submit INPUT.jsonl, follow it, write OUTPUT and print a usage summary.

    A bad line (malformed JSON, missing or duplicate custom_id, unknown model, invalid body, prompt over
    the context window) gets its own error line with a code and a message; the other lines still run.
    """
    settings = load_settings(ctx)
    console = make_console(stderr=True)
    use_local = not settings.redis_url if local is None else local
    models = _models_in(input_path, settings) if use_local else set()
    with _redis_url(settings, use_local, models, console) as redis_url, \
            Client(settings=settings.with_redis_url(redis_url)) as client:  # fmt: skip
        started = time.monotonic()
        job = client.batches.create(input_path, priority=priority, completion_window=completion_window)
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


def _models_in(input_path: Path, settings: Settings) -> set[str]:
    """The registry models a file's valid lines ask for (to start their workers)."""
    parser = BatchLineParser(Router(Registry.from_settings(settings)), max_line_bytes=settings.batch_max_line_bytes)
    with input_path.open(encoding="utf-8", errors="replace") as handle:
        return {line.spec.name for line in parser.parse(handle) if isinstance(line, AcceptedLine)}


@contextlib.contextmanager
def _redis_url(settings: Settings, local: bool, models: set[str], console: Console) -> Iterator[str]:
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
