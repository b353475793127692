"""Tool calls in the emulators, in each provider's format, so tool round trips are tested offline.

A request with tools (and a tool choice other than none) whose conversation does not end in tool results
is answered with calls: to the named function, to the first one when parallel calls are off, else to
every tool, each with ``{<first parameter>: <last user text>}`` as arguments. A conversation that ends in
tool results is answered with text. Conversations whose tool results do not answer the calls made (the
mistakes the real APIs refuse with a 400) are refused here too.
"""

from __future__ import annotations

import json
from typing import Any


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            return content
        if message.get("role") == "user" and isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if texts:
                return "".join(texts)
    return ""


def _arguments(schema: Any, text: str) -> str:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    name = next(iter(properties), "input") if isinstance(properties, dict) and properties else "input"
    return json.dumps({name: text})


# -- OpenAI ----------------------------------------------------------------------------------------------


def openai_tool_error(messages: list[dict[str, Any]]) -> str | None:
    """What OpenAI would refuse in the conversation's tool messages, or None."""
    pending: set[str] = set()
    for index, message in enumerate(messages):
        if message.get("role") == "tool":
            if message.get("tool_call_id") not in pending:
                return f"messages[{index}]: tool_call_id {message.get('tool_call_id')!r} answers no pending tool call"
            pending.discard(message["tool_call_id"])
        elif pending:
            return f"messages[{index}]: the assistant's tool calls {sorted(pending)} were not all answered"
        if message.get("role") == "assistant":
            pending = {str(call.get("id")) for call in message.get("tool_calls") or []}
    return None


def openai_tool_calls(body: dict[str, Any], sequence: int) -> list[dict[str, Any]]:
    """The calls to answer ``body`` with (empty: answer with text)."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = body.get("tool_choice")
    messages = body.get("messages") or []
    if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
        return []
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"].get("name") == (choice.get("function") or {}).get("name")]
    elif body.get("parallel_tool_calls") is False:
        tools = tools[:1]
    text = _last_user_text(messages)
    return [{"id": f"call_emu{sequence}_{i}", "type": "function",
             "function": {"name": t["function"].get("name"), "arguments": _arguments(t["function"].get("parameters"),
                                                                                      text)}}
            for i, t in enumerate(tools)]  # fmt: skip


def openai_tool_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream deltas of ``calls``: each call's id and name first, then its arguments in two pieces."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})  # fmt: skip
        for piece in (arguments[:half], arguments[half:]):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    return deltas


def tool_results_text(messages: list[dict[str, Any]]) -> str | None:
    """The contents of the tool results the conversation ends with (OpenAI ``tool`` messages or an
    Anthropic user turn of ``tool_result`` blocks), or None if it does not end with any."""
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, str(message.get("content")))
    if results:
        return " ".join(results)
    last = messages[-1] if messages else {}
    content = last.get("content")
    if last.get("role") == "user" and isinstance(content, list):
        found = [_result_text(p.get("content")) for p in content
                 if isinstance(p, dict) and p.get("type") == "tool_result"]  # fmt: skip
        return " ".join(found) if found else None
    return None


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


# -- Anthropic -------------------------------------------------------------------------------------------


def anthropic_tool_error(body: dict[str, Any]) -> str | None:
    """What Anthropic would refuse in the tools or the conversation's tool blocks, or None."""
    for index, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
            return f"tools.{index}: a tool needs a name and an input_schema object"
    pending: set[str] = set()
    for index, message in enumerate(body.get("messages") or []):
        blocks = message.get("content") if isinstance(message.get("content"), list) else []
        answered = {b.get("tool_use_id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"}
        if answered - pending:
            unknown = sorted(map(str, answered - pending))
            return f"messages.{index}: tool_result blocks answer unknown tool_use ids {unknown}"
        if pending - answered:
            return f"messages.{index}: tool_use ids {sorted(pending - answered)} have no tool_result in the next turn"
        pending = {str(b.get("id")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"}
    return None


def anthropic_tool_uses(body: dict[str, Any], sequence: int) -> list[dict[str, Any]]:
    """The ``tool_use`` blocks to answer ``body`` with (empty: answer with text)."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice") or {}
    messages = body.get("messages") or []
    if not tools or choice.get("type") == "none" or tool_results_text(messages) is not None:
        return []
    if choice.get("type") == "tool":
        tools = [t for t in tools if t.get("name") == choice.get("name")]
    elif choice.get("disable_parallel_tool_use"):
        tools = tools[:1]
    text = _last_user_text(messages)
    return [{"type": "tool_use", "id": f"toolu_emu{sequence}_{i}", "name": t.get("name"),
             "input": json.loads(_arguments(t.get("input_schema"), text))} for i, t in enumerate(tools)]  # fmt: skip


def anthropic_tool_events(uses: list[dict[str, Any]], first_index: int) -> list[tuple[str | None, dict[str, Any]]]:
    """Stream events of ``uses``: a block start, the input JSON in two pieces, a block stop each."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    for offset, use in enumerate(uses):
        index = first_index + offset
        arguments = json.dumps(use["input"])
        half = len(arguments) // 2
        events.append(("content_block_start", {"type": "content_block_start", "index": index,
                                               "content_block": {**use, "input": {}}}))  # fmt: skip
        for piece in (arguments[:half], arguments[half:]):
            delta = {"type": "input_json_delta", "partial_json": piece}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events
