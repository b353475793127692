"""OpenAI's answers as inferpool's ``Generation`` and ``Embeddings`` (the real-time backend and the Batch API's
output lines share it)."""

from __future__ import annotations

from typing import Any

from inferpool.wire import FinishReason, pack_vector
from inferpool.workers.api_backend import (
    ApiFailure,
)
from inferpool.workers.backend import Embeddings, ExtraChoice, Generation, tool_call

_FINISH: dict[str, FinishReason] = {
    "stop": "stop", "length": "length", "tool_calls": "tool_calls", "function_call": "tool_calls",
    "content_filter": "content_filter",
}  # fmt: skip


def completion_generation(completion: Any) -> Generation:
    """An SDK ``ChatCompletion`` as a ``Generation`` (the real-time answer, and a batch output line's body)."""
    if not completion.choices:
        raise ApiFailure("the response has no choices", retryable=True)
    choice = completion.choices[0]
    usage = completion.usage
    return Generation(
        text=choice.message.content or "",
        finish_reason=_FINISH.get(choice.finish_reason or "stop", "stop"),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        tool_calls=tuple(
            tool_call(call.id, call.function.name, call.function.arguments)
            for call in choice.message.tool_calls or ()
            if call.type == "function"
        ),
    )


def text_completion_generation(completion: Any) -> Generation:
    """An SDK ``Completion`` (``/v1/completions``) as a ``Generation``: choice 0, the others as extra choices."""
    choices = sorted(completion.choices or (), key=lambda choice: choice.index)
    if not choices:
        raise ApiFailure("the response has no choices", retryable=True)
    usage = completion.usage
    first, rest = choices[0], choices[1:]
    extra = tuple(ExtraChoice(c.text or "", _FINISH.get(c.finish_reason or "stop", "stop"), _plain(c.logprobs))
                  for c in rest)  # fmt: skip
    return Generation(
        text=first.text or "",
        finish_reason=_FINISH.get(first.finish_reason or "stop", "stop"),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        logprobs=_plain(first.logprobs),
        extra_choices=extra,
    )


def embeddings_outcome(response: Any) -> Embeddings:
    """An SDK ``CreateEmbeddingResponse``, or its JSON (a Batch API output line's body, where vectors asked as
    base64 are strings, which the SDK's model does not take), as ``Embeddings``."""

    def field(obj: Any, name: str) -> Any:
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    data = sorted(field(response, "data") or (), key=lambda item: field(item, "index") or 0)
    if not data:
        raise ApiFailure("the response has no embeddings", retryable=True)
    vectors = []
    for item in data:
        vector = field(item, "embedding")
        if not (isinstance(vector, str) or (isinstance(vector, list) and vector)):
            raise ApiFailure("an embedding is neither base64 text nor a list of floats", retryable=False)
        vectors.append(vector if isinstance(vector, str) else pack_vector(vector))
    tokens = field(field(response, "usage") or {}, "prompt_tokens")
    return Embeddings(vectors=tuple(vectors), prompt_tokens=tokens if isinstance(tokens, int) else 0)


def _plain(logprobs: Any) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    dumped = logprobs.model_dump() if hasattr(logprobs, "model_dump") else logprobs
    return dumped if isinstance(dumped, dict) else None
