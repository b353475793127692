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
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic_core
import redis
from celery import Celery

from inferpool._exceptions import InvalidRequest, ProviderError, RequestError
from inferpool.constants import (
    CANCELLED_CODE,
    DEFAULT_TENANT,
    EXPIRED_CODE,
    STREAM_CANCELLED_CODE,
    job_items_key,
    job_key,
    stream_cancel_key,
)
from inferpool.model_registry.capability import check_request_fits
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import BatchApiSpec, ModelSpec
from inferpool.plumbing.redis_connection import decode_text
from inferpool.plumbing.settings import Settings
from inferpool.state.heartbeats import beat, withdraw
from inferpool.state.items import held_by, item_from_record
from inferpool.state.results import ResultRecord, ResultWriter
from inferpool.state.streams import DeltaSink, bind_delta_sink, open_streams, unbind_delta_sink
from inferpool.wire import ChatRequest, JobStatus, TaskChunk, TaskItem, random_hex
from inferpool.workers.backend import Backend, ExtraChoice, Generation, GenerationOutcome
from inferpool.workers.cache import CachePlan, ResponseCache, cache_key, cache_scope, cache_ttl_s
from inferpool.workers.failures import FailurePolicy
from inferpool.workers.hooks import HookChain

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


@dataclass
class _Unanswered:
    """A chunk's requests to answer; ``stopped`` ends them all (their job was cancelled or expired), ``ended``
    some of them without running (a stored item this version cannot read, a request its client gave up on)."""

    items: list[TaskItem]
    stopped: RequestError | None = None
    ended: dict[str, RequestError] = field(default_factory=dict)


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


def _valid_usage(generation: Generation) -> bool:
    """Token counts a provider reported are non-negative integers (a compatible server may send anything)."""
    return _is_token_count(generation.prompt_tokens) and _is_token_count(generation.completion_tokens)


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
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.hooks = hooks or HookChain()
        self.cache = cache
        self.settings = settings
        self.worker_id = worker_id or default_worker_id(spec.name)
        self._redis = redis_client
        self._writer = ResultWriter(redis_client)
        self._failures = FailurePolicy(spec, registry, redis_client, celery, dead_letter_ttl_s=settings.result_ttl_s)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="backend-loop", daemon=True)
        self._loop_thread.start()
        self._stop = threading.Event()
        self._in_hand = 0  # requests being processed now (announced in the heartbeat)
        self._in_hand_lock = threading.Lock()
        self._heartbeat_thread: threading.Thread | None = None

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
        started = time.time()
        unanswered = (
            None if started > chunk.enqueued_at + chunk.result_ttl_s else self._unanswered(chunk, maybe_answered)
        )
        if unanswered is None:
            # Its results' retention (and maybe its job's) is over: whoever wanted the answers is gone, and a
            # result written now would count the requests a second time.
            log.warning("chunk %s outlived its results' retention; dropped unrun", chunk.describe())
            return ChunkReport(0, chunk.size, 0, 0)
        todo, stopped, ended = unanswered.items, unanswered.stopped, unanswered.ended
        skipped = chunk.size - len(todo)
        outcomes: dict[str, GenerationOutcome] = {}
        hook_s: dict[str, float] = {}
        runnable: list[TaskItem] = []
        arrived = {item.request_id: item for item in todo}  # before this model's hooks (a fallback runs its own)
        for index, item in enumerate(todo):
            if stopped is not None or item.request_id in ended:
                outcomes[item.request_id] = stopped or ended[item.request_id]
                continue
            if self.hooks.hooks:
                request, hook_s[item.request_id] = self.hooks.before(item.request)
                if isinstance(request, RequestError):
                    outcomes[item.request_id] = request
                    continue
                item = todo[index] = item.model_copy(update={"request": request})
            try:
                check_request_fits(self.spec, item.request)
            except RequestError as exc:
                outcomes[item.request_id] = exc
            else:
                runnable.append(item)
        streamed = [item.request_id for item in todo if item.request.stream and item.request_id not in ended]
        open_streams(self._redis, streamed, self.spec.name, chunk.result_ttl_s)
        cached = self._answer(runnable, chunk.result_ttl_s, outcomes)
        if self.hooks.hooks:
            self._after_hooks(runnable, outcomes, hook_s)
        moving = [(original, outcome, target) for item in runnable
                  if isinstance(outcome := outcomes[item.request_id], RequestError)
                  and (target := self._failures.fallback_for(original := arrived[item.request_id], outcome))
                  is not None]  # fmt: skip
        self._failures.forward(chunk, moving)
        moved = {item.request_id for item, _, _ in moving}
        todo = [item for item in todo if item.request_id not in moved]
        records = [self.result_record(chunk.job_id, chunk.enqueued_at, item, outcomes[item.request_id], started,
                                      hook_s.get(item.request_id), cached=item.request_id in cached)
                   for item in todo]  # fmt: skip
        flags = self._writer.write_records(chunk.job_id, self.spec.name, records, chunk.result_ttl_s)
        self._failures.dead_letter(chunk, todo, outcomes, flags)
        written = sum(flags)
        errors = sum(1 for record in records if not record.ok)
        report = ChunkReport(written, skipped, len(flags) - written, errors)
        log.info("chunk %s done: %s", chunk.describe(), report.as_dict())
        return report

    def _answer(self, items: Sequence[TaskItem], ttl_s: int, outcomes: dict[str, GenerationOutcome]) -> set[str]:
        """Put every item's outcome into ``outcomes``: from the response cache where the request may use it
        (see ``inferpool.workers.cache``), else from the backend. Returns the ids answered from the cache."""
        keys = {}
        if self.cache is not None:
            for item in items:
                cache_ttl = cache_ttl_s(self.spec, item.request, self.settings.result_ttl_s)
                if cache_ttl is not None:
                    keys[item.request_id] = (cache_key(item.request, cache_scope(self.spec, item.tenant)), cache_ttl)
        if self.cache is None or not keys:
            outcomes.update(self._generate(items, ttl_s))
            return set()
        plan = CachePlan(self.cache, keys, self.worker_id)
        now = plan.first_run()
        outcomes.update(self._generate([i for i in items if i.request_id not in keys or i.request_id in now], ttl_s))
        plan.store(outcomes, plan.mine)
        abandoned = plan.wait()
        if abandoned:
            late = {plan.leader[digest] for digest in abandoned}
            outcomes.update(self._generate([i for i in items if i.request_id in late], ttl_s))
            plan.store(outcomes, abandoned)
        return plan.fill(outcomes)

    def _after_hooks(self, items: Sequence[TaskItem], outcomes: dict[str, GenerationOutcome],
                     hook_s: dict[str, float]) -> None:  # fmt: skip
        """Answers through the hooks' ``after_result`` (an error stays as it is)."""
        for item in items:
            outcome = outcomes[item.request_id]
            if isinstance(outcome, Generation):
                outcomes[item.request_id], seconds = self.hooks.after(item.request, outcome)
                hook_s[item.request_id] = hook_s.get(item.request_id, 0.0) + seconds

    def _unanswered(self, chunk: TaskChunk, maybe_answered: bool) -> _Unanswered | None:
        """The chunk's requests still to answer; None if the chunk's job is gone.

        A chunk of refs reads its items from the job (one round trip, with the job's status): an item that
        is gone was answered or settled; one held by another model (a fallback) is that model's to serve.
        """
        if not chunk.refs or chunk.job_id is None:
            already = self._writer.existing([item.request_id for item in chunk.items]) if maybe_answered else set()
            todo = _Unanswered([item for item in chunk.items if item.request_id not in already])
            if chunk.job_id is None:
                todo.ended.update(self._abandoned(todo.items))
            return todo
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(job_key(chunk.job_id), "status")
        pipe.hmget(job_items_key(chunk.job_id), chunk.refs)
        status, records = pipe.execute()
        if status is None:
            return None
        todo = _Unanswered([], _stop_error(decode_text(status)))
        for request_id, record in zip(chunk.refs, records, strict=True):
            if record is None or not held_by(record, self.spec.name):
                continue
            try:
                todo.items.append(item_from_record(request_id, record))
            except ValueError as exc:  # a stored item this version cannot read: its own error, not the chunk's
                todo.ended[request_id] = InvalidRequest(f"the stored request cannot be read: {exc}")
                placeholder = ChatRequest.model_construct(model=self.spec.name, messages=[])
                todo.items.append(TaskItem.model_construct(request_id=request_id, request=placeholder))
        return todo

    def _abandoned(self, items: Sequence[TaskItem]) -> dict[str, RequestError]:
        """Single requests whose client gave up before they ran (the gateway's hang-up or timeout, a handle's
        ``stop``): they end as ``request_cancelled`` without running, so a backed-up queue never does work
        nobody reads."""
        if not items:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for item in items:
            pipe.exists(stream_cancel_key(item.request_id))
        error = RequestError("the client stopped waiting before this request ran; it was not run",
                             code=STREAM_CANCELLED_CODE)  # fmt: skip
        return {item.request_id: error for item, gone in zip(items, pipe.execute(), strict=True) if gone}

    def _generate(self, items: Sequence[TaskItem], ttl_s: int) -> dict[str, GenerationOutcome]:
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

    def _generate_alone(self, item: TaskItem, ttl_s: int) -> GenerationOutcome:
        try:
            return self._call_backend([item], ttl_s)[0]
        except Exception as exc:
            return self._backend_failure(item, exc)

    def _backend_failure(self, item: TaskItem, exc: Exception) -> ProviderError:
        """A backend bug must not lose the request: it gets an error (and the log the traceback)."""
        log.error("backend %s failed on request %s", self.backend.name, item.request_id, exc_info=exc)
        return ProviderError(f"backend {self.backend.name!r} failed: {type(exc).__name__}: {exc}")

    def _call_backend(self, items: Sequence[TaskItem], ttl_s: int) -> list[GenerationOutcome]:
        """One backend call for the requests nobody streams, and one per streamed request (with its sink)."""
        # A model whose hooks rewrite answers shows only the stored answer: no deltas before it.
        may_stream = not self.hooks.rewrites_answers
        plain = [item for item in items if not (item.request.stream and may_stream)]
        streamed = [item for item in items if item.request.stream and may_stream]

        async def run() -> list[list[GenerationOutcome]]:
            calls = [self._generate_streamed(item, ttl_s) for item in streamed]
            if plain:
                calls.append(self.backend.generate([item.request for item in plain]))
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

    async def _generate_streamed(self, item: TaskItem, ttl_s: int) -> list[GenerationOutcome]:
        sink = DeltaSink(self._redis, item.request_id, ttl_s)
        token = bind_delta_sink(sink)
        try:
            generated = await self.backend.generate([item.request])
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

    def result_record(self, job_id: str | None, enqueued_at: float, item: TaskItem, outcome: GenerationOutcome,
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
            payload = pydantic_core.to_json(data)
            return ResultRecord(item.request_id, False, 0, 0, 0.0, measured, payload, tenant, outcome.attempts)
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
        data["response"] = self._completion(outcome, int(now))
        payload = pydantic_core.to_json(data)
        return ResultRecord(item.request_id, True, outcome.prompt_tokens, outcome.completion_tokens, cost, measured,
                            payload, tenant, outcome.attempts, ttft, cached, saved)  # fmt: skip

    def write_records(self, job_id: str, records: Sequence[ResultRecord], ttl_s: int) -> list[bool]:
        """Store results of this model's requests of ``job_id``, each once (see ``ResultWriter``)."""
        return self._writer.write_records(job_id, self.spec.name, records, ttl_s)

    def run_on_backend_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the backend's event loop (where its SDK clients live) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

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
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "total_tokens": generation.prompt_tokens + generation.completion_tokens,
            },
        }

    # -- heartbeat and shutdown ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Announce this worker in Redis until ``close``; the key expires by itself if the process dies."""
        if self._heartbeat_thread is not None:
            return
        self._beat()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def _beat(self) -> None:
        payload = json.dumps(
            {
                "worker_id": self.worker_id,
                "model": self.spec.name,
                "backend": self.backend.name,
                "pid": os.getpid(),
                "concurrency": self.spec.serving.concurrency,
                "in_hand": self._in_hand,
                "at": time.time(),
            }
        )
        beat(self._redis, self.spec.name, self.worker_id, self.settings.heartbeat_ttl_s, payload)

    def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_ttl_s / 3
        while not self._stop.wait(interval):
            try:
                self._beat()
            except redis.RedisError as exc:  # Redis restarting: keep trying, the key just lapses meanwhile
                log.warning("heartbeat failed: %s", exc)

    def close(self) -> None:
        """Stop the heartbeat, remove it, and release the backend."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            withdraw(self._redis, self.spec.name, self.worker_id)
        asyncio.run_coroutine_threadsafe(self.backend.aclose(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=10)
