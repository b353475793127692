"""``POST /v1/embeddings``: embeddings of a text, texts or token ids through the pool; vectors as floats, or
base64 of float32 with ``encoding_format: "base64"`` (what OpenAI's SDK asks for by default)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferpool.gateway.serving import serve_one
from inferpool.wire import EmbeddingRequest


async def create_embedding(request: Request) -> Response:
    return await serve_one(request, EmbeddingRequest)


routes = [Route("/v1/embeddings", create_embedding, methods=["POST"])]
