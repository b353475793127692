"""``inferpool stats``: usage per tenant and model, from Redis."""

from __future__ import annotations

import datetime as dt
import json

import click

from inferpool.cli._common import load_settings, make_console
from inferpool.cli._display import usage_table
from inferpool.cli.workers import collect_workers, workers_table
from inferpool.client.client import Client


@click.command()
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First UTC day (default: today).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last UTC day (default: today).")
@click.option("--model", default=None, help="Only this model.")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--job", "job_id", default=None, help="One batch job's usage instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.pass_context
def stats(ctx: click.Context, since: dt.datetime | None, until: dt.datetime | None, model: str | None,
          tenant: str | None, job_id: str | None, as_json: bool) -> None:  # fmt: skip
    """Requests, errors, tokens, cost, latency and time to first token (p50/p95) per tenant and model,
    counted once per request.

    Tenants come from the client (Client(tenant=...) or INFERPOOL_TENANT), else a request's `user` field,
    else 'default'. Percentiles are histogram bucket bounds. Latency and TTFT run from the moment a worker
    starts on a request; TTFT is '-' for models whose backend cannot see the first token (non-streaming
    provider calls).

    Below the usage, workers that hold several models within a memory budget (inferpool worker --models) are
    listed with what each holds now and its loads, wakes and evictions (all workers: inferpool workers).
    """
    with Client(settings=load_settings(ctx)) as client:
        if job_id is not None:
            rows = client.batches.retrieve(job_id).usage
            title = f"usage for {job_id}"
        else:
            first = since.date() if since else None
            rows = client.usage(first, until.date() if until else None, model=model, tenant=tenant)
            title = f"usage {first or 'today'} .. {until.date() if until else 'today'} (UTC)"
        budgeted = []
        if not as_json and job_id is None:
            budgeted = [w for w in collect_workers(client.redis, client.registry).values() if "budget_bytes" in w]
    if as_json:
        click.echo(json.dumps([row.model_dump() for row in rows], indent=2))
        return
    console = make_console()
    console.print(usage_table(title, rows))
    if budgeted:
        console.print(workers_table("workers holding several models (memory budget)", budgeted))
