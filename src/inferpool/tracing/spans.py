"""What the rest of inferpool calls to trace: the tracer (or None, at no cost, when nobody collects spans), and
the W3C ``traceparent`` strings that carry a trace across processes (chunk headers, job records, HTTP)."""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext, Tracer

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

INSTRUMENTATION_NAME = "inferpool"
_AVAILABLE = importlib.util.find_spec("opentelemetry") is not None
_cache: list[tuple[object, Tracer]] = []  # the provider last asked, and its tracer


def tracer() -> Tracer | None:
    """inferpool's tracer from the process's tracer provider; None where OpenTelemetry is not installed, no
    provider was set (the API's no-op one), or instrumentation is suppressed here (OpenTelemetry's
    ``suppress_instrumentation``): then nothing is traced and no span work is done at all. Called several times
    per request, traced or not: it must cost next to nothing when off."""
    if not _AVAILABLE:
        return None
    api = _api()
    # The provider once set (set_tracer_provider sets it once); get_tracer_provider() would read the environment
    # on every call until then, ~4% of an untraced gateway's CPU.
    provider = getattr(api.trace, "_TRACER_PROVIDER", None) or api.trace.get_tracer_provider()
    if isinstance(provider, api.no_op_providers) or api.get_value(api.suppress_key):
        return None
    if _cache and _cache[0][0] is provider:
        return _cache[0][1]
    from importlib.metadata import version

    found: Tracer = provider.get_tracer(INSTRUMENTATION_NAME, version("inferpool"))
    _cache[:] = [(provider, found)]
    return found


class _Api:
    """The OpenTelemetry API's parts ``tracer`` needs, imported once."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, get_value
        from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider

        self.trace = trace
        self.get_value = get_value
        self.suppress_key = _SUPPRESS_INSTRUMENTATION_KEY
        self.no_op_providers = (ProxyTracerProvider, NoOpTracerProvider)


_loaded: list[_Api] = []


def _api() -> _Api:
    if not _loaded:
        _loaded.append(_Api())
    return _loaded[0]


def traceparent(span: Span | None) -> str | None:
    """``span``'s W3C traceparent, if it belongs to a real trace."""
    if span is None:
        return None
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def context_from(parent: object) -> Context | None:
    """The context a ``traceparent`` string names; None for anything else (a header is input like any other)."""
    if not isinstance(parent, str) or len(parent) > 128:
        return None
    return context_from_headers({"traceparent": parent})


def span_context_of(parent: object) -> SpanContext | None:
    """The remote span a version-00 ``traceparent`` names, if valid (all-zero ids are not)."""
    if not _AVAILABLE or not isinstance(parent, str):
        return None
    match = _TRACEPARENT.fullmatch(parent)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))


def context_from_headers(headers: dict[str, str]) -> Context | None:
    """The caller's trace, from an HTTP request's ``traceparent`` and ``tracestate`` headers."""
    if not _AVAILABLE or "traceparent" not in headers:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract(headers)
    return context if trace.get_current_span(context).get_span_context().is_valid else None
