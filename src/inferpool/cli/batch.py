"""``inferpool batch``: OpenAI Batch JSONL files through the pool."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from inferpool._exceptions import ConfigurationError
from inferpool.cli._common import load_settings, make_console
from inferpool.client.batch import BatchOutcome, BatchRunner
from inferpool.client.client import Client
from inferpool.local_pool import LocalPool
from inferpool.model_registry.registry import Registry
from inferpool.scheduler.batch_input import MAX_LINE_BYTES, AcceptedLine, BatchLineParser
from inferpool.scheduler.router import Router
from inferpool.settings import Settings

_ANSWER_PREVIEW_CHARS = 160


@click.group()
def batch() -> None:
    """Run OpenAI Batch JSONL files (one request per line) through the pool."""


@contextlib.contextmanager
def _pool_redis_url(settings: Settings, local: bool | None, models: set[str], console: Console) -> Iterator[str]:
    """Yield the Redis URL to use: a fresh local pool's, or the configured one."""
    if local is None:
        local = not settings.redis_url
    if not local:
        yield settings.require_redis_url()
        return
    with console.status(
        f"starting a local pool: Redis + workers for {', '.join(sorted(models)) or 'no model'} "
        "(the first run converts the SmolLM2 model, about a minute)"
    ):
        pool = LocalPool(models)
        pool.start()
    try:
        yield pool.redis_url
    finally:
        with console.status("stopping the local pool"):
            pool.stop()


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )  # fmt: skip


@batch.command("run")
@click.argument("input_path", metavar="INPUT.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write one OpenAI Batch output line per input line.",
)
@click.option(
    "--errors",
    "errors_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write failed lines here instead of into OUTPUT (as OpenAI's error file does).",
)
@click.option(
    "--local/--no-local",
    default=None,
    help="Start a private Redis and the workers the file needs, and stop them afterwards "
    "(default: on when REDIS_URL is unset).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Give up waiting after this many seconds (default: wait until every line is answered).",
)
@click.option(
    "--show-answers/--no-show-answers",
    default=None,
    help="Print each answer (default: when the file has at most 50 lines).",
)
@click.option(
    "--max-line-bytes",
    type=click.IntRange(min=1),
    default=MAX_LINE_BYTES,
    show_default=True,
    help="Lines longer than this get a line_too_large error.",
)
@click.pass_context
def run(
    ctx: click.Context,
    input_path: Path,
    output_path: Path,
    errors_path: Path | None,
    local: bool | None,
    timeout: float | None,
    show_answers: bool | None,
    max_line_bytes: int,
) -> None:
    """Send every line of INPUT.jsonl through the pool; write OUTPUT; print a usage summary.

    Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
    A bad line (malformed JSON, missing or duplicate custom_id, unknown model, invalid body, prompt over
    the context window) gets its own error line with a code and a message; the other lines still run.
    """
    settings = load_settings(ctx)
    console = make_console(stderr=True)
    registry = Registry.load(settings.registry)
    with input_path.open(encoding="utf-8") as handle:
        parsed = list(BatchLineParser(Router(registry), max_line_bytes=max_line_bytes).parse(handle))
    if not parsed:
        raise ConfigurationError(f"{input_path} has no requests (it is empty or holds only blank lines)")
    models = {line.spec.name for line in parsed if isinstance(line, AcceptedLine)}
    with (
        _pool_redis_url(settings, local, models, console) as redis_url,
        Client(settings=settings.with_redis_url(redis_url), registry=registry) as client,
        _progress(console) as progress,
    ):
        task = progress.add_task("requests", total=len(parsed))
        outcome = BatchRunner(client, max_line_bytes=max_line_bytes).run_parsed(
            parsed,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            timeout=timeout,
        )
    _write_outputs(outcome, output_path, errors_path)
    stdout = make_console()
    if show_answers if show_answers is not None else outcome.total <= 50:
        _print_answers(stdout, outcome)
    _print_summary(stdout, outcome, output_path, errors_path)


def _write_outputs(outcome: BatchOutcome, output_path: Path, errors_path: Path | None) -> None:
    errors = errors_path.open("w", encoding="utf-8") if errors_path else None
    try:
        with output_path.open("w", encoding="utf-8") as out:
            for line in outcome.output_lines():
                target = errors if (errors is not None and line.error is not None) else out
                target.write(line.model_dump_json() + "\n")
    finally:
        if errors is not None:
            errors.close()


def _print_answers(console: Console, outcome: BatchOutcome) -> None:
    for line in outcome.output_lines():
        if line.response is not None:
            text = " ".join(line.response.body.text.split())
            if len(text) > _ANSWER_PREVIEW_CHARS:
                text = text[: _ANSWER_PREVIEW_CHARS - 1] + "…"
            console.print(
                f"[bold]{line.custom_id}[/bold] [dim]({line.response.body.model})[/dim] {text}", highlight=False
            )
        elif line.error is not None:
            console.print(
                f"[bold]{line.custom_id}[/bold] [red]{line.error.code}[/red]: {line.error.message}", highlight=False
            )


def _print_summary(console: Console, outcome: BatchOutcome, output_path: Path, errors_path: Path | None) -> None:
    table = Table(title=f"usage for {outcome.job_id}")
    for column in ("model", "requests", "errors", "prompt tok", "completion tok", "cost $", "p50 s", "p95 s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in outcome.usage:
        table.add_row(
            row.model,
            str(row.requests),
            str(row.errors),
            str(row.prompt_tokens),
            str(row.completion_tokens),
            f"{row.cost_usd:.6f}",
            f"{row.latency_p50_s:.2f}" if row.latency_p50_s is not None else "-",
            f"{row.latency_p95_s:.2f}" if row.latency_p95_s is not None else "-",
        )
    console.print(table)
    rejected = outcome.total - len(outcome.results)
    completion_tokens = sum(row.completion_tokens for row in outcome.usage)
    rate = completion_tokens / outcome.wall_s if outcome.wall_s > 0 else 0.0
    console.print(
        f"{outcome.total} lines: {outcome.completed} completed, {outcome.failed} failed "
        f"({rejected} rejected before queueing) in {outcome.wall_s:.1f} s, {rate:.1f} completion tokens/s",
        highlight=False,
    )
    where = f"{output_path}" + (f", errors in {errors_path}" if errors_path else "")
    console.print(f"output written to {where}", highlight=False)
