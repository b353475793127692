"""The client library's spans (``inferpool.tracing``): ``chat {model}`` around a call that waits for its answer,
``inferpool.submit`` around queueing one request, ``inferpool.batch.create`` around a batch upload. They use the
program's tracer provider, as a library should: nothing is recorded unless the program set one up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from inferpool.tracing import genai
from inferpool.tracing.spans import traceparent, tracer
from inferpool.wire import ChatCompletion, Completion
from inferpool.wire.kinds import AnyRequest

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class CallSpan:
    """The span of one call waiting for its answer; ``answered`` records what the answer says."""

    def __init__(self, span: Span | None) -> None:
        self.span = span

    def answered(self, response: object) -> None:
        if self.span is None or not isinstance(response, ChatCompletion | Completion):
            return
        usage = response.usage
        reasons = [choice.finish_reason for choice in response.choices if choice.finish_reason is not None]
        attributes: dict[str, Any] = genai.usage_attributes(usage.prompt_tokens if usage else None,
                                                            usage.completion_tokens if usage else None,
                                                            [str(reason) for reason in reasons])  # fmt: skip
        attributes["gen_ai.response.id"] = response.id
        attributes["gen_ai.response.model"] = response.model
        self.span.set_attributes(attributes)


@contextlib.contextmanager
def call_span(request: AnyRequest) -> Iterator[CallSpan]:
    """``{operation} {model}``, a GenAI client span, current while the call submits and waits."""
    found = tracer()
    if found is None:
        yield CallSpan(None)
        return
    from opentelemetry.trace import SpanKind

    attributes = genai.request_attributes(request, request.model)
    with found.start_as_current_span(genai.span_name(request, request.model), kind=SpanKind.CLIENT,
                                     attributes=attributes) as span:  # fmt: skip
        yield CallSpan(span)


@contextlib.contextmanager
def submit_span(name: str = "inferpool.submit") -> Iterator[Span | None]:
    """A producer span, child of the current one, open while a request (or a batch's lines) is queued; None when
    nothing is traced. Its ``traceparent`` is what the request travels under (``TaskItem.traced``, a job's
    record). Not made current: nothing inside makes spans, and attaching a context costs more than the span."""
    found = tracer()
    if found is None:
        yield None
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    span = found.start_span(name, kind=SpanKind.PRODUCER)
    try:
        yield span
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end()


__all__ = ["CallSpan", "call_span", "submit_span", "traceparent"]
