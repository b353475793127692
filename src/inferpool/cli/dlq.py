"""``inferpool dlq``: requests that failed after their retries and fallbacks, and sending them again."""

from __future__ import annotations

import json
import time

import click
from rich.markup import escape
from rich.table import Table

from inferpool.cli._common import load_settings, make_console
from inferpool.client.client import Client


@click.group()
def dlq() -> None:
    """Dead letters: requests that ended in a provider error after every retry and fallback.

    Each also got its error result; the dead-letter list keeps the request so it can be sent again
    once the cause (an outage, a quota, a bad key) is fixed.
    """


@dlq.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most this many (oldest first).")
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON (without the request bodies).")
@click.pass_context
def list_dead_letters(ctx: click.Context, limit: int | None, as_json: bool) -> None:
    """List dead letters, oldest first: id, time, model, job, custom_id and the error."""
    with Client(settings=load_settings(ctx)) as client:
        letters = client.dead_letters.list(limit)
    if as_json:
        click.echo(json.dumps([letter.model_dump(exclude={"item"}) for letter in letters], indent=2))
        return
    table = Table(title=f"dead letters ({len(letters)})")
    for column in ("id", "at (UTC)", "model", "job", "custom_id", "error"):
        table.add_column(column)
    for letter in letters:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.at))
        # Cells are Rich markup: ids and messages (a provider's words, a user's custom_id) are escaped.
        cells = (letter.id, when, letter.model, letter.job_id or "-", letter.custom_id or "-",
                 f"{letter.error_code}: {letter.error_message}")  # fmt: skip
        table.add_row(*(escape(cell) for cell in cells))
    make_console().print(table)


@dlq.command("retry")
@click.argument("ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
@click.option("--model", default=None, help="Send them to this model instead of the one that failed.")
@click.pass_context
def retry(ctx: click.Context, ids: tuple[str, ...], retry_all: bool, model: str | None) -> None:
    """Send dead letters (IDS from `inferpool dlq list`, or --all) again, as a new batch job.

    They leave the list once the job holds them; failures of the new job come back as new dead letters.
    Follow it with `inferpool batch wait JOB_ID` and `inferpool batch results JOB_ID`.
    """
    if bool(ids) == retry_all:
        raise click.UsageError("give dead-letter IDS or --all (not both)")
    with Client(settings=load_settings(ctx)) as client:
        job = client.retry_dead_letters(None if retry_all else list(ids), model=model)
    click.echo(f"{job.id}: {job.request_counts.total} request(s) sent again as a batch job")
    click.echo(f"follow it with: inferpool batch wait {job.id}")
