"""``inferpool workers``: the live workers, what each holds, and what its engine caches."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from inferpool.cli._common import load_settings, make_console
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.state.heartbeats import live_heartbeats, model_state


def collect_workers(client: Any, registry: Registry) -> dict[str, dict[str, Any]]:
    """Live workers by id: their models with each one's state, and what their heartbeats report."""
    workers: dict[str, dict[str, Any]] = {}
    for spec in registry:
        for worker_id, beat in live_heartbeats(client, spec.name).items():
            entry = workers.setdefault(worker_id, {"worker_id": worker_id, "pid": beat.get("pid"), "models": {},
                                                   "prefix_cache": {"queries": 0, "hits": 0}})  # fmt: skip
            entry["models"][spec.name] = model_state(beat)
            for field in ("loads", "evictions", "load_s", "sleeps", "wakes", "wake_s", "budget_bytes", "held_bytes"):
                if field in beat:
                    entry[field] = beat[field]
            cache = beat.get("prefix_cache")
            if isinstance(cache, dict):  # one engine per model: the worker's total is their sum
                entry["prefix_cache"]["queries"] += int(cache.get("queries", 0))
                entry["prefix_cache"]["hits"] += int(cache.get("hits", 0))
    return dict(sorted(workers.items()))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the workers as JSON.")
@click.pass_context
def workers(ctx: click.Context, as_json: bool) -> None:
    """The live workers (heartbeats in Redis at REDIS_URL): the models each serves and whether each is loaded
    (warm, loading, asleep or cold: workers started with --models load on demand), their loads, wakes and
    evictions, and the share of prompt tokens their engines found in their prefix caches (vLLM)."""
    settings = load_settings(ctx)
    registry = Registry.from_settings(settings)
    client = connect_redis(settings.require_redis_url())
    try:
        found = collect_workers(client, registry)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(list(found.values()), indent=2))
        return
    make_console().print(workers_table(f"inferpool workers ({len(found)} live)", found.values()))


def workers_table(title: str, found: Iterable[dict[str, Any]]) -> Table:
    """Workers (``collect_workers`` entries) as a table: models with their states, loads, wakes, evictions,
    seconds loading, and their engines' prefix-cache hit share."""
    table = Table(title=title)
    for column in ("worker", "models (state)", "loads", "wakes", "evictions", "load s", "prefix cache hit"):
        table.add_column(column, justify="left" if column in ("worker", "models (state)") else "right")
    for entry in found:
        models = ", ".join(f"{name} ({state})" for name, state in entry["models"].items())
        cache = entry["prefix_cache"]
        hit = f"{cache['hits'] / cache['queries']:.0%}" if cache["queries"] else "-"
        counts = [str(entry.get(field, "-")) for field in ("loads", "wakes", "evictions", "load_s")]
        table.add_row(escape(entry["worker_id"]), escape(models), *counts, hit)
    return table
