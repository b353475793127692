"""Embeddings: OpenAI's ``/v1/embeddings`` body and its ``list`` of ``embedding`` objects.

Vectors travel and are stored packed: little-endian float32, base64-encoded (OpenAI's own
``encoding_format: base64``), 2,048 characters for a 384-dim vector where JSON floats take ~7,700. A stored
response remembers the format its request asked for (``requested_format``, inferpool's own field), and is
turned into that format only where it leaves the pool (``EmbeddingList.as_requested``, the batch output
line, the gateway).
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferpool.wire.requests import RoutingHints

EMBEDDINGS_URL = "/v1/embeddings"
#: Most inputs one request may carry (OpenAI's limit); a model may allow fewer (registry ``embeddings.max_inputs``).
MAX_EMBEDDING_INPUTS = 2048

_STRICT = ConfigDict(extra="forbid")
EncodingFormat = Literal["float", "base64"]


def pack_vector(values: Any) -> str:
    """One vector (floats, or a float32 numpy array) as base64 of its little-endian float32 bytes."""
    tobytes = getattr(values, "tobytes", None)
    if callable(tobytes) and str(getattr(values, "dtype", "")) == "float32":
        raw = tobytes()
    else:
        raw = array("f", values).tobytes()
    if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
        swapped = array("f", raw)
        swapped.byteswap()
        raw = swapped.tobytes()
    return base64.b64encode(raw).decode("ascii")


def unpack_vector(packed: str) -> list[float]:
    """The floats of a vector ``pack_vector`` made (as OpenAI's SDK decodes ``encoding_format: base64``)."""
    values = array("f", base64.b64decode(packed))
    if sys.byteorder != "little":  # pragma: no cover
        values.byteswap()
    return values.tolist()


class EmbeddingRequest(BaseModel):
    """The OpenAI embeddings request body. ``routing`` and ``cache`` are inferpool's own, as in chat."""

    model_config = _STRICT
    kind: ClassVar[str] = "embeddings"
    url: ClassVar[str] = EMBEDDINGS_URL
    stream: ClassVar[None] = None

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, or token ids (one input, or a list of inputs)."
    )
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Shorter vectors, where the model allows.")
    user: str | None = None
    routing: RoutingHints | None = None
    cache: bool | None = None

    @field_validator("input")
    @classmethod
    def _usable_inputs(cls, value: str | list[str] | list[int] | list[list[int]]) -> Any:
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be empty: give a text, a list of texts or of token ids")
            return value
        if not value:
            raise ValueError("input must not be an empty list: give at least one text")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}; split them over "
                             "several requests (or batch lines)")  # fmt: skip
        for index, item in enumerate(value):
            if isinstance(item, str) and not item:
                raise ValueError(f"input[{index}] is empty; every input must be a non-empty text")
            if isinstance(item, list) and not item:
                raise ValueError(f"input[{index}] is an empty list of token ids")
            if (isinstance(item, int) and item < 0) or (isinstance(item, list) and any(t < 0 for t in item)):
                raise ValueError("token ids must be non-negative integers")
        return value

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: one text, texts, one input of token ids, or several."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [list(value)]  # one input given as token ids
        return list(value)  # type: ignore[arg-type]

    def prompt_text(self) -> str:
        """The text inputs joined (token-id inputs count as nothing): for length estimates, never sent."""
        return "\n".join(item for item in self.inputs() if isinstance(item, str))

    def output_limit(self) -> int | None:
        return None


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32.")

    def vector(self) -> list[float]:
        return unpack_vector(self.embedding) if isinstance(self.embedding, str) else self.embedding


class EmbeddingList(BaseModel):
    """OpenAI's embeddings response (``object: "list"``). Stored with packed vectors; ``as_requested`` gives the
    format the request asked for."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    requested_format: EncodingFormat | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="inferpool's own, in stored results only: the encoding_format the request asked for.",
    )  # fmt: skip

    @property
    def text(self) -> str:
        return ""

    def vectors(self) -> list[list[float]]:
        """Every input's vector, as floats, in input order."""
        return [item.vector() for item in sorted(self.data, key=lambda item: item.index)]

    def as_requested(self) -> EmbeddingList:
        """The response as OpenAI's API gives it: floats unless base64 was asked for; no inferpool field."""
        floats = self.requested_format != "base64"
        data = [Embedding(index=item.index, embedding=item.vector() if floats else item.embedding)
                for item in self.data]  # fmt: skip
        return EmbeddingList(data=data, model=self.model, usage=self.usage)


def openai_embedding_json(response: dict[str, Any]) -> dict[str, Any]:
    """A stored embeddings response (a dict, as read from JSON) in the format its request asked for, in place:
    the fast path of batch output lines (no pydantic model per line)."""
    fmt = response.pop("requested_format", None)
    if fmt != "base64":
        for item in response["data"]:
            if isinstance(item["embedding"], str):
                item["embedding"] = unpack_vector(item["embedding"])
    return response
