"""What a batch job is made from on the command line: a JSONL file, or a template over data rows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import click

from inferpool.client.batch_lines import AcceptedLine, BatchLineParser
from inferpool.client.client import Client
from inferpool.client.routing import Router
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import Routing
from inferpool.plumbing.settings import Settings
from inferpool.templates.prompt import UnrenderedRow, load_template
from inferpool.templates.rows import read_rows
from inferpool.wire import VIA_CHOICES, BatchJob, Via

input_argument = click.argument(
    "input_path", metavar="[INPUT.jsonl]", required=False,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)  # fmt: skip
template_option = click.option(
    "--template", "template_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A prompt template (YAML: model, params, messages with Jinja2 contents); use with --rows.",
)  # fmt: skip
rows_option = click.option(
    "--rows", "rows_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Data rows for --template: .csv (with a header), .jsonl or .parquet; one request per row.",
)  # fmt: skip


cache_option = click.option(
    "--cache/--no-cache", default=None,
    help="Use the response cache for every line that does not choose (default: as each model's registry entry "
         "says: deterministic requests of models with a cache).",
)  # fmt: skip
via_option = click.option(
    "--via", type=click.Choice(VIA_CHOICES), default="auto", show_default=True,
    help="Path of the lines of models with a provider Batch API (OpenAI, Anthropic): the provider's own Batch "
         "API (answers within 24 h at its batch price, usually half), the real-time API, or auto: the Batch API "
         "where the registry enables it for the model (batch_api), the completion window is 24h and the job "
         "has at least the model's batch_api.min_lines lines. `batch status` shows the choice and why.",
)  # fmt: skip

routing_option = click.option(
    "--routing", type=click.Choice(["load", "prefix"]), default=None,
    help="How this job's lines pick a worker: prefix sends the lines that share a prompt prefix (a document's "
         "questions, a template's instructions) to the worker whose engine holds it, so it is prefilled once; "
         "load sends each chunk to whichever worker is free. Default: each model's own (prefix for vLLM "
         "models, load for the rest).",
)  # fmt: skip


@dataclass(frozen=True)
class JobInput:
    """A JSONL file, or a template and its rows."""

    input_path: Path | None = None
    template_path: Path | None = None
    rows_path: Path | None = None

    @classmethod
    def from_options(cls, input_path: Path | None, template_path: Path | None, rows_path: Path | None) -> JobInput:
        if input_path is not None and (template_path or rows_path):
            raise click.UsageError("give INPUT.jsonl or --template with --rows, not both")
        if input_path is None and not (template_path and rows_path):
            raise click.UsageError("give INPUT.jsonl, or --template PROMPT.yaml with --rows DATA.csv")
        return cls(input_path, template_path, rows_path)

    def lines(self) -> Iterable[str | UnrenderedRow]:
        """The job's lines (a template's rows rendered)."""
        if self.input_path is not None:
            return self.input_path.open(encoding="utf-8", errors="replace")
        assert self.template_path is not None
        assert self.rows_path is not None
        return load_template(self.template_path).compiled().lines(read_rows(self.rows_path))

    def models(self, settings: Settings) -> set[str]:
        """The registry models the valid lines ask for (to start their workers)."""
        router = Router(Registry.from_settings(settings))
        parser = BatchLineParser(router, max_line_bytes=settings.batch_max_line_bytes)
        return {line.spec.name for line in parser.parse(self.lines()) if isinstance(line, AcceptedLine)}

    def create(self, client: Client, priority: int, completion_window: str, cache: bool | None = None,
               via: Via = "auto", routing: Routing | None = None) -> BatchJob:  # fmt: skip
        if self.input_path is not None:
            return client.batches.create(self.input_path, priority=priority, completion_window=completion_window,
                                         cache=cache, via=via, routing=routing)  # fmt: skip
        assert self.template_path is not None
        assert self.rows_path is not None
        return client.batches.create_from_template(self.template_path, self.rows_path, priority=priority,
                                                   completion_window=completion_window, cache=cache,
                                                   via=via, routing=routing)  # fmt: skip
