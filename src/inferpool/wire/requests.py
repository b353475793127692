"""Requests: the OpenAI chat-completions body, as inferpool accepts it."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid")
CHAT_COMPLETIONS_URL = "/v1/chat/completions"
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Deepest nesting accepted in a request's free-form JSON (tools, response_format, tool calls). Real
#: schemas nest a few levels; thousands of levels only serve to break a serialiser further down the line.
MAX_JSON_DEPTH = 64


def check_stops(value: str | list[str] | None) -> str | list[str] | None:
    """OpenAI's rule for ``stop``: a string, or at most four of them."""
    if isinstance(value, list) and len(value) > 4:
        raise ValueError("at most 4 stop sequences are allowed")
    return value


def check_json_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``ValueError`` if ``value`` (JSON-like: dicts and lists) nests deeper than ``limit`` (iteratively:
    no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= limit:
                raise ValueError(f"nested more than {limit} levels deep")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of the conversation, in the OpenAI chat format."""

    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _openai_message_rules(self) -> ChatMessage:
        """What OpenAI's API refuses, refused here too (not answered with a 200 and a guess)."""
        if self.role in ("system", "developer", "user") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool":
            if not self.tool_call_id:
                raise ValueError("a tool message needs tool_call_id: the id of the assistant tool call it answers")
            if self.content is None:
                raise ValueError("a tool message needs content: the tool's result")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        return self

    @field_validator("tool_calls")
    @classmethod
    def _shallow_tool_calls(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        check_json_depth(value)
        return value

    def text(self) -> str:
        """The message's text; image parts are not text and are left out (check ``has_images``)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


#: ``model`` value asking the router to choose among models by capability, load and price.
AUTO_MODEL = "auto"

Capability = Literal["vision", "tools", "json_mode", "logprobs", "streaming"]


class RoutingHints(BaseModel):
    """inferpool's one addition to the request body: what ``model: "auto"`` must pick."""

    model_config = _STRICT
    require: list[Capability] = Field(default_factory=list, description="Capabilities the model must have.")
    min_context: int | None = Field(default=None, gt=0, description="Smallest acceptable context window.")
    prefer: Literal["balanced", "cheapest", "fastest"] = Field(
        default="balanced",
        description="balanced: least loaded, then cheapest; cheapest: price first; fastest: lowest p50 latency.",
    )


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = Field(default=None, description="End the stream with a chunk carrying usage.")


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request body. Unknown fields are refused, not silently ignored.

    ``routing`` (used with ``model: "auto"``) and ``cache`` are inferpool's own; never sent to a provider.
    """

    model_config = _STRICT
    kind: ClassVar[str] = "chat"
    url: ClassVar[str] = CHAT_COMPLETIONS_URL

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="A 64-bit signed integer.")
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, description="Functions the model may call.")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    ignore_eos: bool | None = Field(
        default=None,
        description="vLLM's extension (its own server takes it too): generate max_tokens tokens, past the "
        "end-of-sequence token, as fixed-length benchmarks need. Served by vLLM models only.",
    )
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    metadata: dict[str, str] | None = None
    stream: bool | None = Field(default=None, description="Publish the answer as it is generated (``Client.stream``).")
    stream_options: StreamOptions | None = None
    routing: RoutingHints | None = None
    cache: bool | None = Field(
        default=None,
        description="inferpool's own, never sent to a provider: false never uses the response cache, true also "
        "caches a request that samples; unset follows the model's registry entry.",
    )

    @field_validator("response_format", "tools", "tool_choice")
    @classmethod
    def _shallow_json(cls, value: object) -> object:
        check_json_depth(value)
        return value

    @field_validator("tools")
    @classmethod
    def _tools_are_functions(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for index, tool in enumerate(value or []):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict):
                raise ValueError(f'tools[{index}] must be {{"type": "function", "function": {{...}}}}')
            if not isinstance(function.get("name"), str) or not _TOOL_NAME.match(function["name"]):
                raise ValueError(f"tools[{index}].function.name must be 1-64 letters, digits, '_' or '-'")
            if not isinstance(function.get("parameters", {}), dict):
                raise ValueError(f"tools[{index}].function.parameters must be a JSON Schema object")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _known_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", ...}")
        function = value.get("function") if isinstance(value, dict) else None
        if isinstance(value, dict) and not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ValueError("tool_choice must name its function: {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _tool_options_need_tools(self) -> ChatRequest:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(self, name) is not None and not self.tools:
                raise ValueError(f"{name} is only allowed when tools are given")
        if isinstance(self.tool_choice, dict):
            named = self.tool_choice["function"]["name"]
            if named not in {tool["function"]["name"] for tool in self.tools or []}:
                raise ValueError(f"tool_choice names function {named!r}, which is not in tools")
        return self

    @model_validator(mode="after")
    def _tool_messages_answer_calls(self) -> ChatRequest:
        called: set[str] = set()
        for index, message in enumerate(self.messages):
            if message.role == "assistant" and message.tool_calls:
                called.update(str(call.get("id")) for call in message.tool_calls)
            elif message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(f"messages[{index}] answers tool_call_id {message.tool_call_id!r}, which no earlier "
                                 "assistant message called")  # fmt: skip
        return self

    _at_most_four_stops = field_validator("stop")(check_stops)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    def output_limit(self) -> int | None:
        """The requested cap on generated tokens, whichever name it was given under."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt_text(self) -> str:
        """The messages' text joined: for length estimates, never sent."""
        return "\n".join(message.text() for message in self.messages)

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]
