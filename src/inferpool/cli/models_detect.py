"""``inferpool models detect``: ask providers, engines and checkpoints what each model really can do, beside what
the registry says; save it as registry YAML, or fail on drift (CI, cron)."""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from pydantic import SecretStr
from rich.markup import escape
from rich.table import Table

from inferpool._exceptions import ConfigurationError, DetectionError
from inferpool.cli._common import load_settings, make_console
from inferpool.detection.base import CAPABILITY_FIELDS, INFO_FIELDS, Detection, Target
from inferpool.detection.compare import FieldComparison, compare, with_detection
from inferpool.detection.plugins import load_detector
from inferpool.detection.targets import plan_for
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import Capabilities, ModelSpec
from inferpool.plumbing.settings import Settings

_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class _Row:
    """One model's detection: the registry entry (None: the source serves it, the registry lacks it)."""

    model: str
    spec: ModelSpec | None
    found: Detection | None = None
    error: str | None = None
    fields: list[FieldComparison] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.found is not None and not self.found.available:
            return "unavailable"
        if self.spec is None:
            return "not in registry"
        return "drift" if any(row.differs for row in self.fields) else "ok"


@click.command()
@click.argument("names", nargs=-1)
@click.option("--provider", help="Detect the registry's models of this provider (its providers: entry), and list "
              "the ids it serves that the registry lacks.")  # fmt: skip
@click.option("--base-url", help="Ask this server instead; NAMES are its model ids (none: every model it lists). "
              "OpenAI-compatible unless --detector says otherwise.")  # fmt: skip
@click.option("--detector", help="openai, anthropic, ollama, checkpoint, or an import path package.module:Class "
              "(default: the model's own, else its backend's).")  # fmt: skip
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="With --base-url: the environment variable holding the server's key (if it needs one).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print every detection and comparison as JSON.")
@click.option("--write", "write_to", type=click.Path(dir_okay=False, path_type=Path),
              help="Save what was detected as registry YAML into FILE: entries it holds are updated (comments and "
              "order kept), others added.")  # fmt: skip
@click.option("--check", is_flag=True, help="Exit 1 if a detected value differs from the registry or a model is "
              "unavailable, 2 if a source could not be read: for CI and cron.")  # fmt: skip
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each source.")
@click.pass_context
def detect(ctx: click.Context, names: tuple[str, ...], provider: str | None, base_url: str | None,
           detector: str | None, api_key_env: str, as_json: bool, write_to: Path | None, check: bool,
           timeout: float) -> None:  # fmt: skip
    """Detect what models really accept (context window, output limit, vision, tools...) from their provider's
    models API (OpenAI, Anthropic, vLLM/SGLang's max_model_len, Ollama) or their checkpoint, and print it beside
    the registry, differences in red.

    \b
    inferpool models detect                       every registry model that has a detector
    inferpool models detect smollm2-135m-vllm     one model
    inferpool models detect --provider together   a provider's models, and what else it serves
    inferpool models detect --base-url http://gpu-box:8000/v1 --write models.yaml
    inferpool models detect --check               exit non-zero on drift (CI, cron)
    """
    settings = load_settings(ctx)
    registry = Registry.from_settings(settings)
    if base_url is not None:
        rows = _from_server(registry, settings, base_url, detector or "openai", names, api_key_env, timeout)
    else:
        rows = _from_registry(registry, names, provider, detector, timeout)
    if as_json:
        click.echo(json.dumps([_as_json(row) for row in rows], indent=2))
    else:
        _print(rows)
    if write_to is not None:
        _write(write_to, rows, base_url)
    if check:
        if any(row.status == "error" for row in rows):
            sys.exit(2)
        if any(row.status in ("drift", "unavailable") for row in rows):
            sys.exit(1)


def _from_registry(registry: Registry, names: tuple[str, ...], provider: str | None, detector: str | None,
                   timeout: float) -> list[_Row]:  # fmt: skip
    specs = [registry.get(name) for name in names] if names else list(registry)
    if provider is not None:
        specs = [spec for spec in specs if spec.provider == provider]
        if not specs:
            raise ConfigurationError(f"no registry model uses provider {provider!r}")
    if detector is not None:
        specs = [spec.model_copy(update={"detector": detector}) for spec in specs]
    plans = []
    rows: list[_Row] = []
    for spec in specs:
        try:
            plan = plan_for(spec, timeout_s=timeout)
        except DetectionError as exc:
            rows.append(_Row(spec.name, spec, error=str(exc)))
            continue
        if plan is not None:
            plans.append(plan)
        elif names:
            rows.append(_Row(spec.name, spec, error=f"backend {spec.backend!r} has no detector; name one with "
                             "--detector or the model's 'detector:'"))  # fmt: skip

    def run(plan: Any) -> _Row:
        try:
            found = plan.run()
        except DetectionError as exc:
            return _Row(plan.spec.name, plan.spec, error=str(exc))
        return _Row(plan.spec.name, plan.spec, found, fields=compare(plan.spec, found))

    with ThreadPoolExecutor(max_workers=8) as pool:
        rows += list(pool.map(run, plans))
    if provider is not None and plans:  # what the provider serves that the registry does not name
        named = {plan.model_id for plan in plans}
        try:
            listed = load_detector(plans[0].detector).list_models(plans[0].target)
        except (DetectionError, ConfigurationError) as exc:
            rows.append(_Row(f"(provider {provider})", None, error=str(exc)))
            listed = []
        rows += [_Row(found.model, None, found) for found in listed if found.model not in named]
    return rows


def _from_server(registry: Registry, settings: Settings, base_url: str, detector_ref: str, names: tuple[str, ...],
                 api_key_env: str, timeout: float) -> list[_Row]:  # fmt: skip
    key = Settings.environment_secret(api_key_env).strip()
    target = Target(base_url=base_url, api_key=SecretStr(key) if key else None, timeout_s=timeout)
    detector = load_detector(detector_ref)
    found = [detector.detect(target, name) for name in names] if names else detector.list_models(target)
    by_id = {str(spec.params.get("model") or spec.name): spec for spec in registry}
    rows = []
    for item in found:
        spec = by_id.get(item.model)
        rows.append(_Row(item.model, spec, item, fields=compare(spec, item) if spec is not None else []))
    return rows


def _as_json(row: _Row) -> dict[str, Any]:
    told = {comparison.field for comparison in row.fields}
    sources = {name: "detected" if name in told else "registry" for name in CAPABILITY_FIELDS} if row.spec else {}
    return {"model": row.model, "status": row.status, "error": row.error, "sources": sources,
            "detection": row.found.model_dump(mode="json") if row.found else None,
            "fields": [{"field": c.field, "registry": c.registry, "detected": c.detected, "differs": c.differs}
                       for c in row.fields]}  # fmt: skip


def _print(rows: list[_Row]) -> None:
    table = Table(title="inferpool models detect")
    for column in ("model", "status", "detector", "field", "registry", "detected"):
        table.add_column(column)
    for row in rows:
        detector = row.found.detector if row.found else ""
        if row.error is not None or (row.found is not None and not row.found.available) or not row.fields:
            why = row.error or (row.found.note if row.found else "")
            table.add_row(escape(row.model), _status(row), escape(detector), "", "", escape(why))
            continue
        for index, comparison in enumerate(row.fields):
            style = "red" if comparison.differs else ""
            first = index == 0
            values = [comparison.field, _show(comparison.registry), _show(comparison.detected)]
            table.add_row(escape(row.model) if first else "", _status(row) if first else "",
                          escape(detector) if first else "",
                          *(f"[{style}]{escape(c)}[/]" if style else escape(c) for c in values))  # fmt: skip
        for name in INFO_FIELDS:
            value = getattr(row.found, name, None)
            if value is not None and name != "embedding_dimensions":
                table.add_row("", "", "", name, "", escape(_show(value)))
    make_console().print(table)


def _status(row: _Row) -> str:
    colour = {"ok": "green", "drift": "red", "unavailable": "red", "error": "yellow"}.get(row.status, "cyan")
    return f"[{colour}]{row.status}[/]"


def _show(value: Any) -> str:
    return "-" if value is None else str(value)


def _write(path: Path, rows: list[_Row], base_url: str | None) -> None:
    specs: list[ModelSpec] = []
    skipped: list[str] = []
    for row in rows:
        if row.found is None or not row.found.available:
            continue
        if row.spec is not None:
            specs.append(with_detection(row.spec, row.found))
        elif row.found.context_window is None:
            skipped.append(f"{row.model} (its source does not say its context window; add it by hand)")
        else:
            specs.append(with_detection(_new_spec(row.found, base_url), row.found))
    from inferpool.detection.registry_file import update_registry_file  # ruamel.yaml: only when writing

    done = update_registry_file(path, specs) if specs else []
    for line in done:
        click.echo(f"wrote {path}: {line}", err=True)
    for line in skipped:
        click.echo(f"not written: {line}", err=True)


def _new_spec(found: Detection, base_url: str | None) -> ModelSpec:
    """A registry entry for a model a server serves that the registry lacks."""
    name = _NAME_CHARS.sub("-", found.model).strip("-._") or "model"
    window = found.context_window or 1
    params: dict[str, Any] = {"model": found.model}
    if base_url is not None:
        params["base_url"] = base_url
    backend = {"anthropic": "anthropic"}.get(found.detector, "openai")
    capabilities = Capabilities(context_window=window, max_output_tokens=found.max_output_tokens or window,
                                default_max_tokens=min(256, found.max_output_tokens or window))  # fmt: skip
    return ModelSpec(name=name, backend=backend, params=params, capabilities=capabilities,
                     description=f"detected at {found.source}")  # fmt: skip
