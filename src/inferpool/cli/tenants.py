"""``inferpool tenants``: spend budgets of tenants (and gateway keys), and where each stands this window."""

from __future__ import annotations

import json

import click
from rich.table import Table

from inferpool._exceptions import InferpoolError
from inferpool.cli._common import load_settings, make_console
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.state.budgets import Budget, Budgets, TenantWeights
from inferpool.state.heartbeats import count_live_workers_many
from inferpool.state.jobs import JobStore
from inferpool.wire import check_tenant


def _budgets(ctx: click.Context) -> Budgets:
    return Budgets(connect_redis(load_settings(ctx).require_redis_url()))


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print budgets and spend as JSON.")
@click.pass_context
def tenants(ctx: click.Context, as_json: bool) -> None:
    """Spend budgets: each tenant's and key's budget, spent and held (reserved by requests in flight) this window.

    \b
    inferpool tenants
    inferpool tenants set acme --budget 2000/month
    inferpool keys create --tenant acme --budget 50/day     (a key's own budget, beside its tenant's)
    """
    if ctx.invoked_subcommand is not None:
        return
    store = _budgets(ctx)
    weights = TenantWeights(connect_redis(load_settings(ctx).require_redis_url())).all()
    rows: list[dict[str, object]] = [
        {**row, "weight": weights.get(row["scope"].removeprefix("tenant:"), 1.0)
         if row["scope"].startswith("tenant:") else None} for row in store.standing()]  # fmt: skip
    budgeted = {row["scope"] for row in rows}
    rows += [{"scope": f"tenant:{tenant}", "weight": weight} for tenant, weight in sorted(weights.items())
             if f"tenant:{tenant}" not in budgeted]  # fmt: skip
    shares = _shares(ctx)
    if as_json:
        click.echo(json.dumps(rows + shares, indent=2))
        return
    table = Table("scope", "budget", "spent", "held", "left", "weight", title="inferpool tenants (this window, UTC)")
    for row in rows:
        money = [f"${row['budget_usd']:g}/{row['window']}", *(f"${row[k]:.6f}" for k in ("spent_usd", "held_usd",
                 "left_usd"))] if "budget_usd" in row else ["-", "-", "-", "-"]  # fmt: skip
        table.add_row(str(row["scope"]), *money, "-" if row["weight"] is None else f"{row['weight']:g}")
    make_console().print(table)
    if shares:
        flight = Table("tenant", "model", "batch lines in flight", "share of the model's window",
                       title="fair share now")  # fmt: skip
        for share in shares:
            flight.add_row(str(share["tenant"]), str(share["model"]), str(share["in_flight"]),
                           f"{share['window_share']:.0%}")  # fmt: skip
        make_console().print(flight)


def _shares(ctx: click.Context) -> list[dict[str, object]]:
    """Each tenant's batch lines in flight per model, and its share of the model's window now."""
    settings = load_settings(ctx)
    client = connect_redis(settings.require_redis_url())
    counts = JobStore(client, settings.result_ttl_s).inflight_by_tenant()
    if not counts:
        return []
    registry = Registry.from_settings(settings)
    models = sorted({model for _, model in counts if model in registry})
    live = count_live_workers_many(client, models)
    windows = {model: registry.get(model).serving.window_per_worker() * max(1, live[model]) for model in models}
    return [{"tenant": tenant, "model": model, "in_flight": n, "window_share": n / windows[model]}
            for (tenant, model), n in sorted(counts.items()) if model in windows]  # fmt: skip


@tenants.command("set")
@click.argument("tenant")
@click.option("--budget", help="USD per window: 2000/month, 50/day, 100/none; 'none' removes it.")
@click.option("--weight", type=click.FloatRange(min=0.01, max=1000), help="Its share of each model's window against "
              "other tenants with work waiting (default 1: equal shares).")  # fmt: skip
@click.pass_context
def set_tenant(ctx: click.Context, tenant: str, budget: str | None, weight: float | None) -> None:
    """Set a tenant's spend budget and/or its fair-share weight (live: used within seconds)."""
    if check_tenant(tenant) is None:
        raise InferpoolError("give a tenant name")
    if budget is None and weight is None:
        raise InferpoolError("give --budget and/or --weight")
    client = connect_redis(load_settings(ctx).require_redis_url())
    if budget is not None:
        value = None if budget.strip().lower() == "none" else Budget.parse(budget)
        Budgets(client).set(f"tenant:{tenant}", value)
        click.echo(f"tenant {tenant}: budget {value.describe() if value else 'none'}")
    if weight is not None:
        TenantWeights(client).set(tenant, weight)
        click.echo(f"tenant {tenant}: weight {weight:g}")
