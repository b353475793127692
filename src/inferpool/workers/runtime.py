"""One worker process's state: its model's backend, an event loop that feeds it, and its heartbeat.

Celery task threads hand chunks to ``WorkerRuntime.process_chunk``; the backend's coroutines run on
one event loop in a background thread, so many chunks can be in flight in one backend at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic_core
import redis
from celery import Celery

from inferpool._exceptions import InvalidRequest, ProviderError, RequestError
from inferpool.constants import (
    BUDGET_EXCEEDED_CODE,
    CANCELLED_CODE,
    DEFAULT_TENANT,
    EXPIRED_CODE,
    STREAM_CANCELLED_CODE,
    job_items_key,
    job_key,
)
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import BatchApiSpec, ModelSpec
from inferpool.plumbing.redis_connection import decode_text
from inferpool.plumbing.settings import Settings
from inferpool.state.availability import mark_unavailable, publish_availability
from inferpool.state.heartbeats import beat, withdraw
from inferpool.state.items import held_by, item_from_record
from inferpool.state.results import ResultRecord, ResultWriter
from inferpool.state.streams import DeltaSink, bind_delta_sink, unbind_delta_sink
from inferpool.state.worker_queues import WorkerQueues
from inferpool.wire import ChatRequest, CompletionRequest, EmbeddingRequest, JobStatus, TaskChunk, TaskItem, random_hex
from inferpool.workers import kinds
from inferpool.workers.backend import Backend, Embeddings, ExtraChoice, Generation, Outcome, prefix_cache_stats
from inferpool.workers.cache import ResponseCache
from inferpool.workers.detection import OwnDetection
from inferpool.workers.failures import FailurePolicy
from inferpool.workers.hooks import HookChain
from inferpool.workers.pipeline import ChunkWork, Step, default_steps
from inferpool.workers.tracing import ChunkTimeline

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class ChunkReport:
    """What one ``process_chunk`` call did; returned to Celery (JSON) for Flower and logs."""

    written: int
    skipped_existing: int
    duplicates_ignored: int
    errors: int

    def as_dict(self) -> dict[str, int]:
        return {
            "written": self.written,
            "skipped_existing": self.skipped_existing,
            "duplicates_ignored": self.duplicates_ignored,
            "errors": self.errors,
        }


def default_worker_id(model_name: str) -> str:
    return f"{model_name}@{socket.gethostname()}-{os.getpid()}"


def _stop_error(status: str) -> RequestError | None:
    """The error for requests of a job with this status, if it was cancelled or expired."""
    if status in (JobStatus.CANCELLING.value, JobStatus.CANCELLED.value):
        return RequestError("the batch was cancelled before this request ran", code=CANCELLED_CODE)
    if status == JobStatus.EXPIRED.value:
        return RequestError("the batch's completion window ended before this request ran", code=EXPIRED_CODE)
    return None


def _message(choice: Generation | ExtraChoice) -> dict[str, object]:
    """The choice's assistant message; a model's tool calls come with it (content may then be null)."""
    if isinstance(choice, Generation) and choice.tool_calls:
        return {"role": "assistant", "content": choice.text or None, "tool_calls": list(choice.tool_calls)}
    return {"role": "assistant", "content": choice.text}


def _is_token_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_usage(generation: Generation | Embeddings) -> bool:
    """Token counts a provider reported are non-negative integers (a compatible server may send anything)."""
    return _is_token_count(generation.prompt_tokens) and _is_token_count(generation.completion_tokens)


#: Errors of requests stopped before an answer: their time is not a latency ("fastest" routing, the histograms).
_NOT_ANSWERED_CODES = frozenset({STREAM_CANCELLED_CODE, CANCELLED_CODE, EXPIRED_CODE, BUDGET_EXCEEDED_CODE})


class WorkerRuntime:
    """Serves one model in this process."""

    def __init__(
        self,
        spec: ModelSpec,
        backend: Backend,
        redis_client: redis.Redis,
        settings: Settings,
        worker_id: str | None = None,
        *,
        registry: Registry | None = None,
        celery: Celery | None = None,
        hooks: HookChain | None = None,
        cache: ResponseCache | None = None,
        steps: Sequence[Step] | None = None,
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.hooks = hooks or HookChain()
        self.cache = cache
        self.steps = list(steps) if steps is not None else default_steps()
        self.settings = settings
        self.worker_id = worker_id or default_worker_id(spec.name)
        self.redis = redis_client
        self._writer = ResultWriter(redis_client)
        self.failures = FailurePolicy(spec, registry, redis_client, celery, dead_letter_ttl_s=settings.result_ttl_s)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="backend-loop", daemon=True)
        self._loop_thread.start()
        self._stop = threading.Event()
        self._in_hand = 0  # requests being processed now (announced in the heartbeat)
        self._in_hand_lock = threading.Lock()
        self._heartbeat_thread: threading.Thread | None = None
        self.detection = OwnDetection(spec, settings, lambda: self.backend, on_change=self._availability_changed)

    # -- processing ------------------------------------------------------------------------------------

    def process_chunk(self, chunk: TaskChunk, *, maybe_answered: bool = True) -> ChunkReport:
        """Answer every request of ``chunk`` that has no result yet, and write each result once.

        Requests of a batch job that was cancelled or expired meanwhile are settled with that error
        instead of being run. ``maybe_answered=False`` (a chunk's first delivery, never sent before)
        skips looking results up before running: none can exist, and the write is exactly-once anyway.
        """
        with self._in_hand_lock:
            self._in_hand += chunk.size
        try:
            return self._process(chunk, maybe_answered or chunk.resent)
        finally:
            with self._in_hand_lock:
                self._in_hand -= chunk.size

    def _process(self, chunk: TaskChunk, maybe_answered: bool) -> ChunkReport:
        """The chunk through the steps (``inferpool.workers.pipeline``), the backend and the result write."""
        started = time.time()
        work = None if started > chunk.enqueued_at + chunk.result_ttl_s else self._unanswered(chunk, maybe_answered)
        if work is None:
            # Its results' retention (and maybe its job's) is over: whoever wanted the answers is gone, and a
            # result written now would count the requests a second time.
            log.warning("chunk %s outlived its results' retention; dropped unrun", chunk.describe())
            return ChunkReport(0, chunk.size, 0, 0)
        skipped = chunk.size - len(work.items)
        timeline = ChunkTimeline.start(chunk, started)  # None unless the chunk is traced and spans are collected
        self._run_steps("before_generate", work, timeline, lambda step: step.before_generate(self, work))
        work.ran = {item.request_id for item in work.undecided()}
        begun = time.time_ns()
        work.outcomes.update(self._generate(work.to_generate(), chunk.result_ttl_s))
        if timeline is not None:
            timeline.generate = (begun, time.time_ns())

        def generate(items: Sequence[TaskItem]) -> dict[str, Outcome]:
            return self._generate(items, chunk.result_ttl_s)

        self._run_steps("after_generate", work, timeline, lambda step: step.after_generate(self, work, generate))
        to_write = work.to_write()
        records = [self.result_record(chunk.job_id, chunk.enqueued_at, item, work.outcomes[item.request_id], started,
                                      work.hooks_s.get(item.request_id), cached=item.request_id in work.cached)
                   for item in to_write]  # fmt: skip
        begun = time.time_ns()
        flags = self._writer.write_records(chunk.job_id, self.spec.name, records, chunk.result_ttl_s)
        if timeline is not None:
            timeline.write = (begun, time.time_ns())
        for step in self.steps:
            step.after_write(self, work, flags)
        written = sum(flags)
        errors = sum(1 for record in records if not record.ok)
        report = ChunkReport(written, skipped, len(flags) - written, errors)
        log.info("chunk %s done: %s", chunk.describe(), report.as_dict())
        if timeline is not None:
            self._emit_spans(timeline, work, written)
        return report

    def _run_steps(self, phase: str, work: ChunkWork, timeline: ChunkTimeline | None,
                   run: Callable[[Step], None]) -> None:  # fmt: skip
        """Run one hook of every step, noting on ``timeline`` the time of those that acted."""
        for step in self.steps:
            begun = time.time_ns() if timeline is not None else 0
            run(step)
            if timeline is not None and (name := step.span_name(self, work, phase)) is not None:
                timeline.phase(name, begun)

    def _emit_spans(self, timeline: ChunkTimeline, work: ChunkWork, written: int) -> None:
        # After the results are stored: a tracing failure costs the trace, never an answer or a retry.
        try:
            timeline.emit(work, backend=self.backend.name, worker=self.worker_id, written=written,
                          capture_content=self.settings.tracing.capture_content)  # fmt: skip
        except Exception:
            log.warning("could not record the spans of chunk %s", work.chunk.describe(), exc_info=True)

    def _unanswered(self, chunk: TaskChunk, maybe_answered: bool) -> ChunkWork | None:
        """The chunk's requests still to answer; None if the chunk's job is gone.

        A chunk of refs reads its items from the job (one round trip, with the job's status): an item that
        is gone was answered or settled; one held by another model (a fallback) is that model's to serve.
        """
        if not chunk.refs or chunk.job_id is None:
            already = self._writer.existing([item.request_id for item in chunk.items]) if maybe_answered else set()
            return ChunkWork(chunk, [item for item in chunk.items if item.request_id not in already])
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(job_key(chunk.job_id), "status")
        pipe.hmget(job_items_key(chunk.job_id), chunk.refs)
        status, records = pipe.execute()
        if status is None:
            return None
        items: list[TaskItem] = []
        ended: dict[str, RequestError] = {}
        for request_id, record in zip(chunk.refs, records, strict=True):
            if record is None or not held_by(record, self.spec.name):
                continue
            try:
                items.append(item_from_record(request_id, record))
            except ValueError as exc:  # a stored item this version cannot read: its own error, not the chunk's
                ended[request_id] = InvalidRequest(f"the stored request cannot be read: {exc}")
                placeholder = ChatRequest.model_construct(model=self.spec.name, messages=[])
                items.append(TaskItem.model_construct(request_id=request_id, request=placeholder))
        return ChunkWork(chunk, items, _stop_error(decode_text(status)), ended)

    def _generate(self, items: Sequence[TaskItem], ttl_s: int) -> dict[str, Outcome]:
        """Each item's outcome. If the backend fails the whole call, each request is tried again on its
        own, so one request's failure never fails its chunk-mates."""
        if not items:
            return {}
        try:
            generated = self._call_backend(items, ttl_s)
        except Exception as exc:
            if len(items) == 1:
                return {items[0].request_id: self._backend_failure(items[0], exc)}
            log.warning("backend %s failed on %d requests (%s: %s); trying them one by one", self.backend.name,
                        len(items), type(exc).__name__, exc)  # fmt: skip
            return {item.request_id: self._generate_alone(item, ttl_s) for item in items}
        return {item.request_id: outcome for item, outcome in zip(items, generated, strict=True)}

    def _generate_alone(self, item: TaskItem, ttl_s: int) -> Outcome:
        try:
            return self._call_backend([item], ttl_s)[0]
        except Exception as exc:
            return self._backend_failure(item, exc)

    def _backend_failure(self, item: TaskItem, exc: Exception) -> ProviderError:
        """A backend bug must not lose the request: it gets an error (and the log the traceback)."""
        log.error("backend %s failed on request %s", self.backend.name, item.request_id, exc_info=exc)
        return ProviderError(f"backend {self.backend.name!r} failed: {type(exc).__name__}: {exc}")

    def _call_backend(self, items: Sequence[TaskItem], ttl_s: int) -> list[Outcome]:
        """One backend call for the requests nobody streams, and one per streamed request (with its sink)."""
        # A model whose hooks rewrite answers shows only the stored answer: no deltas before it.
        may_stream = not self.hooks.rewrites_answers
        plain = [item for item in items if not (item.request.stream and may_stream)]
        streamed = [item for item in items if item.request.stream and may_stream]

        async def run() -> list[list[Outcome]]:
            calls = [self._generate_streamed(item, ttl_s) for item in streamed]
            if plain:
                calls.append(kinds.answer(self.backend, [item.request for item in plain]))
            return await asyncio.gather(*calls)

        replies = asyncio.run_coroutine_threadsafe(run(), self._loop).result()
        for reply, size in zip(replies, [1] * len(streamed) + ([len(plain)] if plain else []), strict=True):
            if len(reply) != size:
                raise ProviderError(f"backend {self.backend.name!r} returned {len(reply)} answers for {size}")
        if not streamed:  # the batch path: the answers are already in the items' order
            return list(replies[-1])
        answers = {item.request_id: reply[0] for item, reply in zip(streamed, replies, strict=False)}
        if plain:
            answers.update((item.request_id, outcome) for item, outcome in zip(plain, replies[-1], strict=True))
        return [answers[item.request_id] for item in items]

    async def _generate_streamed(self, item: TaskItem, ttl_s: int) -> list[Outcome]:
        sink = DeltaSink(self.redis, item.request_id, ttl_s)
        token = bind_delta_sink(sink)
        try:
            generated = await kinds.answer(self.backend, [item.request])
        finally:
            unbind_delta_sink(token)
            await sink.drain()
        if sink.cancelled and generated and not isinstance(generated[0], RequestError):
            return [RequestError("the client stopped reading the stream; generation was stopped",
                                 code=STREAM_CANCELLED_CODE, attempts=generated[0].attempts)]  # fmt: skip
        return generated

    # A result is built as a dict and serialised by ``pydantic_core.to_json``, not through the pydantic models: on a
    # 500-request echo chunk, validating results cost as much as everything else together. The client
    # validates every result it reads (``RequestResult``), and the tests read them all.

    def result_record(self, job_id: str | None, enqueued_at: float, item: TaskItem, outcome: Outcome,
                      started: float, hooks_s: float | None = None, *, cached: bool = False,
                      provider_batch: bool = False) -> ResultRecord:  # fmt: skip
        """The stored result of ``item``. ``provider_batch``: answered through the provider's Batch API (its
        batch price; its turnaround is the result's latency_s but stays out of the latency histograms)."""
        now = time.time()
        latency = max(0.0, now - started)
        stats: dict[str, object] = {
            "model": self.spec.name,
            "backend": self.backend.name,
            "worker": self.worker_id,
            "queued_s": max(0.0, started - enqueued_at),
            "latency_s": latency,
            "attempts": outcome.attempts,
            "cost_usd": 0.0,
        }
        if hooks_s is not None:
            stats["hooks_s"] = hooks_s
        if provider_batch:
            stats["via"] = "provider-batch"
        tenant = item.tenant or DEFAULT_TENANT
        data: dict[str, object] = {"request_id": item.request_id, "custom_id": item.custom_id,
                                   "job_id": job_id, "tenant": tenant, "stats": stats}  # fmt: skip
        measured = None if provider_batch else latency
        if item.warnings:
            data["warnings"] = item.warnings
        if not isinstance(outcome, RequestError) and not _valid_usage(outcome):
            counts = f"prompt_tokens={outcome.prompt_tokens!r}, completion_tokens={outcome.completion_tokens!r}"
            outcome = ProviderError(f"backend {self.backend.name!r} reported malformed usage ({counts})",
                                    attempts=outcome.attempts)  # fmt: skip
        if isinstance(outcome, RequestError):
            data["error"] = {"code": outcome.code, "message": outcome.message}
            if outcome.code in _NOT_ANSWERED_CODES:  # no answer was timed: it must not make the model look fast
                measured = None
            payload = pydantic_core.to_json(data)
            return ResultRecord(item.request_id, False, 0, 0, 0.0, measured, payload, tenant, outcome.attempts,
                                reply_to=item.reply_to or "")  # fmt: skip
        pricing = self.spec.pricing
        if provider_batch:
            pricing = (self.spec.batch_api or BatchApiSpec()).price(pricing)
        cost = pricing.cost(outcome.prompt_tokens, outcome.completion_tokens)
        saved = 0.0
        if cached:  # tokens are recorded as they were; the answer cost nothing this time
            stats["cached"] = True
            cost, saved = 0.0, cost
        stats["cost_usd"] = cost
        ttft = None if outcome.first_token_at is None else min(latency, max(0.0, outcome.first_token_at - started))
        if ttft is not None:
            stats["ttft_s"] = ttft
        data["response"] = self._response(item, outcome, int(now))
        payload = pydantic_core.to_json(data)
        return ResultRecord(item.request_id, True, outcome.prompt_tokens, outcome.completion_tokens, cost, measured,
                            payload, tenant, outcome.attempts, ttft, cached, saved,
                            outcome.cached_prompt_tokens or 0, item.reply_to or "")  # fmt: skip

    def write_records(self, job_id: str, records: Sequence[ResultRecord], ttl_s: int) -> list[bool]:
        """Store results of this model's requests of ``job_id``, each once (see ``ResultWriter``)."""
        return self._writer.write_records(job_id, self.spec.name, records, ttl_s)

    def run_on_backend_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the backend's event loop (where its SDK clients live) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _response(self, item: TaskItem, outcome: Generation | Embeddings, created: int) -> dict[str, object]:
        """The OpenAI response object of the request's kind."""
        request = item.request
        if isinstance(outcome, Embeddings):
            fmt = request.encoding_format if isinstance(request, EmbeddingRequest) else "float"
            return kinds.embeddings_response(outcome, self.spec.name, fmt)
        if isinstance(request, CompletionRequest):
            response = kinds.completion_response(outcome, self.spec.name, created, f"cmpl-{random_hex()}")
            response["usage"] = self._usage(outcome)
            return response
        return self._completion(outcome, created)

    def _completion(self, generation: Generation, created: int) -> dict[str, object]:
        choices: tuple[Generation | ExtraChoice, ...] = (generation, *generation.extra_choices)
        return {
            "id": f"chatcmpl-{random_hex()}",
            "object": "chat.completion",
            "created": created,
            "model": self.spec.name,
            "choices": [
                {
                    "index": index,
                    "message": _message(choice),
                    "finish_reason": choice.finish_reason,
                    "logprobs": choice.logprobs,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": self._usage(generation),
        }

    @staticmethod
    def _usage(generation: Generation | Embeddings) -> dict[str, object]:
        usage: dict[str, object] = {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }
        if generation.cached_prompt_tokens is not None:  # OpenAI's field for prompt tokens served from cache
            usage["prompt_tokens_details"] = {"cached_tokens": generation.cached_prompt_tokens}
        return usage

    # -- heartbeat and shutdown ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Announce this worker in Redis until ``close``; the key expires by itself if the process dies."""
        if self._heartbeat_thread is not None:
            return
        self._beat()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()
        self.detection.start()

    def _availability_changed(self, available: bool) -> None:
        """The provider says the model exists again, or no longer: join routing again, or leave it now."""
        if self._stop.is_set():
            return
        try:
            publish_availability(self.redis, self.spec.name, self.worker_id, available)
            self._beat()
        except redis.RedisError as exc:
            log.warning("could not publish model %s's availability: %s", self.spec.name, exc)

    def _beat(self) -> None:
        if not self.detection.available:  # out of routing: only the record of why is renewed
            record = self.detection.unavailable_record()
            mark_unavailable(self.redis, self.spec.name, record, self.settings.heartbeat_ttl_s * 3)
            return
        beat_fields: dict[str, object] = {
            "worker_id": self.worker_id,
            "model": self.spec.name,
            "backend": self.backend.name,
            "pid": os.getpid(),
            "concurrency": self.spec.serving.concurrency,
            "in_hand": self._in_hand,
            "at": time.time(),
        }
        stats = prefix_cache_stats(self.backend)
        if stats is not None:
            beat_fields["prefix_cache"] = stats.model_dump()
        beat_fields.update(self.detection.beat_fields())
        grace = self.settings.gone_worker_grace_s()
        beat(self.redis, self.spec.name, self.worker_id, self.settings.heartbeat_ttl_s, json.dumps(beat_fields), grace,
             self.detection.window())  # fmt: skip

    def drain(self) -> None:
        """Stop being routed to (the worker is shutting down): the heartbeat ends now, while the chunks in
        hand finish; what waits in its own queues is handed over by ``close`` (and by the scheduler)."""
        self._stop.set()
        self.detection.stop()
        with contextlib.suppress(redis.RedisError):
            withdraw(self.redis, self.spec.name, self.worker_id)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ttl_s / 3
        queues = WorkerQueues(self.redis)
        while not self._stop.wait(interval):
            try:
                self._beat()
                # Work left in the own queues of peers that died (SIGKILL, a lost host) is taken over here.
                if self.detection.available:
                    queues.hand_over_gone(self.spec.name)
            except redis.RedisError as exc:  # Redis restarting: keep trying, the key just lapses meanwhile
                log.warning("heartbeat failed: %s", exc)

    def close(self) -> None:
        """Stop the heartbeat, end it, hand what waits in this worker's own queues to the shared ones, and
        release the backend."""
        self.drain()
        with contextlib.suppress(redis.RedisError):
            moved = WorkerQueues(self.redis).hand_over(self.spec.name, [self.worker_id])
            if moved:
                log.info("worker %s handed %d waiting chunk(s) to the shared queues", self.worker_id, moved)
        self.release()

    def release(self) -> None:
        """Release the backend (its model's memory) and the loop that fed it; the heartbeat, if any, is the
        caller's to end (a worker holding several models unloads one while it goes on serving the rest)."""
        asyncio.run_coroutine_threadsafe(self.backend.aclose(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
