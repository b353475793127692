"""``inferpool probe``: health checks for container probes (exit status 0 when healthy)."""

from __future__ import annotations

import socket
import sys

import click

from inferpool.cli._common import load_settings


@click.group()
def probe() -> None:
    """Health checks for Kubernetes (or any supervisor): exit status 0 healthy, 1 not."""


@probe.command("worker")
@click.argument("model")
@click.pass_context
def probe_worker(ctx: click.Context, model: str) -> None:
    """Healthy while a worker of MODEL on this host has a live heartbeat in Redis (it beats every third of
    INFERPOOL_HEARTBEAT_TTL_S from its own thread, so a wedged or disconnected worker fails this)."""
    from inferpool.plumbing.redis_connection import connect_redis
    from inferpool.state.heartbeats import live_worker_ids

    settings = load_settings(ctx)
    client = connect_redis(settings.require_redis_url())
    here = f"@{socket.gethostname()}-"
    if any(here in worker_id for worker_id in live_worker_ids(client, model)):
        click.echo(f"a worker of {model} on this host is live")
        return
    click.echo(f"no live worker of {model} on this host", err=True)
    sys.exit(1)
