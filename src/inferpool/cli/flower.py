"""``inferpool flower``: Celery's Flower on the pool's Redis, with authentication on by default."""

from __future__ import annotations

import os
import sys

import click

from inferpool._exceptions import ConfigurationError
from inferpool.cli._common import load_settings
from inferpool.plumbing.settings import Settings

AUTH_ENV = "INFERPOOL_FLOWER_AUTH"
#: Celery reads the broker URL from this variable before its configuration (celery.app.utils.Settings): it
#: must not be left set, or it would replace the app's own (e.g. kombu's form of a sentinel:// URL).
BROKER_ENV = "CELERY_BROKER_URL"


def _enable_task_events(settings: Settings) -> None:
    """Ask running workers for task events now (Flower repeats it every 5 s, for workers started later)."""
    from inferpool.plumbing.celery_app import create_celery_app

    app = create_celery_app(settings)
    try:
        app.control.enable_events()
    except Exception as exc:  # Flower retries on its own; it must still start
        click.echo(f"could not ask workers for task events yet: {exc}", err=True)
    finally:
        app.close()


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 to expose it).")
@click.option("--max-tasks", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="Tasks Flower keeps in memory (it keeps nothing on disk; job progress lives in Redis).")  # fmt: skip
@click.option("--no-auth", is_flag=True, help="Serve without authentication (only behind another gate).")
@click.pass_context
def flower(ctx: click.Context, port: int, address: str, max_tasks: int, no_auth: bool) -> None:
    """Run Flower for the pool at REDIS_URL, asking for the user:password in INFERPOOL_FLOWER_AUTH.

    Tasks show as `job=... model=... chunk=... n=...`: never prompt text, answers or keys.
    """
    settings = load_settings(ctx)
    broker = settings.require_redis_url()
    auth = settings.flower_auth
    # The Redis URL (with its password) goes through the environment: a command line is visible in `ps`.
    # Flower gets inferpool's own Celery app, configured from it (a sentinel:// URL needs its options).
    os.environ["REDIS_URL"] = broker
    os.environ.pop(BROKER_ENV, None)
    args = [sys.executable, "-m", "celery", "-A", "inferpool.cli._flower_app", "flower", f"--port={port}",
            f"--address={address}", f"--max_tasks={max_tasks}", "--purge_offline_workers=60"]  # fmt: skip
    if not no_auth:
        if ":" not in auth or not auth.split(":", 1)[1]:
            raise ConfigurationError(
                f"Flower needs credentials: set {AUTH_ENV}=user:password (or pass --no-auth to serve it open)"
            )
        os.environ["FLOWER_BASIC_AUTH"] = auth  # via the environment: not visible in `ps` like an argument
    _enable_task_events(settings)
    # Replace this process: Flower handles its own signals and logging.
    os.execv(sys.executable, args)
