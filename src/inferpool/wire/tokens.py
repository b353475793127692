"""Token counts and finish reasons, shared by every response object (chat, completions, chunks)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class PromptTokensDetails(BaseModel):
    """OpenAI's ``usage.prompt_tokens_details``: ``cached_tokens`` are prompt tokens whose prefill the engine
    skipped (vLLM's prefix cache)."""

    cached_tokens: int = Field(default=0, ge=0)


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    # Left out when the engine does not say (API providers, transformers), so such usage reads as before.
    prompt_tokens_details: PromptTokensDetails | None = Field(default=None, exclude_if=lambda value: value is None)
