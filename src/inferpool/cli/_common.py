"""Pieces every command uses: settings from the environment, and errors shown as one clear line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console

from inferpool._exceptions import ConfigurationError, InferpoolError
from inferpool.plumbing.settings import Settings
from inferpool.tracing.setup import install_tracing
from inferpool.wire import describe_validation_error


class InferpoolGroup(click.Group):
    """A click group that turns ``InferpoolError`` into ``error: <message>`` and exit code 1, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InferpoolError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)


def load_settings(ctx: click.Context) -> Settings:
    """Settings from the environment, read once per command line and kept on the click context."""
    root = ctx.find_root()
    if isinstance(root.obj, Settings):
        return root.obj
    try:
        settings = Settings()
    except ValidationError as exc:  # a variable's value only in pydantic's own traceback (a secret, perhaps)
        raise ConfigurationError(f"the environment's settings are invalid: {describe_validation_error(exc)}; "
                                 "fix or unset those variables") from exc  # fmt: skip
    # Spans of this command (a batch upload, a chat) go where OTEL_* say; a worker, gateway or scheduler is named
    # for its role (`inferpool-worker`...).
    install_tracing(settings.tracing, root.invoked_subcommand or "cli")
    root.obj = settings
    return settings


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def make_console(*, stderr: bool = False) -> Console:
    """A rich console; when output is not a terminal, a wide one that does not wrap answers mid-line."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160, soft_wrap=not stream.isatty())
