"""``inferpool scheduler``: the service that runs batch jobs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from types import FrameType

import click

from inferpool.cli._common import configure_logging, load_settings


@click.command()
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    envvar="INFERPOOL_METRICS_PORT",
    help="Also serve Prometheus metrics for the whole pool on this port (env INFERPOOL_METRICS_PORT).",
)
@click.option("--metrics-addr", default="127.0.0.1", show_default=True, help="Address the metrics server binds.")
@click.pass_context
def scheduler(ctx: click.Context, metrics_port: int | None, metrics_addr: str) -> None:
    """Run batch jobs: dispatch their lines to model queues with a bounded window, apply cancel and expiry.

    Needs REDIS_URL. Run one or several: one leads (a lease in Redis) and the others wait to take over
    within INFERPOOL_SCHEDULER_LEASE_S (6 s) plus a third if it dies. A new leader resumes every unfinished
    job (it re-sends their in-flight lines; results are still written once). SIGTERM or Ctrl-C stops it
    after the current tick and hands the lease on.
    """
    from inferpool.model_registry.registry import Registry
    from inferpool.plumbing.celery_app import create_celery_app
    from inferpool.plumbing.redis_connection import connect_redis
    from inferpool.scheduler.lease import SchedulerLease
    from inferpool.scheduler.service import Scheduler

    settings = load_settings(ctx)
    configure_logging(settings.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = connect_redis(settings.require_redis_url())
    registry = Registry.from_settings(settings)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    lease = SchedulerLease(client, owner, settings.scheduler_lease_s)
    service = Scheduler(client, settings, registry, create_celery_app(settings), lease=lease)
    if metrics_port is not None:
        from inferpool.plumbing.metrics import serve_metrics

        serve_metrics(metrics_port, client, registry, addr=metrics_addr, max_tenants=settings.metrics_max_tenants)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", metrics_addr, metrics_port)
    logging.getLogger(__name__).info("scheduler %s started; registry: %s", owner, registry.describe_sources())
    renewal = lease.keep_renewed(stop)
    try:
        service.run(stop)
    finally:
        renewal.join(timeout=lease.try_interval_s + 1)
        with contextlib.suppress(Exception):  # Redis may be gone at shutdown: the lease then lapses by itself
            lease.release()
