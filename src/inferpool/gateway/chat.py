"""``POST /v1/chat/completions``: one request through the pool, answered whole or as server-sent events.

A streamed answer is OpenAI's SSE format: ``data: {chat.completion.chunk}`` lines, a blank line after each,
and ``data: [DONE]`` at the end. The usage chunk (no choices) is sent only with
``stream_options.include_usage``. An error after the stream began is one ``data: {"error": {...}}`` event
(the SDKs raise it). A client that hangs up stops the relay and asks the worker to stop generating.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from inferpool._exceptions import RequestError, request_error_from_code
from inferpool.client._base import build_request
from inferpool.client.client import AsyncResultHandle
from inferpool.gateway.app import gateway_of, read_json_body
from inferpool.gateway.errors import error_body, request_error_status


async def create_chat_completion(request: Request) -> Response:
    gateway = gateway_of(request)
    tenant = await gateway.authenticate(request)
    body = await read_json_body(request, gateway.settings.batch_max_line_bytes)
    chat_request = build_request(body)
    route = gateway.client.route(chat_request)
    await gateway.require_live_worker(route.spec.name)
    handle = await gateway.client.submit(chat_request, tenant=tenant, route=route)
    headers = {"x-request-id": handle.request_id}
    if chat_request.stream:
        include_usage = bool(chat_request.stream_options and chat_request.stream_options.include_usage)
        return StreamingResponse(server_sent_events(handle, include_usage), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})  # fmt: skip
    result = await handle.result()
    if result.response is None:
        assert result.error is not None
        raise request_error_from_code(result.error.code, result.error.message)
    return Response(result.response.model_dump_json(), media_type="application/json", headers=headers)


async def server_sent_events(handle: AsyncResultHandle, include_usage: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        try:
            async for chunk in handle.stream():
                if chunk.usage is not None and not include_usage:
                    continue
                yield b"data: " + chunk.model_dump_json().encode() + b"\n\n"
        except RequestError as exc:
            error = error_body(request_error_status(exc), exc.message, "api_error", exc.code)
            yield b"data: " + _json(error) + b"\n\n"
        finished = True
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the client hung up (the relay was cancelled): nobody reads the rest
            with anyio.CancelScope(shield=True):
                await handle.stop()


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


routes = [Route("/v1/chat/completions", create_chat_completion, methods=["POST"])]
