"""``inferpool keys``: API keys for the gateway and the client library (one tenant each; only their hashes are
stored)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from inferpool._exceptions import InferpoolError
from inferpool.cli._common import load_settings, make_console
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.state.api_keys import ApiKeys, KeyLimits
from inferpool.state.budgets import Budget, Budgets


@click.group()
def keys() -> None:
    """Create, list and revoke the gateway's API keys."""


def _keys(ctx: click.Context) -> ApiKeys:
    return ApiKeys(connect_redis(load_settings(ctx).require_redis_url()))


def _limit_options(command: Any) -> Any:
    """The options that set a key's limits (create and set share them)."""
    for option in reversed([
        click.option("--models", help="Comma-separated models (or aliases) the key may use; others are 404 to it. "
                     "'all' (with set): any model."),
        click.option("--rpm", type=click.IntRange(min=0), help="Requests per minute (sliding; 0 with set: no limit)."),
        click.option("--tpm", type=click.IntRange(min=0), help="Tokens per minute: prompt estimate plus max_tokens "
                     "(0 with set: no limit)."),
        click.option("--max-in-flight", type=click.IntRange(min=0), help="Requests open at once, across gateways "
                     "(0 with set: no limit)."),
    ]):  # fmt: skip
        command = option(command)
    return command


def _limits(base: KeyLimits | None, models: str | None, rpm: int | None, tpm: int | None,
            max_in_flight: int | None) -> KeyLimits:  # fmt: skip
    """``base`` (None: no limits) with the options given applied (0 or 'all' removes a limit)."""
    base = base or KeyLimits()
    update: dict[str, Any] = {}
    if models is not None:
        names = [name.strip() for name in models.split(",") if name.strip()]
        update["models"] = None if names in ([], ["all"]) else names
    for field, value in (("rpm", rpm), ("tpm", tpm), ("max_in_flight", max_in_flight)):
        if value is not None:
            update[field] = value or None
    return KeyLimits.model_validate({**base.model_dump(), **update})


@keys.command("create")
@click.option("--tenant", required=True, help="Whose key: usage is counted for it, and it sees only its own objects.")
@click.option("--budget", help="The key's own spend budget, USD per window (50/day, 2000/month), beside its tenant's.")
@_limit_options
@click.pass_context
def create(ctx: click.Context, tenant: str, budget: str | None, models: str | None, rpm: int | None,
           tpm: int | None, max_in_flight: int | None) -> None:  # fmt: skip
    """Make a key and print it once (only its SHA-256 is kept: store it now).

    \b
    inferpool keys create --tenant acme
    inferpool keys create --tenant acme --models gpt-4o-mini,smollm2 --rpm 600 --tpm 200000 --max-in-flight 32
    """
    limits = _limits(None, models, rpm, tpm, max_in_flight)
    _check_models(ctx, limits)
    spend = Budget.parse(budget) if budget else None
    key, info = _keys(ctx).create(tenant, limits)
    if spend is not None:
        Budgets(connect_redis(load_settings(ctx).require_redis_url())).set(f"key:{info.key_id}", spend)
    click.echo(key)
    click.echo(f"key id {info.key_id} for tenant {info.tenant}, limits: {info.limits.describe()}"
               f"{f', budget {spend.describe()}' if spend else ''} (revoke with `inferpool keys revoke {info.key_id}`)",
               err=True)  # fmt: skip


@keys.command("set")
@click.argument("key_id")
@_limit_options
@click.pass_context
def set_limits(ctx: click.Context, key_id: str, models: str | None, rpm: int | None, tpm: int | None,
               max_in_flight: int | None) -> None:  # fmt: skip
    """Change a key's limits; gateways apply them from its next request."""
    store = _keys(ctx)
    current = next((info for info in store.list() if info.key_id == key_id), None)
    if current is None:
        raise InferpoolError(f"no key with id {key_id!r}; see `inferpool keys list`")
    limits = _limits(current.limits, models, rpm, tpm, max_in_flight)
    _check_models(ctx, limits)
    store.set_limits(key_id, limits)
    click.echo(f"key {key_id} (tenant {current.tenant}): limits {limits.describe()}")


def _check_models(ctx: click.Context, limits: KeyLimits) -> None:
    """A model list naming no registry model is a typo, not a restriction."""
    registry = Registry.from_settings(load_settings(ctx))
    unknown = [name for name in limits.models or [] if name not in registry]
    if unknown:
        raise InferpoolError(f"not in the registry: {', '.join(unknown)}; see `inferpool models`")


@keys.command("list")
@click.pass_context
def list_keys(ctx: click.Context) -> None:
    """Key ids, tenants and creation times (never the keys)."""
    from rich.table import Table

    table = Table("key id", "tenant", "created (UTC)", "limits")
    for info in _keys(ctx).list():
        table.add_row(info.key_id, info.tenant, dt.datetime.fromtimestamp(info.created_at, dt.UTC).isoformat(),
                      info.limits.describe())  # fmt: skip
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
