"""Span attributes after OpenTelemetry's GenAI semantic conventions (``gen_ai.*``). No prompt or answer text
unless ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` asks for it (``content_attributes``)."""

from __future__ import annotations

import json
from typing import Any

from inferpool.wire import ChatRequest, CompletionRequest, EmbeddingRequest
from inferpool.wire.kinds import AnyRequest

#: ``gen_ai.provider.name`` for the backends whose provider the conventions name; others give their own name.
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}


def operation(request: AnyRequest) -> str:
    """``gen_ai.operation.name``: chat, text_completion or embeddings."""
    if isinstance(request, EmbeddingRequest):
        return "embeddings"
    if isinstance(request, CompletionRequest):
        return "text_completion"
    return "chat"


def span_name(request: AnyRequest, model: str) -> str:
    """The conventions' span name: ``{operation} {model}``."""
    return f"{operation(request)} {model}"


def request_attributes(request: AnyRequest, model: str) -> dict[str, Any]:
    """What the request asked for: operation, model and sampling parameters (never its text)."""
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation(request), "gen_ai.request.model": model}
    if isinstance(request, ChatRequest | CompletionRequest):
        limit = request.output_limit()
        if limit is not None:
            attributes["gen_ai.request.max_tokens"] = limit
        if request.temperature is not None:
            attributes["gen_ai.request.temperature"] = request.temperature
        if request.top_p is not None:
            attributes["gen_ai.request.top_p"] = request.top_p
        if request.stream:
            attributes["gen_ai.request.stream"] = True
    return attributes


def provider_name(backend: str) -> str:
    return _PROVIDERS.get(backend, backend)


def usage_attributes(input_tokens: int | None, output_tokens: int | None, finish_reasons: list[str]) -> dict[str, Any]:
    """What an answer says: its tokens and why it ended."""
    attributes: dict[str, Any] = {}
    if input_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = input_tokens
    if output_tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = output_tokens
    if finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = finish_reasons
    return attributes


def content_attributes(request: AnyRequest, outputs: list[str]) -> dict[str, Any]:
    """The prompt and answer, as ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (only when asked)."""
    attributes: dict[str, Any] = {}
    if isinstance(request, ChatRequest):
        attributes["gen_ai.input.messages"] = json.dumps([message.model_dump(exclude_none=True, mode="json")
                                                          for message in request.messages])  # fmt: skip
    elif isinstance(request, CompletionRequest):
        attributes["gen_ai.input.messages"] = json.dumps(request.prompts())
    if outputs:
        attributes["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "content": text} for text in outputs])
    return attributes
