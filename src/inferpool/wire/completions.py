"""Text completions: OpenAI's ``/v1/completions`` body (a raw prompt, no chat template) and its
``text_completion`` object, whole or streamed."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferpool.wire.requests import RoutingHints, StreamOptions, check_json_depth, check_stops
from inferpool.wire.tokens import FinishReason, Usage

COMPLETIONS_URL = "/v1/completions"
#: OpenAI's default ``max_tokens`` for completions (chat's default is the model's own).
DEFAULT_COMPLETION_TOKENS = 16
#: Most prompts one request may carry.
MAX_PROMPTS = 2048

_STRICT = ConfigDict(extra="forbid")


class CompletionRequest(BaseModel):
    """The OpenAI completions request body. ``prompt`` is a text or a list of texts (each answered with ``n``
    choices, indexed prompt by prompt, as OpenAI does); ``routing`` and ``cache`` are inferpool's own."""

    model_config = _STRICT
    kind: ClassVar[str] = "completions"
    url: ClassVar[str] = COMPLETIONS_URL

    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1, description=f"Default {DEFAULT_COMPLETION_TOKENS}, as OpenAI.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=128)
    best_of: int | None = Field(default=None, ge=1, le=20)
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Log probabilities of this many top tokens.")
    echo: bool | None = Field(default=None, description="Return the prompt in front of the completion.")
    suffix: str | None = Field(default=None, description="Text after the completion (insert mode), where served.")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = Field(
        default=None,
        description="vLLM's extension (its own server takes it too): generate max_tokens tokens, past the "
        "end-of-sequence token, as fixed-length benchmarks need. Served by vLLM models only.",
    )
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    routing: RoutingHints | None = None
    cache: bool | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}; split them")
        return value

    _at_most_four_stops = field_validator("stop")(check_stops)

    @field_validator("logit_bias")
    @classmethod
    def _shallow(cls, value: object) -> object:
        check_json_depth(value)
        return value

    @model_validator(mode="after")
    def _openai_rules(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.stream and self.best_of is not None and self.best_of > 1:
            raise ValueError("best_of cannot be used with stream")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("stream one prompt per request (prompt is a list of several)")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def prompt_text(self) -> str:
        """The prompts joined: for length estimates and prefix keys, never sent."""
        return self.prompt if isinstance(self.prompt, str) else "\n".join(self.prompt)

    def output_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_TOKENS

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    """The OpenAI ``text_completion`` object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None


class CompletionChunk(BaseModel):
    """One piece of a streamed completion (OpenAI streams ``text_completion`` objects; the last carries usage
    and no choices, with ``stream_options.include_usage``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    @property
    def text(self) -> str:
        return next((choice.text for choice in self.choices if choice.index == 0), "")
