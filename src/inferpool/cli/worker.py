"""``inferpool worker``: serve one model from this process."""

from __future__ import annotations

import sys

import click

from inferpool.cli._common import configure_logging, load_settings


@click.command()
@click.option("--model", "-m", required=True, help="Registry name (or alias) of the model to serve.")
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=None,
    help="Chunks handled at once (default: the model's serving.concurrency).",
)
@click.option("--worker-id", default=None, help="Name shown in Flower and heartbeats (default: MODEL@HOST-PID).")
@click.pass_context
def worker(ctx: click.Context, model: str, concurrency: int | None, worker_id: str | None) -> None:
    """Load MODEL once and serve its queue until stopped (SIGTERM finishes the current chunk).

    Needs REDIS_URL. The model loads before any task is taken: if it cannot load, the worker says why
    and exits with code 1 without consuming anything.
    """
    from inferpool.workers.serve import serve_model

    settings = load_settings(ctx)
    configure_logging(settings.log_level)
    sys.exit(serve_model(model, settings, concurrency=concurrency, worker_id=worker_id))
