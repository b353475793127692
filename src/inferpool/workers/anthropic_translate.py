"""The OpenAI chat format to Anthropic's Messages API and back: turns, system text, tools and tool calls.

OpenAI ``tools`` (``{"type": "function", "function": {name, description, parameters}}``) become Anthropic
tools (``{name, description, input_schema}``); an assistant message's ``tool_calls`` become ``tool_use``
blocks, and ``role: "tool"`` messages become ``tool_result`` blocks of the next user turn (consecutive
ones merged, as Anthropic wants every result of one turn together). Answers come back the other way:
``tool_use`` blocks are ``message.tool_calls`` with their ``input`` as JSON ``arguments``.
"""

from __future__ import annotations

import json
from typing import Any

from inferpool._exceptions import InvalidRequest
from inferpool.wire import ChatMessage, ChatRequest, FinishReason
from inferpool.workers.backend import Generation, tool_call

FINISH_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "refusal": "content_filter", "pause_turn": "stop",
}  # fmt: skip


_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}


def conversation(request: ChatRequest) -> list[dict[str, Any]]:
    """User and assistant turns (system ones go to ``system``), consecutive turns of one speaker merged."""
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            continue
        role = "assistant" if message.role == "assistant" else "user"
        content = _content(index, message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _merged(turns[-1]["content"], content)
        else:
            turns.append({"role": role, "content": content})
    return turns


def _content(index: int, message: ChatMessage) -> str | list[dict[str, Any]]:
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.text()}]
    if message.role == "assistant" and message.tool_calls:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": message.text()}] if message.text() else []
        for number, call in enumerate(message.tool_calls):
            blocks.append(_tool_use(f"messages[{index}].tool_calls[{number}]", call))
        return blocks
    return message.text()


def _tool_use(where: str, call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not call.get("id"):
        raise InvalidRequest(f"{where} needs an id and a function with a name")
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object (as text) for Anthropic models")
    return {"type": "tool_use", "id": str(call["id"]), "name": function["name"], "input": arguments}


def _merged(first: str | list[dict[str, Any]], second: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(first, str) and isinstance(second, str):
        return f"{first}\n\n{second}"
    return _blocks(first) + _blocks(second)


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def tool_arguments(request: ChatRequest) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` for the Messages API call (empty without tools)."""
    if not request.tools:
        return {}
    tools = []
    for tool in request.tools:
        function = tool["function"]
        converted = {"name": function["name"],
                     "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}  # fmt: skip
        if function.get("description"):
            converted["description"] = function["description"]
        tools.append(converted)
    choice: dict[str, Any] | None = None
    if isinstance(request.tool_choice, dict):
        choice = {"type": "tool", "name": request.tool_choice["function"]["name"]}
    elif request.tool_choice is not None:
        choice = {"type": _TOOL_CHOICE[request.tool_choice]}
    if request.parallel_tool_calls is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    return {"tools": tools, **({"tool_choice": choice} if choice else {})}


def tool_calls_of(blocks: Any) -> list[dict[str, Any]]:
    """The ``tool_use`` blocks of an Anthropic answer as OpenAI tool calls."""
    return [tool_call(b.id, b.name, json.dumps(b.input)) for b in blocks if getattr(b, "type", "") == "tool_use"]


def message_generation(message: Any) -> Generation:
    """An SDK ``Message`` as a ``Generation`` (the real-time answer, and a batch result's message)."""
    text = "".join(getattr(block, "text", "") for block in message.content if block.type == "text")
    return Generation(
        text=text,
        finish_reason=FINISH_REASONS.get(message.stop_reason or "end_turn", "stop"),
        prompt_tokens=message.usage.input_tokens,
        completion_tokens=message.usage.output_tokens,
        tool_calls=tuple(tool_calls_of(message.content)),
    )
