"""A chunk's way through a worker as OpenTelemetry spans: the times are noted while it runs (a clock read per
phase) and made spans once its results are written, so tracing adds nothing before an answer is stored. The spans
go finished to the span processor ``install_tracing`` set up (``SpanSink``), following the sampling decision of
the trace they join (a trace its client did not sample gets none).

Single requests each get their own tree, in the trace their client's submit started (several travel in one
chunk); a batch job's chunk gets one tree in the job's trace (a span per chunk, not per line)::

    inferpool.queue_wait                     enqueued -> taken by this worker
    inferpool.process {model}                taken -> results written
    ├── inferpool.hooks.request, inferpool.cache ...    the steps that acted (``Step.span_name``)
    ├── {operation} {model}                  the engine or provider call (GenAI conventions, first-token event)
    └── inferpool.result_write
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from inferpool._exceptions import RequestError
from inferpool.tracing import genai
from inferpool.tracing.setup import SpanSink, span_sink
from inferpool.tracing.spans import span_context_of
from inferpool.wire import TaskChunk, TaskItem
from inferpool.workers.backend import Generation, Outcome

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Event
    from opentelemetry.trace import SpanContext, SpanKind

    from inferpool.workers.pipeline import ChunkWork


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class ChunkTimeline:
    """The times of one chunk's phases, and the spans they make."""

    def __init__(self, sink: SpanSink, chunk: TaskChunk, started: float) -> None:
        self._sink = sink
        self.chunk = chunk
        self.started_ns = _ns(started)
        self.phases: list[tuple[str, int, int]] = []
        self.generate: tuple[int, int] | None = None
        self.write: tuple[int, int] | None = None

    @classmethod
    def start(cls, chunk: TaskChunk, started: float) -> ChunkTimeline | None:
        """A timeline if the chunk belongs to a trace and this process exports spans; else None (no cost)."""
        if chunk.trace is None and not any(item.trace is not None for item in chunk.items):
            return None
        sink = span_sink()
        return None if sink is None else cls(sink, chunk, started)

    def phase(self, name: str, start_ns: int) -> None:
        """Note a phase that began at ``start_ns`` and ends now."""
        self.phases.append((name, start_ns, time.time_ns()))

    def emit(self, work: ChunkWork, *, backend: str, worker: str, written: int, capture_content: bool) -> None:
        """The spans: one tree per traced request, or one for the job's chunk."""
        end = time.time_ns()
        provider = genai.provider_name(backend)
        # Few attributes: every span and attribute is encoded and sent, for every request.
        common: dict[str, Any] = {"inferpool.worker": worker, "inferpool.chunk.id": self.chunk.chunk_id}
        job = span_context_of(self.chunk.trace)
        if job is not None:
            common.update({"inferpool.job.id": self.chunk.job_id or "", "inferpool.chunk.size": self.chunk.size,
                           "inferpool.results.written": written})  # fmt: skip
            self._tree(job, work, work.items, common, end, provider=provider, content=False)
            return
        for item in work.items:
            parent = span_context_of(item.trace)
            if parent is not None:
                self._tree(parent, work, [item], {**common, "inferpool.request.id": item.request_id}, end,
                           provider=provider, content=capture_content)  # fmt: skip

    @staticmethod
    def _child_of(parent: SpanContext) -> SpanContext:
        from opentelemetry.trace import SpanContext

        return SpanContext(parent.trace_id, random.getrandbits(64), is_remote=False, trace_flags=parent.trace_flags)

    def _span(self, name: str, parent: SpanContext, start: int, end: int, *, context: SpanContext | None = None,
              kind: SpanKind | None = None, attributes: dict[str, Any] | None = None, events: Sequence[Event] = (),
              error: str | None = None) -> None:  # fmt: skip
        """A finished span, child of ``parent``, handed to the span processor (``context``: its own, if its
        children needed it first)."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanKind, Status, StatusCode

        context = context or self._child_of(parent)
        status = Status(StatusCode.ERROR, error) if error is not None else Status(StatusCode.UNSET)
        self._sink.processor.on_end(ReadableSpan(
            name, context, parent, self._sink.resource, attributes or {}, events, kind=kind or SpanKind.INTERNAL,
            status=status, start_time=start, end_time=end, instrumentation_scope=self._sink.scope,
        ))  # fmt: skip

    def _tree(self, parent: SpanContext, work: ChunkWork, items: Sequence[TaskItem], attributes: dict[str, Any],
              end: int, *, provider: str, content: bool) -> None:  # fmt: skip
        from opentelemetry.sdk.trace import Event
        from opentelemetry.trace import SpanKind

        if not parent.trace_flags.sampled:  # the trace's root decided: not recorded
            return
        self._span("inferpool.queue_wait", parent, _ns(self.chunk.enqueued_at), self.started_ns)
        inside = self._child_of(parent)  # the process span's, which its children need before it is handed over
        for name, start, stop in self.phases:
            self._span(name, inside, start, stop)
        generated = [item for item in items if item.request_id in work.ran and item.request_id not in work.cached]
        if self.generate is not None and generated:
            outcomes = self._outcomes(work, generated)
            first = min((outcome.first_token_at for outcome in outcomes
                         if isinstance(outcome, Generation) and outcome.first_token_at is not None),
                        default=None)  # fmt: skip
            failed = outcomes[0] if all(isinstance(outcome, RequestError) for outcome in outcomes) else None
            self._span(genai.span_name(generated[0].request, self.chunk.model), inside, *self.generate,
                       kind=SpanKind.CLIENT, attributes=self._call_attributes(work, generated, provider, content),
                       events=() if first is None else (Event("gen_ai.first_token", timestamp=_ns(first)),),
                       error=failed.code if isinstance(failed, RequestError) else None)  # fmt: skip
        if self.write is not None:
            self._span("inferpool.result_write", inside, *self.write)
        cached = sum(1 for item in items if item.request_id in work.cached)
        if cached:
            attributes = {**attributes, "inferpool.cache.hits": cached}
        self._span(f"inferpool.process {self.chunk.model}", parent, self.started_ns, end, context=inside,
                   kind=SpanKind.CONSUMER, attributes=attributes)  # fmt: skip

    @staticmethod
    def _outcomes(work: ChunkWork, items: Sequence[TaskItem]) -> list[Outcome | None]:
        return [work.outcomes.get(item.request_id) for item in items]

    def _call_attributes(self, work: ChunkWork, items: Sequence[TaskItem], provider: str,
                         content: bool) -> dict[str, Any]:  # fmt: skip
        outcomes = self._outcomes(work, items)
        answered = [outcome for outcome in outcomes if outcome is not None and not isinstance(outcome, RequestError)]
        reasons: list[str] = [outcome.finish_reason for outcome in answered if isinstance(outcome, Generation)]
        attributes: dict[str, Any] = (
            genai.request_attributes(items[0].request, self.chunk.model)
            if len(items) == 1
            else {"gen_ai.operation.name": genai.operation(items[0].request), "gen_ai.request.model": self.chunk.model}
        )
        attributes["gen_ai.provider.name"] = provider
        attributes.update(genai.usage_attributes(sum(outcome.prompt_tokens for outcome in answered),
                                                 sum(outcome.completion_tokens for outcome in answered),
                                                 sorted(set(reasons)) if len(items) > 1 else reasons))  # fmt: skip
        errors = [outcome.code for outcome in outcomes if isinstance(outcome, RequestError)]
        if errors:
            attributes["error.type"] = errors[0] if len(items) == 1 else "some_requests_failed"
            attributes["inferpool.errors"] = len(errors)
        if len(items) > 1:
            attributes["inferpool.requests"] = len(items)
        if content and len(items) == 1:
            texts = [outcome.text for outcome in answered if isinstance(outcome, Generation)]
            attributes.update(genai.content_attributes(items[0].request, texts))
        return attributes
