"""``POST /v1/completions``: a text completion (a raw prompt, no chat template) through the pool, whole or
streamed as ``text_completion`` server-sent events, as OpenAI's API does."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferpool.gateway.serving import serve_one
from inferpool.wire import CompletionRequest


async def create_completion(request: Request) -> Response:
    return await serve_one(request, CompletionRequest)


routes = [Route("/v1/completions", create_completion, methods=["POST"])]
