"""``redact-pii``: an inferpool hook that replaces email addresses and phone numbers in prompts before
the backend sees them (so they never reach a cloud provider), optionally in answers too, and refuses
prompts containing phrases a team has blocked. Chat messages, completion prompts and embedding inputs alike.

Registry::

    models:
      - name: gpt-4o-mini
        backend: openai
        hooks:
          - name: redact-pii
            params: {redact_answers: true, block: ["internal only"]}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from inferpool.hooks import Generation, Hook, Reject
from inferpool.wire import AnyRequest, ChatMessage, CompletionRequest, EmbeddingRequest, TextPart

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# International or national numbers: optional +country code and (area code), then groups of digits with
# spaces, dots or dashes between them, 7 digits or more in all. ISO dates and short numbers are left alone.
PHONE = re.compile(
    r"(?<![\w+(])(?!\d{4}-\d{2}-\d{2}(?!\d))"  # not inside a word, and not an ISO date
    r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w)"
)


class RedactParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email_placeholder: str = "[email]"
    phone_placeholder: str = "[phone]"
    redact_answers: bool = Field(default=False, description="Also redact the model's answers.")
    block: list[str] = Field(default_factory=list, description="Refuse prompts containing any of these (any case).")


def redact(text: str, params: RedactParams) -> str:
    text = EMAIL.sub(params.email_placeholder, text)
    return PHONE.sub(lambda m: params.phone_placeholder if _digits(m.group()) >= 7 else m.group(), text)


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


class RedactPII(Hook):
    """Redacts emails and phone numbers in every message's text; refuses blocked phrases."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = RedactParams.model_validate(dict(params))
        self._blocked = [phrase.lower() for phrase in self.params.block]

    def before_request(self, request: AnyRequest) -> AnyRequest:
        lowered = request.prompt_text().lower()
        for phrase in self._blocked:
            if phrase in lowered:
                raise Reject(f"the prompt contains the blocked phrase {phrase!r}")
        if isinstance(request, CompletionRequest):
            prompt = request.prompt
            texts = redact(prompt, self.params) if isinstance(prompt, str) else [redact(p, self.params) for p in prompt]
            return request.model_copy(update={"prompt": texts})
        if isinstance(request, EmbeddingRequest):
            value = request.input
            if isinstance(value, str):
                return request.model_copy(update={"input": redact(value, self.params)})
            inputs = [redact(item, self.params) if isinstance(item, str) else item for item in value]
            return request.model_copy(update={"input": inputs})
        return request.model_copy(update={"messages": [self._redacted(m) for m in request.messages]})

    def after_result(self, request: AnyRequest, generation: Generation) -> Generation:
        if not self.params.redact_answers:
            return generation
        return dataclasses.replace(generation, text=redact(generation.text, self.params))

    def _redacted(self, message: ChatMessage) -> ChatMessage:
        if isinstance(message.content, str):
            return message.model_copy(update={"content": redact(message.content, self.params)})
        if isinstance(message.content, list):
            parts = [part.model_copy(update={"text": redact(part.text, self.params)}) if isinstance(part, TextPart)
                     else part for part in message.content]  # fmt: skip
            return message.model_copy(update={"content": parts})
        return message
