"""``inferpool models``: what the registry holds and, with a Redis URL, what the pool is doing with it."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from inferpool.cli._common import load_settings, make_console
from inferpool.cli.models_detect import detect
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import connect_redis
from inferpool.state.availability import read_unavailable
from inferpool.state.heartbeats import live_heartbeats, model_state
from inferpool.state.load import ModelLoad, read_model_load


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the registry entries (and their load) as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List registered models: backend, context window, price and, when REDIS_URL is set, live workers,
    queued chunk tasks, batch requests in flight, the window their engines really accept and whether their
    provider says they exist.

    The built-in registry is merged with the files named in INFERPOOL_REGISTRY (':'-separated).
    `inferpool models detect` asks providers, engines and checkpoints what each model really can do.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings(ctx)
    registry = Registry.from_settings(settings)
    loads: dict[str, ModelLoad] = {}
    warm: dict[str, int] = {}  # live workers holding the model loaded (workers with --models may not)
    unavailable: dict[str, dict[str, Any]] = {}
    if settings.redis_url:
        client = connect_redis(settings.redis_url)
        try:
            loads = {load.model: load for load in read_model_load(client, [spec.name for spec in registry])}
            unavailable = read_unavailable(client, [spec.name for spec in registry])
            warm = {spec.name: sum(model_state(beat) == "warm" for beat in live_heartbeats(client, spec.name).values())
                    for spec in registry}  # fmt: skip
        finally:
            client.close()
    if as_json:
        entries = [
            {
                **spec.model_dump(mode="json"),
                **({"load": {**loads[spec.name].model_dump(), "warm_workers": warm[spec.name]}} if loads else {}),
                **({"unavailable": unavailable[spec.name]} if spec.name in unavailable else {}),
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
        window = str(caps.context_window)
        served = loads[spec.name].context_window if loads else None
        if served is not None and served < caps.context_window:
            window += f" ({served} served)"  # what the live workers' engines accept, as they detected it
        cells = [spec.name, ", ".join(spec.aliases), spec.backend, serves, window,
                 str(caps.max_output_tokens), f"{price.input_per_mtok:g}", f"{price.output_per_mtok:g}"]  # fmt: skip
        if loads:
            load = loads[spec.name]
            workers = str(load.live_workers)
            if warm[spec.name] < load.live_workers:  # some hold it cold (budgeted workers load it on demand)
                workers += f" ({warm[spec.name]} warm)"
            if spec.name in unavailable:
                workers = f"unavailable: {unavailable[spec.name].get('note', '')}"
            cells += [workers, str(load.queue_depth), str(load.in_flight)]
        table.add_row(*(escape(cell) for cell in cells))
    make_console().print(table)


models.add_command(detect)
