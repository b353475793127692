"""``inferpool models``: what the registry holds."""

from __future__ import annotations

import json

import click
from rich.table import Table

from inferpool.cli._common import load_settings, make_console
from inferpool.model_registry.registry import Registry


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry entries as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List registered models with backend, context window and price.

    The built-in registry is merged with the files named in INFERPOOL_REGISTRY (':'-separated).
    """
    registry = Registry.load(load_settings(ctx).registry)
    if as_json:
        click.echo(json.dumps([spec.model_dump(mode="json") for spec in registry], indent=2))
        return
    table = Table(title="inferpool models")
    for column in ("model", "aliases", "backend", "context", "max output", "$/M in", "$/M out"):
        table.add_column(column)
    for spec in registry:
        caps, price = spec.capabilities, spec.pricing
        table.add_row(
            spec.name,
            ", ".join(spec.aliases),
            spec.backend,
            str(caps.context_window),
            str(caps.max_output_tokens),
            f"{price.input_per_mtok:g}",
            f"{price.output_per_mtok:g}",
        )
    make_console().print(table)
