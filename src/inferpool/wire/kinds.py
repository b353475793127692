"""The request kinds the pool serves, by OpenAI endpoint: chat, text completions and embeddings.

Every layer that carries a request (batch lines, tasks, item records, results) takes any of the three;
``InferenceRequest`` tells them apart by their one required field (``messages``, ``prompt``, ``input``),
which costs nothing next to validating them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag

from inferpool.wire.completions import COMPLETIONS_URL, CompletionRequest
from inferpool.wire.embeddings import EMBEDDINGS_URL, EmbeddingRequest
from inferpool.wire.requests import CHAT_COMPLETIONS_URL, ChatRequest

#: Any request kind, for annotations.
AnyRequest = ChatRequest | CompletionRequest | EmbeddingRequest

#: The request body type each endpoint takes.
REQUEST_TYPES: dict[str, type[AnyRequest]] = {
    CHAT_COMPLETIONS_URL: ChatRequest,
    COMPLETIONS_URL: CompletionRequest,
    EMBEDDINGS_URL: EmbeddingRequest,
}
SUPPORTED_URLS = tuple(REQUEST_TYPES)


def _kind_of(value: Any) -> str:
    if isinstance(value, dict):
        if "messages" in value:
            return "chat"
        if "input" in value:
            return "embeddings"
        if "prompt" in value:
            return "completions"
        return "chat"  # neither: validated as chat, whose error names ``messages``
    kind = getattr(value, "kind", "chat")
    return kind if isinstance(kind, str) else "chat"


#: Any request kind, validated as the one its fields say (for pydantic fields: tasks, records).
InferenceRequest = Annotated[
    Annotated[ChatRequest, Tag("chat")]
    | Annotated[CompletionRequest, Tag("completions")]
    | Annotated[EmbeddingRequest, Tag("embeddings")],
    Discriminator(_kind_of),
]


def supported_urls_text() -> str:
    return ", ".join(repr(url) for url in SUPPORTED_URLS)
