"""Results: OpenAI ``chat.completion`` objects (and, from their own modules, ``text_completion`` and embeddings
``list`` objects), plus inferpool's serving stats and errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from inferpool._exceptions import RequestError
from inferpool.wire.completions import Completion
from inferpool.wire.embeddings import EmbeddingList, EmbeddingUsage
from inferpool.wire.tokens import FinishReason, Usage
from inferpool.wire.via import ServedVia


class ErrorInfo(BaseModel):
    """Why one request produced no answer: an OpenAI-style error code and a message saying what to fix."""

    code: str
    message: str

    @classmethod
    def from_exception(cls, exc: RequestError) -> ErrorInfo:
        return cls(code=exc.code, message=exc.message)


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The call's arguments as JSON text, as the model wrote them.")


class ToolCall(BaseModel):
    """A function the model asks the caller to run (OpenAI's shape, whichever provider made it)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda value: value is None)


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """The OpenAI ``chat.completion`` object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None

    @property
    def text(self) -> str:
        """The first choice's text (empty string if it has none)."""
        return self.choices[0].message.content or "" if self.choices else ""


class ServingStats(BaseModel):
    """How a request was served: by which model and worker, how long it waited and ran."""

    model: str
    backend: str
    worker: str
    queued_s: float = Field(ge=0.0, description="Enqueue to start of processing.")
    latency_s: float = Field(ge=0.0, description="Start of processing to result written.")
    ttft_s: float | None = Field(
        default=None, ge=0.0, description="Start of processing to first output token; None where not measurable."
    )
    attempts: int = Field(default=1, ge=1)
    cost_usd: float = Field(default=0.0, ge=0.0, description="From the registry's prices.")
    hooks_s: float | None = Field(default=None, ge=0.0, exclude_if=lambda value: value is None,
                                  description="Time spent in the model's hooks, if it has any.")  # fmt: skip
    cached: bool | None = Field(default=None, exclude_if=lambda value: value is None,
                                description="True: the answer came from the response cache (or an identical "
                                "request).")  # fmt: skip
    via: ServedVia = Field(
        default="realtime",
        description="Which path served it: the provider's real-time API (or a local model), or the provider's own "
        "Batch API (at its batch price).",
    )


def _object_of(value: Any) -> str:
    found = value.get("object") if isinstance(value, dict) else getattr(value, "object", None)
    return found if isinstance(found, str) else "chat.completion"  # chat's was the only one, and optional


#: Any request kind's answer, told apart by its ``object`` (chat's when it has none).
Response = Annotated[
    Annotated[ChatCompletion, Tag("chat.completion")]
    | Annotated[Completion, Tag("text_completion")]
    | Annotated[EmbeddingList, Tag("list")],
    Discriminator(_object_of),
]


class RequestResult(BaseModel):
    """What a worker writes for one request: exactly one of ``response`` or ``error``."""

    request_id: str
    custom_id: str | None = None
    job_id: str | None = None
    tenant: str | None = None
    response: Response | None = None
    error: ErrorInfo | None = None
    stats: ServingStats | None = None
    warnings: list[str] | None = Field(default=None, description="E.g. the requested model is deprecated.")

    @model_validator(mode="after")
    def _exactly_one_outcome(self) -> RequestResult:
        if (self.response is None) == (self.error is None):
            raise ValueError("a result has exactly one of response or error")
        return self

    @property
    def ok(self) -> bool:
        return self.response is not None

    @property
    def usage(self) -> Usage | None:
        """Token counts, the same shape for every kind (an embedding's completion tokens are 0)."""
        if self.response is None:
            return None
        usage = self.response.usage
        if isinstance(usage, EmbeddingUsage):
            return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=0, total_tokens=usage.total_tokens)
        return usage
