"""The scheduler's spans (``inferpool.tracing``): ``inferpool.dispatch {model}`` for each chunk of a traced job
it sends, in the job's trace; the chunk's task headers carry it on to the worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from inferpool.tracing.spans import context_from, traceparent, tracer
from inferpool.wire.tasks import TRACEPARENT_HEADER


@contextlib.contextmanager
def dispatch_span(parent: str, model: str, chunk_id: str, size: int) -> Iterator[dict[str, object] | None]:
    """Yields the headers for the chunk's task; None when its job is not traced or nothing collects spans here."""
    found = tracer() if parent else None
    context = context_from(parent) if found is not None else None
    if found is None or context is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str | int] = {
        "gen_ai.request.model": model,
        "inferpool.chunk.id": chunk_id,
        "inferpool.chunk.size": size,
    }
    with found.start_as_current_span(f"inferpool.dispatch {model}", context=context, kind=SpanKind.PRODUCER,
                                     attributes=attributes) as span:  # fmt: skip
        parent_of_chunk = traceparent(span)
        yield {TRACEPARENT_HEADER: parent_of_chunk} if parent_of_chunk else None
