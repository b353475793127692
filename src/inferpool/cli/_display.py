"""How batch jobs look in the terminal: progress bars, status and usage tables."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
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

from inferpool.client.batches import JobProgressCallback
from inferpool.wire import BatchJob, ModelUsage

_ANSWER_PREVIEW_CHARS = 160


@contextmanager
def job_progress(console: Console, job_id: str) -> Iterator[JobProgressCallback]:
    """A progress bar (done/total, rate, ETA) fed by ``Batches.wait``'s callback."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]:>8} req/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
    task = progress.add_task(job_id, total=None, rate="-")
    started = time.monotonic()
    first_done: int | None = None

    def update(job: BatchJob) -> None:
        nonlocal first_done
        if first_done is None:
            first_done = job.finished
        elapsed = time.monotonic() - started
        rate = (job.finished - first_done) / elapsed if elapsed > 0 else 0.0
        progress.update(task, completed=job.finished, total=job.request_counts.total or None, rate=f"{rate:.0f}",
                        description=f"{job.id} {job.status.value}")  # fmt: skip

    with progress:
        yield update


def eta_seconds(job: BatchJob) -> float | None:
    """Remaining time at the job's average rate so far, or None before anything finished."""
    if job.in_progress_at is None or job.finished == 0 or job.status.is_final:
        return None
    elapsed = max(time.time() - job.in_progress_at, 1e-3)
    return (job.request_counts.total - job.finished) * elapsed / job.finished


def _seconds(value: float | None) -> str:
    """A percentile (a histogram bucket's upper bound) for a table cell; '-' where nothing was measured."""
    return "-" if value is None else ("> 1000" if value == float("inf") else f"{value:g}")


def usage_table(title: str, rows: list[ModelUsage]) -> Table:
    table = Table(title=title)
    with_tenant = any(row.tenant is not None for row in rows)
    with_cache = any(row.cache_hits for row in rows)  # columns shown once the response cache answered something
    with_prefix = any(row.prefix_cached_tokens for row in rows)  # once an engine reported prefix-cache hits
    columns = ("tenant",) * with_tenant + ("model", "requests", "errors", "prompt tok", "completion tok", "cost $",
                                           *("cached", "saved $") * with_cache, *("prefix hit",) * with_prefix,
                                           "p50 s", "p95 s", "ttft p50", "ttft p95")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "tenant") else "right")
    for row in rows:
        cells = [
            row.model, str(row.requests), str(row.errors), str(row.prompt_tokens), str(row.completion_tokens),
            f"{row.cost_usd:.6f}", *(str(row.cache_hits), f"{row.saved_usd:.6f}") * with_cache,
            *(f"{row.prefix_cache_hit_rate or 0.0:.0%}",) * with_prefix,
            *(_seconds(value) for value in (row.latency_p50_s, row.latency_p95_s, row.ttft_p50_s, row.ttft_p95_s)),
        ]  # fmt: skip
        table.add_row(*(escape(cell) for cell in ([row.tenant or ""] if with_tenant else []) + cells))
    return table


def print_job(console: Console, job: BatchJob) -> None:
    counts = job.request_counts
    line = (
        f"{job.id}: {job.status.value}, {job.finished}/{counts.total} done "
        f"({counts.completed} completed, {counts.failed} failed)"
    )
    eta = eta_seconds(job)
    if eta is not None:
        line += f", ETA {eta:.0f} s"
    console.print(escape(line), highlight=False)
    if job.errors:
        console.print(escape("errors: " + "; ".join(job.errors)), highlight=False)
    for model, path in sorted(job.paths.items()):
        console.print(escape(f"{model}: {path.via} ({path.reason})"), highlight=False)
    if job.routing:
        console.print(f"routing: {job.routing}", highlight=False)
    cached = sum(row.prefix_cached_tokens for row in job.usage)
    prompt = sum(row.prompt_tokens for row in job.usage)
    if cached and prompt:  # the engines' own count of prompt tokens they did not prefill
        console.print(f"prefix cache: {cached}/{prompt} prompt tokens ({cached / prompt:.0%}) not prefilled",
                      highlight=False)  # fmt: skip
    if job.provider_batches:
        console.print(provider_batches_table(job))
    if job.usage:
        console.print(usage_table(escape(f"usage for {job.id}"), job.usage))


def provider_batches_table(job: BatchJob) -> Table:
    """The job's batches at the providers: where each stands."""
    table = Table(title=escape(f"provider batches of {job.id}"))
    for column in ("batch", "model", "provider", "lines", "state", "provider batch", "provider says"):
        table.add_column(column)
    for batch in job.provider_batches:
        said = batch.outcome or batch.provider_status or ""
        table.add_row(escape(batch.id), escape(batch.model), batch.provider, str(batch.count), batch.state.value,
                      escape(batch.batch_id or "-"), escape(said))  # fmt: skip
    return table


def jobs_table(jobs: list[BatchJob]) -> Table:
    table = Table(title="batch jobs")
    for column in ("id", "status", "created", "total", "completed", "failed", "priority"):
        table.add_column(column)
    for job in jobs:
        counts = job.request_counts
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        table.add_row(escape(job.id), job.status.value, created, str(counts.total), str(counts.completed),
                      str(counts.failed), str(job.priority))  # fmt: skip
    return table


def answer_preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ANSWER_PREVIEW_CHARS else text[: _ANSWER_PREVIEW_CHARS - 1] + "…"
