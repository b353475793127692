"""The emulators' answers to a chat request, shared by the real-time and batch endpoints: OpenAI's
``chat.completion`` and stream deltas, Anthropic's message. Deterministic: the answer echoes the prompt."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from inferpool.emulators.tools import (
    anthropic_tool_error,
    anthropic_tool_uses,
    openai_tool_calls,
    openai_tool_deltas,
    openai_tool_error,
    tool_results_text,
)


@dataclass(frozen=True)
class OpenAIAnswer:
    """The emulator's answer to one chat request, before it is shaped as a completion or a stream."""

    head: dict[str, Any]
    text: str
    finish: str
    calls: list[dict[str, Any]]
    usage: dict[str, int]

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None if self.calls else self.text}
        if self.calls:
            message["tool_calls"] = self.calls
        return {**self.head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish, "logprobs": None}],
                "usage": self.usage}  # fmt: skip


def openai_answer(body: dict[str, Any], sequence: int) -> OpenAIAnswer | str:
    """The answer to an OpenAI chat body (``emulated: <last user text>``, or tool calls), or the 400's
    message for a body the real API refuses."""
    messages = body.get("messages", [])
    problem = openai_tool_error(messages)
    if problem is not None:
        return problem
    prompt_words = sum(len(_text(m.get("content")).split()) for m in messages)
    calls = openai_tool_calls(body, sequence)
    text, finish = _answer(messages, body.get("max_completion_tokens") or body.get("max_tokens"), body.get("stop"))
    if calls:
        text, finish = "", "tool_calls"
    completion = len(text.split()) + sum(len(c["function"]["arguments"].split()) for c in calls)
    usage = {"prompt_tokens": prompt_words, "completion_tokens": completion, "total_tokens": prompt_words + completion}
    head = {"id": f"chatcmpl-emu{sequence}", "created": int(time.time()), "model": body.get("model")}
    return OpenAIAnswer(head, text, finish, calls, usage)


def anthropic_answer(body: dict[str, Any], sequence: int) -> dict[str, Any] | str:
    """The Messages API answer to ``body`` (a ``message`` object), or the 400's message."""
    problem = anthropic_tool_error(body)
    if problem is not None:
        return problem
    messages = body.get("messages", [])
    system = body.get("system") or ""
    prompt_words = len(_text(system).split()) + sum(len(_text(m.get("content")).split()) for m in messages)
    uses = anthropic_tool_uses(body, sequence)
    text, finish = _answer(messages, body.get("max_tokens"), body.get("stop_sequences"))
    stop_reason = {"stop": "end_turn", "length": "max_tokens"}[finish]
    if finish == "stop" and body.get("stop_sequences") and text != _full_answer(messages):
        stop_reason = "stop_sequence"
    if uses:
        text, stop_reason = "", "tool_use"
    output_tokens = len(text.split()) + sum(len(json.dumps(u["input"]).split()) for u in uses)
    return {"id": f"msg_emu{sequence}", "type": "message", "role": "assistant", "model": body.get("model"),
            "stop_sequence": None, "content": uses or [{"type": "text", "text": text}], "stop_reason": stop_reason,
            "usage": {"input_tokens": prompt_words, "output_tokens": output_tokens}}  # fmt: skip


def answer_pieces(text: str) -> list[str]:
    """The answer as streamed tokens: its words, each after the first with its leading space."""
    words = text.split(" ")
    return [word if index == 0 else f" {word}" for index, word in enumerate(words) if word or index == 0]


def openai_deltas(text: str, finish: str, calls: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
    """(delta, finish_reason) of each chunk: the role, one token (or tool-call piece) each, then the finish."""
    deltas: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant", "content": ""}, None)]
    deltas += [({"content": piece}, None) for piece in answer_pieces(text) if piece]
    deltas += [(delta, None) for delta in openai_tool_deltas(calls)]
    deltas.append(({}, finish))
    return deltas


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _full_answer(messages: list[dict[str, Any]]) -> str:
    results = tool_results_text(messages)
    if results is not None:
        return f"emulated: {results}"
    last_user: dict[str, Any] = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    return f"emulated: {_text(last_user.get('content'))}"


def _answer(messages: list[dict[str, Any]], max_tokens: int | None, stop: Any) -> tuple[str, str]:
    """``emulated: <last user text>``, cut to ``max_tokens`` words and at the first stop sequence."""
    return cut_answer(_full_answer(messages), max_tokens, stop)


def cut_answer(answer: str, max_tokens: int | None, stop: Any) -> tuple[str, str]:
    """``answer`` cut to ``max_tokens`` words and at the first stop sequence: (text, finish reason)."""
    words = answer.split()
    finish = "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
    text = " ".join(words)
    for sequence in [stop] if isinstance(stop, str) else (stop or []):
        cut = text.find(sequence)
        if cut != -1:
            text, finish = text[:cut], "stop"
    return text, finish
