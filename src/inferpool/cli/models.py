"""``inferpool models``: what the registry holds and, with a Redis URL, what the pool is doing with it."""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.table import Table

from inferpool.cli._common import load_settings, make_console
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.state.heartbeats import live_heartbeats, model_state
from inferpool.state.load import ModelLoad, read_model_load


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry entries (and their load) as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List registered models: backend, context window, price and, when REDIS_URL is set, live workers,
    queued chunk tasks and batch requests in flight.

    The built-in registry is merged with the files named in INFERPOOL_REGISTRY (':'-separated).
    """
    settings = load_settings(ctx)
    registry = Registry.from_settings(settings)
    loads: dict[str, ModelLoad] = {}
    warm: dict[str, int] = {}  # live workers holding the model loaded (workers with --models may not)
    if settings.redis_url:
        client = connect_redis(settings.redis_url)
        try:
            loads = {load.model: load for load in read_model_load(client, [spec.name for spec in registry])}
            warm = {spec.name: sum(model_state(beat) == "warm" for beat in live_heartbeats(client, spec.name).values())
                    for spec in registry}  # fmt: skip
        finally:
            client.close()
    if as_json:
        entries = [
            {
                **spec.model_dump(mode="json"),
                **({"load": {**loads[spec.name].model_dump(), "warm_workers": warm[spec.name]}} if loads else {}),
            }
            for spec in registry
        ]
        click.echo(json.dumps(entries, indent=2))
        return
    table = Table(title="inferpool models" + ("" if loads else " (set REDIS_URL to see live workers and queues)"))
    columns = ["model", "aliases", "backend", "serves", "context", "max output", "$/M in", "$/M out"]
    if loads:
        columns += ["workers", "queued", "in flight"]
    for column in columns:
        table.add_column(column)
    for spec in registry:
        caps, price = spec.capabilities, spec.pricing
        serves = ", ".join(kind if kind != "embeddings" or caps.embeddings is None
                           else f"embeddings ({caps.embeddings.dimensions}-dim)" for kind in caps.kinds())  # fmt: skip
        cells = [spec.name, ", ".join(spec.aliases), spec.backend, serves, str(caps.context_window),
                 str(caps.max_output_tokens), f"{price.input_per_mtok:g}", f"{price.output_per_mtok:g}"]  # fmt: skip
        if loads:
            load = loads[spec.name]
            workers = str(load.live_workers)
            if warm[spec.name] < load.live_workers:  # some hold it cold (budgeted workers load it on demand)
                workers += f" ({warm[spec.name]} warm)"
            cells += [workers, str(load.queue_depth), str(load.in_flight)]
        table.add_row(*(escape(cell) for cell in cells))
    make_console().print(table)
