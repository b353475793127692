"""The echo backend: deterministic answers with no model, for tests and benchmarks.

It answers ``echo: <text of the last user message>`` (a text completion: ``echo: <prompt>``; asked for JSON,
``{"echo": <text>}``). A token is a
whitespace-separated word, both for the prompt (all messages) and the answer, so usage is exact and predictable.
Embeddings are unit vectors drawn from a generator seeded by the input (equal inputs, equal vectors, in any
process), of the registry's ``embeddings.dimensions``; a token-id input counts its ids as tokens. Parameters (registry
``params``): ``delay_ms`` sleeps that long per request, to emulate a slow model; ``load_ms`` that long
at load; ``wake_ms`` makes the model sleep-capable, as vLLM's sleep mode on a GPU is (a budgeted worker
parks it instead of unloading it), waking taking that long; asked to generate while asleep it fails every
request. A streamed request is answered word by word, ``delay_ms`` spread over its words.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from inferpool._exceptions import ContextLengthExceeded, ProviderError
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.settings import Settings
from inferpool.state.streams import DeltaSink, current_delta_sink
from inferpool.wire import ChatRequest, CompletionRequest, EmbeddingRequest, FinishReason, pack_vector
from inferpool.workers.backend import EmbeddingOutcome, Embeddings, Generation, GenerationOutcome, parse_params


class EchoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay_ms: float = Field(default=0.0, ge=0.0)
    fail_marker: str | None = Field(
        default=None, description="Fail (provider_error) every request whose last user message contains this."
    )
    load_ms: float = Field(default=0.0, ge=0.0, description="Sleep this long when loading, like a real model.")
    wake_ms: float | None = Field(
        default=None, ge=0.0, description="Sleep-capable (like vLLM's sleep mode): waking takes this long."
    )


def echo_answer(request: ChatRequest | CompletionRequest) -> str:
    """The full answer the echo backend gives to ``request`` before ``max_tokens`` and stops apply: a chat
    request that asks for JSON (``response_format`` ``json_object`` or ``json_schema``) gets ``{"echo": text}``."""
    text = _last_user_text(request)
    return json.dumps({"echo": text}, ensure_ascii=False) if _asks_json(request) else f"echo: {text}"


def _asks_json(request: ChatRequest | CompletionRequest) -> bool:
    response_format = (request.response_format if isinstance(request, ChatRequest) else None) or {}
    return response_format.get("type") in ("json_object", "json_schema")


def echo_vector(item: str | list[int], dimensions: int) -> list[float]:
    """The unit vector the echo backend gives an input."""
    seed = hashlib.blake2b(repr(item).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    rng = random.Random(int.from_bytes(seed, "big"))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _last_user_text(request: ChatRequest | CompletionRequest) -> str:
    if isinstance(request, CompletionRequest):
        return request.prompt_text()
    last_user = next((m for m in reversed(request.messages) if m.role == "user"), request.messages[-1])
    return last_user.text()


#: ASCII bytes mapped to b" " (whitespace, as ``str.split`` sees it) or b"x" (anything else).
_WORD_CHARS = bytes(32 if chr(code).isspace() else 120 for code in range(128)) + bytes(128)


def count_words(text: str) -> int:
    """``len(text.split())``, without making the list: for ASCII text (the common case), the words are
    counted as the starts of runs of non-space bytes, in C (5x faster on a 4,000-character prompt)."""
    if not text.isascii():
        return len(text.split())
    marks = text.encode("ascii").translate(_WORD_CHARS)
    return marks.count(b" x") + (marks[:1] == b"x")


class EchoBackend:
    name = "echo"

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.params = parse_params(EchoParams, spec, self.name)
        if self.params.load_ms:
            time.sleep(self.params.load_ms / 1000)
        self.asleep = False

    def can_sleep(self) -> bool:
        return self.params.wake_ms is not None

    async def sleep(self) -> None:
        self.asleep = True

    async def wake(self) -> None:
        await asyncio.sleep((self.params.wake_ms or 0.0) / 1000)
        self.asleep = False

    async def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationOutcome]:
        return await self._generate(requests)

    async def _generate(self, requests: Sequence[ChatRequest | CompletionRequest]) -> list[GenerationOutcome]:
        if self.asleep:  # a worker that served a sleeping model would be a bug: make it visible
            return [ProviderError(f"model {self.spec.name!r} is asleep") for _ in requests]
        sink = current_delta_sink()
        if sink is not None and len(requests) == 1:
            return [await self._stream(requests[0], sink)]
        if self.params.delay_ms:
            await asyncio.sleep(self.params.delay_ms / 1000 * len(requests))
        return [self._answer(request) for request in requests]

    async def _stream(self, request: ChatRequest | CompletionRequest, sink: DeltaSink) -> GenerationOutcome:
        """The same answer, word by word (``delay_ms`` spread over the words); stops if the reader hangs up."""
        answer = self._answer(request)
        if not isinstance(answer, Generation):
            return answer
        words = answer.text.split(" ")
        pause = self.params.delay_ms / 1000 / max(1, len(words))
        for index, word in enumerate(words):
            await asyncio.sleep(pause)
            if sink.cancelled:
                break
            sink.emit(word if index == 0 else " " + word)
        return answer

    async def complete(self, requests: Sequence[CompletionRequest]) -> list[GenerationOutcome]:
        """A text completion answers ``echo: <prompt>`` (one prompt per request: ``workers.kinds`` splits lists)."""
        return await self._generate(requests)

    async def embed(self, requests: Sequence[EmbeddingRequest]) -> list[EmbeddingOutcome]:
        if self.asleep:
            return [ProviderError(f"model {self.spec.name!r} is asleep") for _ in requests]
        if self.params.delay_ms:
            await asyncio.sleep(self.params.delay_ms / 1000 * len(requests))
        return [self._embed(request) for request in requests]

    def _embed(self, request: EmbeddingRequest) -> EmbeddingOutcome:
        caps = self.spec.capabilities.embeddings
        dimensions = caps.dimensions if caps is not None else 8
        limit = caps.max_input_tokens if caps is not None else self.spec.capabilities.context_window
        vectors, tokens = [], 0
        for index, item in enumerate(request.inputs()):
            if isinstance(item, str) and self.params.fail_marker is not None and self.params.fail_marker in item:
                return ProviderError(f"injected failure: input {index} contains {self.params.fail_marker!r}")
            count = count_words(item) if isinstance(item, str) else len(item)
            if count > limit:
                return ContextLengthExceeded(f"input {index} is {count} tokens, more than model {self.spec.name!r} "
                                             f"takes ({limit}); shorten or split it")  # fmt: skip
            tokens += count
            vectors.append(pack_vector(echo_vector(item, dimensions)))
        return Embeddings(vectors=tuple(vectors), prompt_tokens=tokens)

    def _answer(self, request: ChatRequest | CompletionRequest) -> GenerationOutcome:
        caps = self.spec.capabilities
        if self.params.fail_marker is not None and self.params.fail_marker in echo_answer(request):
            return ProviderError(f"injected failure: the prompt contains {self.params.fail_marker!r}")
        if isinstance(request, CompletionRequest):
            prompt_tokens = count_words(request.prompt_text())
        else:
            prompt_tokens = sum(count_words(m.text()) for m in request.messages)
        limit = request.output_limit() or caps.default_max_tokens
        if prompt_tokens + limit > caps.context_window:
            return ContextLengthExceeded(
                f"the prompt is {prompt_tokens} tokens and max_tokens is {limit}, more than model "
                f"{self.spec.name!r}'s context window of {caps.context_window}; shorten the prompt or lower max_tokens"
            )
        # Only the first ``limit`` words are split off (a long prompt is not cut into a list it then drops):
        # a word count over ``limit`` leaves the unsplit rest as one more item. The answer's first word is
        # "echo:", so the prompt is split as it is (not copied behind "echo: " first).
        words = ["echo:", *_last_user_text(request).split(maxsplit=limit - 1)]  # limit >= 1 (registry, request)
        finish: FinishReason = "stop"
        if len(words) > limit:
            words, finish = words[:limit], "length"
        text = " ".join(words)
        if _asks_json(request) and finish == "stop":  # a JSON answer whole, or the words cut as any answer
            text = echo_answer(request)
        for stop in request.stop_sequences():
            cut = text.find(stop)
            if cut != -1:
                text, finish = text[:cut], "stop"
        return Generation(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=count_words(text),
            first_token_at=time.time(),  # the whole answer, first token included, exists from this moment
        )

    async def aclose(self) -> None:
        return None
