"""Tool calls on local engines (vLLM) through structured outputs, as vLLM's own OpenAI server does for
``tool_choice: "required"`` and a named function: generation is constrained to a JSON schema of the
call(s), so any model answers with well-formed calls to the given tools, whatever its chat template.

``tool_choice: "auto"`` (the model decides whether to call) needs the model's own tool-call format and
a parser for it; that is not wired, and such requests are refused with a message saying what to send.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from inferpool._exceptions import CapabilityMismatch, ProviderError
from inferpool.wire import ChatRequest
from inferpool.workers.backend import tool_call


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = tool["function"]
    return function


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    parameters = _function(tool).get("parameters")
    return parameters if isinstance(parameters, dict) and parameters else {"type": "object", "properties": {}}


def tool_call_schema(request: ChatRequest) -> dict[str, Any] | None:
    """The JSON schema the answer must follow to be ``request``'s tool call(s); None to answer with text."""
    if not request.tools or request.tool_choice == "none":
        return None
    if request.n > 1:
        raise CapabilityMismatch("tools with n > 1 are not supported on local engines; send n = 1")
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice["function"]["name"]
        (tool,) = [t for t in request.tools if _function(t)["name"] == name]
        return _parameters(tool)
    if request.tool_choice != "required":
        raise CapabilityMismatch(
            "tool_choice 'auto' is not supported on local engines (the model's own tool-call format is not "
            'parsed); send tool_choice \'required\' or {"type": "function", "function": {"name": ...}}'
        )
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [_function(t)["name"]]},
                                               "arguments": _parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in request.tools]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def tool_calls_from_output(request: ChatRequest, text: str) -> tuple[dict[str, Any], ...]:
    """The calls a constrained answer makes; ``ProviderError`` if it is not complete JSON (cut by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ProviderError(f"the model's tool call is not complete JSON ({exc}); raise max_tokens") from exc
    if isinstance(request.tool_choice, dict):
        return (tool_call(_call_id(), request.tool_choice["function"]["name"], json.dumps(value)),)
    return tuple(tool_call(_call_id(), call["name"], json.dumps(call["arguments"])) for call in value)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tools_prompt(request: ChatRequest) -> str:
    """A system message describing the tools, for chat templates that do not render ``tools`` themselves."""
    described = [{"name": _function(t)["name"], "description": _function(t).get("description", ""),
                  "parameters": _parameters(t)} for t in request.tools or []]  # fmt: skip
    return "You can call these functions; answer with a call as JSON:\n" + json.dumps(described)
