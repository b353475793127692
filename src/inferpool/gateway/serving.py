"""One request through the pool, answered whole or as server-sent events: what the chat, completions and
embeddings routes (``chat``, ``completions``, ``embeddings``) share.

A streamed answer is OpenAI's SSE format: ``data: {chat.completion.chunk}`` lines (``text_completion`` objects
for a completion), a blank line after each,
and ``data: [DONE]`` at the end. The usage chunk (no choices) is sent only with
``stream_options.include_usage``. An error after the stream began is one ``data: {"error": {...}}`` event
(the SDKs raise it). A client that hangs up stops the relay and asks the worker to stop generating.

A whole (non-streamed) answer is awaited until it comes, the client hangs up, or
``INFERPOOL_GATEWAY_REQUEST_TIMEOUT_S`` passes (504); in the last two cases the request is stopped: a worker
that has not started it answers ``request_cancelled`` without running it, and one that streams stops. Each
open request holds one of the process's and its tenant's slots (``inferpool.gateway.admission``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from inferpool._exceptions import RequestError, ResultTimeout, request_error_from_code
from inferpool.client._base import build_request
from inferpool.client.handles import AsyncResultHandle
from inferpool.gateway.common import gateway_of, off_loop_for, parse_json_object, read_body
from inferpool.gateway.errors import HTTPError, error_body, request_error_status
from inferpool.gateway.key_limits import Ticket
from inferpool.wire import AnyRequest, ChatCompletionChunk, EmbeddingList, RequestResult, as_completion_chunk

#: The status logged for a request whose client hung up before its answer (nginx's convention; nobody reads it).
CLIENT_GONE_STATUS = 499


async def serve_one(request: Request, kind: type[AnyRequest]) -> Response:
    """The body as a request of ``kind``, through the pool; its answer whole, or streamed."""
    gateway = gateway_of(request)
    caller = await gateway.identify(request)
    tenant = caller.tenant
    admission, limiter = gateway.admission, gateway.key_limits
    admission.acquire(tenant)
    ticket: Ticket | None = None
    try:
        body = await read_body(request, gateway.settings.batch_max_line_bytes)
        chat_request = await off_loop_for(len(body), _parser(kind), body)
        route = await gateway.client.route_async(chat_request, limiter.allowed(caller))
        limiter.check_model(caller, chat_request.model, route.spec.name)
        await gateway.require_live_worker(route.spec.name)
        ticket = await limiter.admit(caller, chat_request, route.spec)
        handle = await gateway.client.submit(chat_request, tenant=tenant, route=route, key_id=caller.key_id)
    except BaseException:
        admission.release(tenant)
        with anyio.CancelScope(shield=True):
            await limiter.release(ticket)
        raise

    async def release() -> None:
        admission.release(tenant)
        await limiter.release(ticket)

    headers = {"x-request-id": handle.request_id}
    if chat_request.stream:
        include_usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
        events = server_sent_events(handle, include_usage, completion=chat_request.kind == "completions")
        return _RelayResponse(events, handle, release, headers={**headers, "cache-control": "no-cache"})
    try:
        result = await _answer_unless_abandoned(request, handle, gateway.settings.gateway_request_timeout_s)
    finally:
        with anyio.CancelScope(shield=True):
            await release()
    if result is None:
        return Response(status_code=CLIENT_GONE_STATUS, headers=headers)
    if result.response is None:
        assert result.error is not None
        raise request_error_from_code(result.error.code, result.error.message)
    answer = result.response
    if isinstance(answer, EmbeddingList):  # stored packed: given in the format the request asked for
        answer = answer.as_requested()
    return Response(answer.model_dump_json(), media_type="application/json", headers=headers)


def _parser(kind: type[AnyRequest]) -> Callable[[bytes], AnyRequest]:
    def parse(body: bytes) -> AnyRequest:
        try:  # a good body, the common case: parsed and validated in one pass (pydantic's parser), as batch lines
            return kind.model_validate_json(body)
        except (ValidationError, ValueError, RecursionError):
            return build_request(parse_json_object(body), kind)  # the slow path, which says what is wrong

    return parse


async def _answer_unless_abandoned(
    request: Request, handle: AsyncResultHandle, timeout_s: float
) -> RequestResult | None:
    """The request's result; None if the client hung up first. Either way, and on the timeout (504), a request
    that will not be read is stopped, so it neither holds a waiter nor runs later for nobody."""
    waiter = asyncio.ensure_future(handle.result(timeout_s))
    watcher = asyncio.ensure_future(_disconnected(request))
    finished = False
    try:
        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            try:
                result = waiter.result()
            except ResultTimeout:
                raise HTTPError(504, f"No answer within {timeout_s:g} s (INFERPOOL_GATEWAY_REQUEST_TIMEOUT_S); the "
                                "request was stopped. The pool may be backed up: retry later.", type_="api_error",
                                code="timeout", headers={"x-request-id": handle.request_id}) from None  # fmt: skip
            finished = True
            return result
        return None
    finally:
        for task in (waiter, watcher):
            task.cancel()
        if not finished:
            with anyio.CancelScope(shield=True):
                await handle.stop()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _RelayResponse(StreamingResponse):
    """A streamed answer that, however it ends (sent whole, cut off by a hang-up, or cancelled before its
    first byte, when a generator's own ``finally`` would never run), frees its slot (``on_close``) and, unless
    it was sent whole, asks the worker to stop generating: nobody reads the rest."""

    def __init__(self, events: AsyncIterator[bytes], handle: AsyncResultHandle,
                 on_close: Callable[[], Awaitable[None]], headers: dict[str, str]) -> None:  # fmt: skip
        self._events = events
        self._handle = handle
        self._on_close = on_close
        self._sent_whole = False
        super().__init__(self._relay(), media_type="text/event-stream", headers=headers)

    async def _relay(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            yield event
        self._sent_whole = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()
                await self._events.aclose()  # type: ignore[attr-defined]
                if not self._sent_whole:
                    await self._handle.stop()


async def server_sent_events(handle: AsyncResultHandle, include_usage: bool, *,
                             completion: bool = False) -> AsyncIterator[bytes]:  # fmt: skip
    """The answer's SSE events: ``chat.completion.chunk`` objects, or ``text_completion`` ones (``completion``)."""
    try:
        # Closed as soon as this relay is (a hang-up), not when collected: the stream holds a Redis connection.
        async with contextlib.aclosing(handle.stream()) as chunks:
            async for chunk in chunks:
                if chunk.usage is not None and not include_usage:
                    continue
                event: ChatCompletionChunk | Any = as_completion_chunk(chunk) if completion else chunk
                yield b"data: " + event.model_dump_json().encode() + b"\n\n"
    except RequestError as exc:
        error = error_body(request_error_status(exc), exc.message, "api_error", exc.code)
        yield b"data: " + _json(error) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _json(value: object) -> bytes:
    return json.dumps(value).encode()
