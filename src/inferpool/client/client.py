"""``Client`` and ``AsyncClient``: submit requests to the pool and get results back through Redis.

Both share ``ClientBase`` (routing, task building); they differ only in how they talk to Redis.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Generator, Sequence
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio

from inferpool._exceptions import InvalidRequest, ResultTimeout, request_error_from_code
from inferpool.celery_app import create_celery_app, publish_chunk
from inferpool.client._base import (
    ClientBase,
    MessagesLike,
    RequestLike,
    build_chat_request,
    build_request,
    parse_priority,
)
from inferpool.client.batches import AsyncBatches, Batches
from inferpool.constants import Priority, result_key, result_notify_key
from inferpool.deadletters import DeadLetters, retry_lines
from inferpool.jobstore import BatchJob
from inferpool.model_registry.registry import Registry
from inferpool.redis_connection import connect_redis, connect_redis_async
from inferpool.results import parse_result
from inferpool.settings import Settings
from inferpool.stats import read_usage
from inferpool.usage import ModelUsage
from inferpool.wire import ChatCompletion, RequestResult

#: Longest single blocking wait; waiters re-check the result key at least this often.
_WAIT_SLICE_S = 1.0


def completion_or_raise(result: RequestResult) -> ChatCompletion:
    """The result's completion, or the ``RequestError`` the worker reported."""
    if result.response is not None:
        return result.response
    assert result.error is not None  # RequestResult guarantees exactly one of the two
    raise request_error_from_code(result.error.code, result.error.message)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _timeout_error(request_id: str, timeout: float | None) -> ResultTimeout:
    return ResultTimeout(
        f"no result for request {request_id} after {timeout} s; it may still be queued "
        "(are workers running for its model?); wait again with the same handle"
    )


class ResultHandle:
    """A submitted request. ``result()`` waits for it; the handle can be recreated from ``request_id``."""

    def __init__(self, client: Client, request_id: str) -> None:
        self._client = client
        self.request_id = request_id

    def done(self) -> bool:
        return bool(self._client.redis.exists(result_key(self.request_id)))

    def result(self, timeout: float | None = None) -> RequestResult:
        return self._client.wait_result(self.request_id, timeout)

    def completion(self, timeout: float | None = None) -> ChatCompletion:
        """The answer, or the request's error raised as an ``InferpoolError``."""
        return completion_or_raise(self.result(timeout))


class AsyncResultHandle:
    """The asyncio twin of ``ResultHandle``; ``await handle`` waits with no time limit."""

    def __init__(self, client: AsyncClient, request_id: str) -> None:
        self._client = client
        self.request_id = request_id

    async def done(self) -> bool:
        return bool(await self._client.redis.exists(result_key(self.request_id)))

    async def result(self, timeout: float | None = None) -> RequestResult:
        return await self._client.wait_result(self.request_id, timeout)

    async def completion(self, timeout: float | None = None) -> ChatCompletion:
        return completion_or_raise(await self.result(timeout))

    def __await__(self) -> Generator[Any, None, RequestResult]:
        return self.result().__await__()


class Client(ClientBase):
    """Synchronous client. ``redis_url`` defaults to ``REDIS_URL``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        registry: Registry | None = None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(redis_url, settings, registry, tenant)
        self.redis: redis.Redis = connect_redis(self.redis_url)
        self.attach_live_view(self.redis)
        self.celery = create_celery_app(self.settings)
        self.batches = Batches(self.redis, self.settings, self.router, self.tenant_for)
        self.dead_letters = DeadLetters(self.redis, self.settings.result_ttl_s)

    def submit(
        self, request: RequestLike, *, custom_id: str | None = None, priority: Priority | str = Priority.NORMAL
    ) -> ResultHandle:
        """Queue one request and return at once. Raises ``InvalidRequest``/``ModelNotFound`` before queueing.

        ``priority`` (high, normal, low) picks the model's queue; workers always take high first, and
        batch jobs run at low.
        """
        chat_request = build_request(request)
        route = self.route(chat_request)
        chat_request = chat_request.model_copy(update={"model": route.model})
        chunk = self.make_chunk(route.spec, [(chat_request, custom_id)], warnings=route.warnings,
                                priority=parse_priority(priority))  # fmt: skip
        publish_chunk(self.celery, chunk)
        return ResultHandle(self, chunk.items[0].request_id)

    def chat(
        self,
        model: str,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> ChatCompletion:
        """Submit a chat request and wait for its answer (errors are raised)."""
        return self.submit(build_chat_request(model, messages, params), priority=priority).completion(timeout)

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

    def close(self) -> None:
        self.redis.close()
        self.celery.close()

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
    ) -> None:
        super().__init__(redis_url, settings, registry, tenant)
        self._redis: redis.asyncio.Redis | None = None
        self.celery = create_celery_app(self.settings)
        # Batch job calls run the sync implementation in threads, on a sync connection pool of their own.
        self._sync_redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=5)
        self.batches = AsyncBatches(Batches(self._sync_redis, self.settings, self.router, self.tenant_for))
        self.attach_live_view(self._sync_redis)

    @classmethod
    async def connect(
        cls,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        registry: Registry | None = None,
        tenant: str | None = None,
    ) -> AsyncClient:
        client = cls(redis_url, settings=settings, registry=registry, tenant=tenant)
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
        self, request: RequestLike, *, custom_id: str | None = None, priority: Priority | str = Priority.NORMAL
    ) -> AsyncResultHandle:
        await self._ensure_connected()
        chat_request = build_request(request)
        route = self.route(chat_request)
        chat_request = chat_request.model_copy(update={"model": route.model})
        chunk = self.make_chunk(route.spec, [(chat_request, custom_id)], warnings=route.warnings,
                                priority=parse_priority(priority))  # fmt: skip
        await asyncio.to_thread(publish_chunk, self.celery, chunk)
        return AsyncResultHandle(self, chunk.items[0].request_id)

    async def chat(
        self,
        model: str,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        priority: Priority | str = Priority.NORMAL,
        **params: Any,
    ) -> ChatCompletion:
        handle = await self.submit(build_chat_request(model, messages, params), priority=priority)
        return await handle.completion(timeout)

    def handle(self, request_id: str) -> AsyncResultHandle:
        return AsyncResultHandle(self, request_id)

    async def wait_result(self, request_id: str, timeout: float | None = None) -> RequestResult:
        client = await self._ensure_connected()
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

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        self._sync_redis.close()
        self.celery.close()

    async def __aenter__(self) -> Self:
        await self._ensure_connected()
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()
