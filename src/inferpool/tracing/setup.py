"""Turning tracing on in a process inferpool runs (worker, gateway, scheduler, the CLI): an SDK tracer provider
exporting over OTLP/HTTP, built from ``TracingSettings``. A program that uses the client library sets up its own
provider; the library only uses the OpenTelemetry API, as libraries should."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inferpool._exceptions import ConfigurationError
from inferpool.plumbing.redis_connection import redact_url
from inferpool.tracing.settings import TracingSettings
from inferpool.tracing.spans import INSTRUMENTATION_NAME

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger(__name__)
_lock = threading.Lock()


@dataclass(frozen=True)
class SpanSink:
    """Where spans made after the fact go (a worker's, from the times it noted): the span processor this module
    installed, with the process's resource. Handing it finished ``ReadableSpan`` objects costs a tenth of
    starting and ending SDK spans (attribute checks, sampling, locks), per request on the single-request path."""

    processor: SpanProcessor
    resource: Resource
    scope: InstrumentationScope


_sink: SpanSink | None = None


def span_sink() -> SpanSink | None:
    """This process's ``SpanSink``, if ``install_tracing`` turned tracing on here."""
    return _sink


def _sampler(settings: TracingSettings) -> object:
    from opentelemetry.sdk.trace import sampling

    ratio = 1.0
    if settings.sampler_arg:
        try:
            ratio = min(1.0, max(0.0, float(settings.sampler_arg)))
        except ValueError as exc:
            raise ConfigurationError(f"OTEL_TRACES_SAMPLER_ARG={settings.sampler_arg!r} is not a number "
                                     "between 0 and 1") from exc  # fmt: skip
    samplers = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if settings.sampler not in samplers:
        raise ConfigurationError(f"OTEL_TRACES_SAMPLER={settings.sampler!r} is not supported; use one of "
                                 f"{', '.join(sorted(samplers))}")  # fmt: skip
    return samplers[settings.sampler]


def install_tracing(settings: TracingSettings, role: str) -> bool:
    """Export this process's spans as ``settings`` say (once per process; later calls keep the first setup).
    ``role`` names the service unless ``OTEL_SERVICE_NAME`` does: ``inferpool-{role}``. Returns whether
    spans are exported. Raises ``ConfigurationError`` if tracing is asked for and cannot be had."""
    global _sink
    if not settings.enabled:
        return False
    with _lock:
        if _sink is not None:
            return True
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
        except ImportError as exc:
            raise ConfigurationError(f"tracing is configured (OTEL_* variables) but OpenTelemetry's SDK is not "
                                     f"installed ({exc}): pip install 'inferpool[otel]'") from exc  # fmt: skip
        exporter: SpanExporter
        if settings.exporter == "console":
            exporter = ConsoleSpanExporter()
        elif settings.exporter not in ("", "otlp"):
            raise ConfigurationError(f"OTEL_TRACES_EXPORTER={settings.exporter!r} is not supported; use otlp, "
                                     "console or none")  # fmt: skip
        elif settings.protocol != "http/protobuf":
            raise ConfigurationError(f"OTLP protocol {settings.protocol!r} is not supported; set "
                                     "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (a collector's port 4318)")  # fmt: skip
        elif not settings.traces_endpoint:
            raise ConfigurationError("OTEL_TRACES_EXPORTER=otlp needs OTEL_EXPORTER_OTLP_ENDPOINT (a collector's "
                                     "OTLP/HTTP address, e.g. http://localhost:4318)")  # fmt: skip
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.traces_endpoint, headers=settings.parsed_headers(),
                                        timeout=settings.timeout_ms / 1000)  # fmt: skip
        attributes: dict[str, str | int] = {"service.name": f"inferpool-{role}", "service.instance.id":
                                             f"{os.uname().nodename}-{os.getpid()}"}  # fmt: skip
        attributes.update(settings.parsed_resource_attributes())
        if settings.service_name:
            attributes["service.name"] = settings.service_name
        provider = TracerProvider(resource=Resource(attributes), sampler=_sampler(settings))  # type: ignore[arg-type]
        processor = BatchSpanProcessor(exporter, schedule_delay_millis=settings.schedule_delay_ms)
        provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        from importlib.metadata import version

        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        scope = InstrumentationScope(INSTRUMENTATION_NAME, version("inferpool"))
        _sink = SpanSink(processor, provider.resource, scope)
        log.info("tracing on: %s spans to %s", attributes["service.name"],
                 "the console" if settings.exporter == "console" else redact_url(settings.traces_endpoint))  # fmt: skip
        return True


def flush_tracing(timeout_s: float = 5.0) -> None:
    """Export what is buffered now (a short-lived command ends; a worker stops)."""
    if _sink is not None:
        _sink.processor.force_flush(int(timeout_s * 1000))
