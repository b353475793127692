"""``POST /v1/chat/completions``: a chat request through the pool (``serving`` does the work)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferpool.gateway.serving import serve_one
from inferpool.wire import ChatRequest


async def create_chat_completion(request: Request) -> Response:
    return await serve_one(request, ChatRequest)


routes = [Route("/v1/chat/completions", create_chat_completion, methods=["POST"])]
