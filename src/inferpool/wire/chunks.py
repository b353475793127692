"""Streamed answers as OpenAI sends them: ``chat.completion.chunk`` objects (and, for text completions,
``text_completion`` ones made from them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from inferpool.wire.completions import CompletionChunk, CompletionChunkChoice
from inferpool.wire.tokens import FinishReason, Usage

# -- the chunk objects (OpenAI ``chat.completion.chunk``) -------------------------------------------------


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="Tool calls, whole, in the choice's last delta (each with its ``index``)."
    )


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    """One piece of a streamed answer, as OpenAI's API streams it. The last chunk of a stream has no
    choices and carries ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None

    @property
    def text(self) -> str:
        """The first choice's new text (empty when the chunk carries none)."""
        for choice in self.choices:
            if choice.index == 0:
                return choice.delta.content or ""
        return ""


def as_completion_chunk(chunk: ChatCompletionChunk) -> CompletionChunk:
    """The same piece of a streamed text completion, as OpenAI streams those (``text_completion`` objects with
    ``text`` where chat has ``delta.content``)."""
    choices = [CompletionChunkChoice(index=choice.index, text=choice.delta.content or "",
                                     finish_reason=choice.finish_reason, logprobs=choice.logprobs)
               for choice in chunk.choices]  # fmt: skip
    return CompletionChunk(id="cmpl-" + chunk.id.removeprefix("chatcmpl-"), created=chunk.created, model=chunk.model,
                           choices=choices, usage=chunk.usage)  # fmt: skip
