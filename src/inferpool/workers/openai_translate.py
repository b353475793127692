"""OpenAI's answers as inferpool's ``Generation`` (the real-time backend and the Batch API's output lines share it)."""

from __future__ import annotations

from typing import Any

from inferpool.wire import FinishReason
from inferpool.workers.api_backend import (
    ApiFailure,
)
from inferpool.workers.backend import Generation, tool_call

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
