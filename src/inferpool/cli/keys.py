"""``inferpool keys``: the gateway's API keys (one tenant each; only their hashes are stored)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import click

from inferpool._exceptions import InferpoolError
from inferpool.cli._common import load_settings, make_console
from inferpool.plumbing.redis_connection import connect_redis

if TYPE_CHECKING:
    from inferpool.gateway.keys import ApiKeys


@click.group()
def keys() -> None:
    """Create, list and revoke the gateway's API keys."""


def _keys(ctx: click.Context) -> ApiKeys:
    from inferpool.gateway.keys import ApiKeys  # the gateway's imports only when a keys command runs

    return ApiKeys(connect_redis(load_settings(ctx).require_redis_url()))


@keys.command("create")
@click.option("--tenant", required=True, help="Whose key: usage is counted for it, and it sees only its own objects.")
@click.pass_context
def create(ctx: click.Context, tenant: str) -> None:
    """Make a key and print it once (only its SHA-256 is kept: store it now)."""
    key, info = _keys(ctx).create(tenant)
    click.echo(key)
    click.echo(f"key id {info.key_id} for tenant {info.tenant} (revoke with `inferpool keys revoke {info.key_id}`)",
               err=True)  # fmt: skip


@keys.command("list")
@click.pass_context
def list_keys(ctx: click.Context) -> None:
    """Key ids, tenants and creation times (never the keys)."""
    from rich.table import Table

    table = Table("key id", "tenant", "created (UTC)")
    for info in _keys(ctx).list():
        table.add_row(info.key_id, info.tenant, dt.datetime.fromtimestamp(info.created_at, dt.UTC).isoformat())
    make_console().print(table)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key at once (gateways check every request against Redis)."""
    info = _keys(ctx).revoke(key_id)
    if info is None:
        raise InferpoolError(f"no key with id {key_id!r}; see `inferpool keys list`")
    click.echo(f"revoked {info.key_id} (tenant {info.tenant})")
