"""``Client`` and ``AsyncClient``: submit requests to the pool and get results back through Redis.

Both share ``ClientBase`` (routing, task building); they differ only in how they talk to Redis.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, overload

import anyio
import redis
import redis.asyncio

from inferpool._exceptions import InvalidRequest, ResultTimeout
from inferpool.client._base import (
    ClientBase,
    MessagesLike,
    RequestLike,
    build_chat_request,
    build_request,
)
from inferpool.client.batches import AsyncBatches, Batches
from inferpool.client.budget import BudgetGate
from inferpool.client.chains import (
    ChainResult,
    ChainSteps,
    run_chain,
    run_chain_async,
    stream_chain,
    stream_chain_async,
)
from inferpool.client.coalesce import Coalescer
from inferpool.client.handles import AnswerT, AsyncResultHandle, ResultHandle, completion_or_raise, expect
from inferpool.client.pipelines import AsyncPipelines, Pipelines
from inferpool.client.replies import Replies
from inferpool.client.routing import Route
from inferpool.client.tracing import call_span, submit_span, traceparent
from inferpool.constants import Priority, result_key, result_notify_key, stream_key
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.publisher import ChunkPublisher
from inferpool.plumbing.redis_connection import (
    async_redis_from_url,
    connect_redis,
    connect_redis_async,
    redis_from_url,
)
from inferpool.plumbing.settings import Settings
from inferpool.state.dead_letters import DeadLetters, retry_lines
from inferpool.state.results import parse_result
from inferpool.state.streams import READ_SLICE_S, StreamAssembler
from inferpool.state.usage import read_usage
from inferpool.wire import (
    AnyRequest,
    BatchJob,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ModelUsage,
    RequestResult,
    as_completion_chunk,
)

PromptLike = str | list[str]
EmbeddingInput = str | list[str] | list[int] | list[list[int]]

#: Longest single blocking wait; waiters re-check the result key at least this often.
_WAIT_SLICE_S = 1.0


def _completion_body(model: str, prompt: PromptLike, stream: bool, params: dict[str, Any]) -> AnyRequest:
    return build_request({"model": model, "prompt": prompt, **params, **({"stream": True} if stream else {})},
                         CompletionRequest)  # fmt: skip


def _embedding_body(model: str, inputs: EmbeddingInput, params: dict[str, Any]) -> AnyRequest:
    return build_request({"model": model, "input": inputs, **params}, EmbeddingRequest)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _timeout_error(request_id: str, timeout: float | None) -> ResultTimeout:
    return ResultTimeout(
        f"no result for request {request_id} after {timeout} s; it may still be queued "
        "(are workers running for its model?); wait again with the same handle"
    )


def _read_slice(deadline: float | None, request_id: str, timeout: float | None) -> int:
    """Milliseconds the next blocking stream read may last; ``ResultTimeout`` once the deadline passed."""
    remaining = _remaining(deadline)
    if remaining is not None and remaining <= 0:
        raise _timeout_error(request_id, timeout)
    block = READ_SLICE_S if remaining is None else min(remaining, READ_SLICE_S)
    return max(1, int(block * 1000))


def _streamed_result(request_id: str, raw: bytes | str | None) -> RequestResult:
    if raw is None:  # its stream ended, so it was written: the retention must have run out meanwhile
        raise ResultTimeout(f"the result of request {request_id} is gone (its retention ended)")
    return parse_result(raw)


class Client(ClientBase):
    """Synchronous client. ``redis_url`` defaults to ``REDIS_URL``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        registry: Registry | None = None,
        tenant: str | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(redis_url, settings, registry, tenant)
        self.redis: redis.Redis = connect_redis(self.redis_url)
        self.publisher = ChunkPublisher(self.redis)
        self.use_key(self.redis, api_key)
        self.attach_live_view(self.redis)
        self.batches = Batches(self.redis, self.settings, self.router, self.tenant_for, self.key_gate)
        self.pipelines = Pipelines(self.redis, self.batches, self.router, self.settings.result_ttl_s)
        self.dead_letters = DeadLetters(self.redis, self.settings.result_ttl_s)
        self.budget_gate = BudgetGate(self.registry, self.redis, self.settings.result_ttl_s)

    def submit(
        self,
        request: RequestLike,
        *,
        custom_id: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        tenant: str | None = None,
        route: Route | None = None,
        key_id: str | None = None,
    ) -> ResultHandle:
        """Queue one request and return at once. Raises ``InvalidRequest``/``ModelNotFound`` before queueing,
        and ``BudgetExceeded`` when the most it can cost does not fit its tenant's (or ``key_id``'s) budget.

        ``priority`` (high, normal, low) picks the model's queue; workers always take high first, and
        batch jobs run at low. ``tenant`` counts this request's usage for another tenant than the client's.
        ``route`` is ``client.route(request)`` when the caller has already routed it.
        """
        with submit_span() as span:
            chunk = self.single_chunk(request, custom_id, priority, tenant, route)
            chunk.items[0].traced(traceparent(span))
            if self.key_gate is not None:
                self.key_gate.admit(chunk.items[0].request, self.registry.get(chunk.model))
            self.budget_gate.reserve(chunk, key_id or self.key_id())
            try:
                self.publish(chunk)
            except BaseException:
                self.budget_gate.release(chunk)
                raise
        return ResultHandle(self, chunk.items[0].request_id)

    def _call(self, request: AnyRequest, kind: type[AnswerT], timeout: float | None,
              priority: Priority | str) -> AnswerT:  # fmt: skip
        """Submit ``request`` and wait for its answer, of type ``kind``, in a span of its own."""
        with call_span(request) as span:
            answer = expect(self.submit(request, priority=priority).completion(timeout), kind)
            span.answered(answer)
            return answer

    @overload
    def chat(self, model: str, messages: MessagesLike, *, stream: Literal[True], timeout: float | None = None,
             priority: Priority | str = Priority.NORMAL,
             **params: Any) -> Iterator[ChatCompletionChunk]: ...  # fmt: skip

    @overload
    def chat(self, model: str, messages: MessagesLike, *, stream: Literal[False] = False,
             timeout: float | None = None, priority: Priority | str = Priority.NORMAL,
             **params: Any) -> ChatCompletion: ...  # fmt: skip

    def chat(
        self,
        model: str,
        messages: MessagesLike,
        *,
        stream: bool = False,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """Submit a chat request and wait for its answer (errors are raised); with ``stream=True``, the
        answer's chunks as they are generated (see ``stream``)."""
        if stream:
            return self.stream(model, messages, timeout=timeout, priority=priority, **params)
        return self._call(build_chat_request(model, messages, params), ChatCompletion, timeout, priority)

    def stream(
        self,
        model: str,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> Iterator[ChatCompletionChunk]:
        """Submit a chat request with ``stream: true`` and yield its ``chat.completion.chunk`` objects: text
        deltas as the worker makes them, the finish reason, and a last chunk with usage. Errors are raised."""
        request = build_chat_request(model, messages, {**params, "stream": True})
        return self.submit(request, priority=priority).stream(timeout)

    @overload
    def complete(self, model: str, prompt: PromptLike, *, stream: Literal[True], timeout: float | None = None,
                 priority: Priority | str = Priority.NORMAL,
                 **params: Any) -> Iterator[CompletionChunk]: ...  # fmt: skip

    @overload
    def complete(self, model: str, prompt: PromptLike, *, stream: Literal[False] = False,
                 timeout: float | None = None, priority: Priority | str = Priority.NORMAL,
                 **params: Any) -> Completion: ...  # fmt: skip

    def complete(
        self,
        model: str,
        prompt: PromptLike,
        *,
        stream: bool = False,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> Completion | Iterator[CompletionChunk]:
        """A text completion (``/v1/completions``: the prompt as it is, no chat template; ``max_tokens`` defaults
        to 16, as OpenAI's): submitted, then awaited; with ``stream=True`` its ``text_completion`` chunks as they
        are generated. Errors are raised."""
        if not stream:
            return self._call(_completion_body(model, prompt, stream, params), Completion, timeout, priority)
        handle = self.submit(_completion_body(model, prompt, stream, params), priority=priority)
        return (as_completion_chunk(chunk) for chunk in handle.stream(timeout))

    def embed(
        self,
        model: str,
        input: EmbeddingInput,  # OpenAI's name for it
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> EmbeddingList:
        """Embeddings (``/v1/embeddings``) of a text, texts, or token ids: submitted, then awaited. Each input's
        vector is ``data[i].embedding`` (floats, or base64 with ``encoding_format="base64"``); ``vectors()`` gives
        them all as floats. Errors are raised."""
        return self._call(_embedding_body(model, input, params), EmbeddingList, timeout, priority)

    @overload
    def chain(self, steps: ChainSteps, inputs: Mapping[str, Any], *, stream: Literal[True],
              timeout: float | None = None) -> Iterator[ChatCompletionChunk]: ...  # fmt: skip

    @overload
    def chain(self, steps: ChainSteps, inputs: Mapping[str, Any], *, stream: Literal[False] = False,
              timeout: float | None = None) -> ChainResult: ...  # fmt: skip

    def chain(self, steps: ChainSteps, inputs: Mapping[str, Any], *, stream: bool = False,
              timeout: float | None = None) -> ChainResult | Iterator[ChatCompletionChunk]:  # fmt: skip
        """Run ``steps`` (a pipeline's: ``inferpool.client.chains``) for one input, as single requests; with
        ``stream=True``, the last step's chunks once the steps before it are answered."""
        if stream:
            return stream_chain(self, steps, inputs, timeout=timeout)
        return run_chain(self, steps, inputs, timeout=timeout)

    def retry_dead_letters(self, ids: Sequence[str] | None = None, *, model: str | None = None) -> BatchJob:
        """Send dead letters again as a new batch job (all of them, or those with ``ids``), optionally to
        another ``model``; they leave the dead-letter stream once the job holds them. Returns the job."""
        letters = self.dead_letters.list()
        if ids is not None:
            wanted = set(ids)
            letters = [letter for letter in letters if letter.id in wanted]
            missing = wanted - {letter.id for letter in letters}
            if missing:
                raise InvalidRequest(f"no dead letters with ids {', '.join(sorted(missing))}; see `inferpool dlq list`")
        if not letters:
            raise InvalidRequest("there are no dead letters to retry")
        job = self.batches.create(retry_lines(letters, model), metadata={"retry_of": "dead letters"})
        self.dead_letters.remove([letter.id for letter in letters])
        return job

    def handle(self, request_id: str) -> ResultHandle:
        """A handle for a request submitted earlier, possibly by another process."""
        return ResultHandle(self, request_id)

    def usage(
        self,
        since: dt.date | None = None,
        until: dt.date | None = None,
        *,
        model: str | None = None,
        tenant: str | None = None,
    ) -> list[ModelUsage]:
        """Usage per tenant and model over UTC days ``since``..``until`` (default: today), every request
        counted once (batch and single requests alike). A job's own usage is ``batches.retrieve(id).usage``."""
        today = dt.datetime.now(dt.UTC).date()
        return read_usage(self.redis, since or today, until, model=model, tenant=tenant)

    def wait_result(self, request_id: str, timeout: float | None = None) -> RequestResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = self.redis.get(result_key(request_id))
            if raw is not None:
                return parse_result(raw)
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise _timeout_error(request_id, timeout)
            block = _WAIT_SLICE_S if remaining is None else min(remaining, _WAIT_SLICE_S)
            self.redis.blpop([result_notify_key(request_id)], timeout=max(block, 0.01))

    def read_stream(self, request_id: str, timeout: float | None = None) -> Iterator[ChatCompletionChunk]:
        """``ResultHandle.stream`` of ``request_id``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        assembler = StreamAssembler(request_id)
        raw: bytes | str | None = None
        while not assembler.done:
            block = _read_slice(deadline, request_id, timeout)
            reply: Any = self.redis.xread({stream_key(request_id): assembler.position}, count=1000, block=block)
            if reply:
                yield from assembler.feed(reply[0][1])
            elif (raw := self.redis.get(result_key(request_id))) is not None:
                break
        result = _streamed_result(request_id, raw if raw is not None else self.redis.get(result_key(request_id)))
        yield from assembler.finish(result)
        completion_or_raise(result)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class AsyncClient(ClientBase):
    """asyncio client: ``client = await AsyncClient.connect()``, or ``async with AsyncClient() as client``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        registry: Registry | None = None,
        tenant: str | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(redis_url, settings, registry, tenant)
        self._redis: redis.asyncio.Redis | None = None
        # Batch job calls run the sync implementation in threads, on a sync connection pool of their own.
        self._sync_redis = redis_from_url(self.redis_url, socket_connect_timeout=5)
        self.publisher = ChunkPublisher(self._sync_redis, self._ensure_connected)
        self.use_key(self._sync_redis, api_key)
        batches = Batches(self._sync_redis, self.settings, self.router, self.tenant_for, self.key_gate)
        self.batches = AsyncBatches(batches)
        self.pipelines = AsyncPipelines(Pipelines(self._sync_redis, batches, self.router, self.settings.result_ttl_s))
        self.attach_live_view(self._sync_redis)
        self.budget_gate = BudgetGate(self.registry, self._sync_redis, self.settings.result_ttl_s)
        # Requests published together while one publish is under way; their results come back on one list.
        self.coalescer = Coalescer(self.publisher.publish_async, self.chunk_size)
        self.replies = Replies(self._ensure_connected)
        self._live_refresh: asyncio.Future[None] | None = None

    @classmethod
    async def connect(
        cls,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        registry: Registry | None = None,
        tenant: str | None = None,
        api_key: str | None = None,
    ) -> AsyncClient:
        client = cls(redis_url, settings=settings, registry=registry, tenant=tenant, api_key=api_key)
        await client._ensure_connected()
        return client

    async def _ensure_connected(self) -> redis.asyncio.Redis:
        if self._redis is None:
            self._redis = await connect_redis_async(self.redis_url)
        return self._redis

    @property
    def redis(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise RuntimeError("AsyncClient is not connected: use `await AsyncClient.connect()` or `async with`")
        return self._redis

    async def submit(
        self,
        request: RequestLike,
        *,
        custom_id: str | None = None,
        priority: Priority | str = Priority.NORMAL,
        tenant: str | None = None,
        route: Route | None = None,
        key_id: str | None = None,
    ) -> AsyncResultHandle:
        await self._ensure_connected()
        chat_request = build_request(request)  # validated once: single_chunk takes the model as it is
        with submit_span() as span:
            if route is None:
                route = await self.route_async(chat_request)
            chunk = self.single_chunk(chat_request, custom_id, priority, tenant, route)
            item = chunk.items[0].traced(traceparent(span))
            if self.key_gate is not None:
                await asyncio.to_thread(self.key_gate.admit, item.request, self.registry.get(chunk.model))
            await self.budget_gate.reserve_async(chunk, key_id or self.key_id(), self.redis)
            if not getattr(item.request, "stream", False):  # a stream is read from its output stream instead
                item.reply_to = self.replies.client_id
                self.replies.expect(item.request_id)
            try:
                if self.registry.get(chunk.model).routing == "prefix":
                    await asyncio.to_thread(self.publish, chunk)  # to the worker holding its prefix: alone
                else:
                    await self.coalescer.publish(chunk)
            except BaseException:
                self.replies.forget(item.request_id)
                await asyncio.to_thread(self.budget_gate.release, chunk)
                raise
        return AsyncResultHandle(self, item.request_id)

    async def _call(self, request: AnyRequest, kind: type[AnswerT], timeout: float | None,
                    priority: Priority | str) -> AnswerT:  # fmt: skip
        """``Client._call``."""
        with call_span(request) as span:
            answer = expect(await (await self.submit(request, priority=priority)).completion(timeout), kind)
            span.answered(answer)
            return answer

    @overload
    async def chat(self, model: str, messages: MessagesLike, *, stream: Literal[True], timeout: float | None = None,
                   priority: Priority | str = Priority.NORMAL,
                   **params: Any) -> AsyncIterator[ChatCompletionChunk]: ...  # fmt: skip

    @overload
    async def chat(self, model: str, messages: MessagesLike, *, stream: Literal[False] = False,
                   timeout: float | None = None, priority: Priority | str = Priority.NORMAL,
                   **params: Any) -> ChatCompletion: ...  # fmt: skip

    async def chat(
        self,
        model: str,
        messages: MessagesLike,
        *,
        stream: bool = False,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        if stream:
            return await self.stream(model, messages, timeout=timeout, priority=priority, **params)
        return await self._call(build_chat_request(model, messages, params), ChatCompletion, timeout, priority)

    async def stream(
        self,
        model: str,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> AsyncIterator[ChatCompletionChunk]:
        """``Client.stream``: submitted when awaited, then iterated with ``async for``."""
        request = build_chat_request(model, messages, {**params, "stream": True})
        handle = await self.submit(request, priority=priority)
        return handle.stream(timeout)

    @overload
    async def complete(self, model: str, prompt: PromptLike, *, stream: Literal[True], timeout: float | None = None,
                       priority: Priority | str = Priority.NORMAL,
                       **params: Any) -> AsyncIterator[CompletionChunk]: ...  # fmt: skip

    @overload
    async def complete(self, model: str, prompt: PromptLike, *, stream: Literal[False] = False,
                       timeout: float | None = None, priority: Priority | str = Priority.NORMAL,
                       **params: Any) -> Completion: ...  # fmt: skip

    async def complete(
        self,
        model: str,
        prompt: PromptLike,
        *,
        stream: bool = False,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> Completion | AsyncIterator[CompletionChunk]:
        """``Client.complete``; streamed chunks come with ``async for``."""
        if not stream:
            return await self._call(_completion_body(model, prompt, stream, params), Completion, timeout, priority)
        handle = await self.submit(_completion_body(model, prompt, stream, params), priority=priority)
        return _completion_chunks(handle.stream(timeout))

    async def embed(
        self,
        model: str,
        input: EmbeddingInput,  # OpenAI's name for it
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> EmbeddingList:
        """``Client.embed``."""
        return await self._call(_embedding_body(model, input, params), EmbeddingList, timeout, priority)

    async def chain(self, steps: ChainSteps, inputs: Mapping[str, Any], *,
                    timeout: float | None = None) -> ChainResult:  # fmt: skip
        """``Client.chain`` (``stream_chain`` for the last step's chunks: ``chain_stream``)."""
        return await run_chain_async(self, steps, inputs, timeout=timeout)

    def chain_stream(self, steps: ChainSteps, inputs: Mapping[str, Any], *,
                     timeout: float | None = None) -> AsyncIterator[ChatCompletionChunk]:  # fmt: skip
        return stream_chain_async(self, steps, inputs, timeout=timeout)

    def handle(self, request_id: str) -> AsyncResultHandle:
        return AsyncResultHandle(self, request_id)

    async def route_async(self, request: AnyRequest, allowed: Collection[str] | None = None) -> Route:
        """``route`` without blocking the event loop: when it reads the pool's live view from Redis (``model:
        "auto"``, or the live view is due for a refresh: the windows the engines accept), in a thread; else from
        memory. ``allowed``: the models "auto" may choose."""
        if self.router.needs_live_read():  # Redis is read: not on the loop, and once for all who need it now
            refresh = self._live_refresh
            if refresh is None or refresh.done() or refresh.get_loop() is not asyncio.get_running_loop():
                refresh = self._live_refresh = asyncio.ensure_future(asyncio.to_thread(self.router.refresh_live_view))
            await asyncio.shield(refresh)
        return self.router.route(request, allowed)

    async def wait_result(self, request_id: str, timeout: float | None = None) -> RequestResult:
        client = await self._ensure_connected()
        if self.replies.expects(request_id):  # submitted here: its result comes on the client's reply list
            try:
                return await self.replies.wait(request_id, timeout)
            except TimeoutError:
                raise _timeout_error(request_id, timeout) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = await client.get(result_key(request_id))
            if raw is not None:
                return parse_result(raw)
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise _timeout_error(request_id, timeout)
            block = _WAIT_SLICE_S if remaining is None else min(remaining, _WAIT_SLICE_S)
            await client.blpop([result_notify_key(request_id)], timeout=max(block, 0.01))

    async def read_stream(self, request_id: str,
                          timeout: float | None = None) -> AsyncGenerator[ChatCompletionChunk, None]:  # fmt: skip
        """``AsyncResultHandle.stream`` of ``request_id``.

        Read on a connection of its own, closed when the stream ends: a stream blocks its connection for as long
        as it lasts, and a pool that lent one to each of hundreds of streams would keep them all open after."""
        await self._ensure_connected()
        client = async_redis_from_url(self.redis_url, single_connection_client=True, socket_connect_timeout=5)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            assembler = StreamAssembler(request_id)
            raw: bytes | str | None = None
            while not assembler.done:
                block = _read_slice(deadline, request_id, timeout)
                reply: Any = await client.xread({stream_key(request_id): assembler.position}, count=1000, block=block)
                if reply:
                    for chunk in assembler.feed(reply[0][1]):
                        yield chunk
                elif (raw := await client.get(result_key(request_id))) is not None:
                    break
            if raw is None:
                raw = await client.get(result_key(request_id))
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
        result = _streamed_result(request_id, raw)
        for chunk in assembler.finish(result):
            yield chunk
        completion_or_raise(result)

    async def aclose(self) -> None:
        await self.replies.close()
        if self._redis is not None:
            await self._redis.aclose()
        self._sync_redis.close()

    async def __aenter__(self) -> Self:
        await self._ensure_connected()
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()


async def _completion_chunks(chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[CompletionChunk]:
    async for chunk in chunks:
        yield as_completion_chunk(chunk)
