"""A chunk's way through a worker as OpenTelemetry spans: the times are noted while it runs (a clock read per
phase) and made spans once its results are written, so tracing adds nothing before an answer is stored.

Single requests each get their own tree, in the trace their client's submit started (several travel in one
chunk); a batch job's chunk gets one tree in the job's trace (a span per chunk, not per line)::

    inferpool.queue_wait                     enqueued -> taken by this worker
    inferpool.process {model}                taken -> results written
    ├── inferpool.hooks.request, inferpool.cache ...    the steps that acted (``Step.span_name``)
    ├── {operation} {model}                  the engine or provider call (GenAI conventions, first-token event)
    └── inferpool.result_write
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from inferpool._exceptions import RequestError
from inferpool.tracing import genai
from inferpool.tracing.spans import context_from, tracer
from inferpool.wire import TaskChunk, TaskItem
from inferpool.workers.backend import Generation, Outcome

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer

    from inferpool.workers.pipeline import ChunkWork


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class ChunkTimeline:
    """The times of one chunk's phases, and the spans they make."""

    def __init__(self, tracer_: Tracer, chunk: TaskChunk, started: float) -> None:
        self._tracer = tracer_
        self.chunk = chunk
        self.started_ns = _ns(started)
        self.phases: list[tuple[str, int, int]] = []
        self.generate: tuple[int, int] | None = None
        self.write: tuple[int, int] | None = None

    @classmethod
    def start(cls, chunk: TaskChunk, started: float) -> ChunkTimeline | None:
        """A timeline if the chunk belongs to a trace and spans are collected here; else None (no cost)."""
        if chunk.trace is None and not any(item.trace is not None for item in chunk.items):
            return None
        found = tracer()
        return None if found is None else cls(found, chunk, started)

    def phase(self, name: str, start_ns: int) -> None:
        """Note a phase that began at ``start_ns`` and ends now."""
        self.phases.append((name, start_ns, time.time_ns()))

    def emit(self, work: ChunkWork, *, backend: str, worker: str, written: int, capture_content: bool) -> None:
        """The spans: one tree per traced request, or one for the job's chunk."""
        end = time.time_ns()
        common: dict[str, Any] = {
            "inferpool.worker": worker,
            "inferpool.chunk.id": self.chunk.chunk_id,
            "inferpool.chunk.size": self.chunk.size,
            "gen_ai.provider.name": genai.provider_name(backend),
        }
        job_context = context_from(self.chunk.trace)
        if job_context is not None:
            common["inferpool.job.id"] = self.chunk.job_id or ""
            self._tree(job_context, work, work.items, common, end, written=written, content=False)
            return
        for item in work.items:
            context = context_from(item.trace)
            if context is not None:
                self._tree(context, work, [item], {**common, "inferpool.request.id": item.request_id}, end,
                           written=int(item.request_id not in work.forwarded), content=capture_content)  # fmt: skip

    def _tree(self, parent: Context, work: ChunkWork, items: Sequence[TaskItem], attributes: dict[str, Any],
              end: int, *, written: int, content: bool) -> None:  # fmt: skip
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        model = self.chunk.model
        queued = self._tracer.start_span("inferpool.queue_wait", context=parent, start_time=_ns(self.chunk.enqueued_at))
        queued.end(self.started_ns)
        root = self._tracer.start_span(f"inferpool.process {model}", context=parent, kind=SpanKind.CONSUMER,
                                       start_time=self.started_ns, attributes=attributes)  # fmt: skip
        inside = trace.set_span_in_context(root)
        for name, start, stop in self.phases:
            self._tracer.start_span(name, context=inside, start_time=start).end(stop)
        generated = [item for item in items if item.request_id in work.ran and item.request_id not in work.cached]
        if self.generate is not None and generated:
            call = self._tracer.start_span(
                genai.span_name(generated[0].request, model), context=inside, kind=SpanKind.CLIENT,
                start_time=self.generate[0], attributes=self._call_attributes(work, generated, content),
            )  # fmt: skip
            first = min((outcome.first_token_at for outcome in self._outcomes(work, generated)
                         if isinstance(outcome, Generation) and outcome.first_token_at is not None),
                        default=None)  # fmt: skip
            if first is not None:
                call.add_event("gen_ai.first_token", timestamp=_ns(first))
            outcomes = self._outcomes(work, generated)
            if all(isinstance(outcome, RequestError) for outcome in outcomes):  # nothing answered
                failed = outcomes[0]
                call.set_status(Status(StatusCode.ERROR, failed.code if isinstance(failed, RequestError) else None))
            call.end(self.generate[1])
        if self.write is not None:
            self._tracer.start_span("inferpool.result_write", context=inside, start_time=self.write[0],
                                    attributes={"inferpool.results.written": written}).end(self.write[1])  # fmt: skip
        cached = sum(1 for item in items if item.request_id in work.cached)
        if cached:
            root.set_attribute("inferpool.cache.hits", cached)
        root.end(end)

    @staticmethod
    def _outcomes(work: ChunkWork, items: Sequence[TaskItem]) -> list[Outcome | None]:
        return [work.outcomes.get(item.request_id) for item in items]

    def _call_attributes(self, work: ChunkWork, items: Sequence[TaskItem], content: bool) -> dict[str, Any]:
        outcomes = self._outcomes(work, items)
        answered = [outcome for outcome in outcomes if outcome is not None and not isinstance(outcome, RequestError)]
        reasons: list[str] = [outcome.finish_reason for outcome in answered if isinstance(outcome, Generation)]
        attributes: dict[str, Any] = (
            genai.request_attributes(items[0].request, self.chunk.model)
            if len(items) == 1
            else {"gen_ai.operation.name": genai.operation(items[0].request), "gen_ai.request.model": self.chunk.model}
        )
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
