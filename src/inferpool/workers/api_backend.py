"""What the OpenAI and Anthropic backends share: keys, concurrency, shared rate limits, retries.

One worker process keeps many requests in flight on its event loop (``max_concurrency``), each going
through: translate (a bad request fails at once) -> wait for the shared rate limit -> call the provider
through its official async SDK -> classify failures. 429, 5xx, timeouts, connection errors and malformed
bodies are retried with exponential backoff and jitter, honouring ``Retry-After``; 4xx errors end at once
with the provider's message. The attempts a request took are recorded in its result.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field

from inferpool._exceptions import ProviderError, RequestError
from inferpool.constants import STREAM_CANCELLED_CODE
from inferpool.model_registry.spec import ModelSpec
from inferpool.plumbing.redis_connection import async_redis_from_url
from inferpool.plumbing.settings import Settings, read_api_key
from inferpool.state.streams import current_delta_sink
from inferpool.wire import AnyRequest, ChatRequest, FinishReason
from inferpool.workers.backend import (
    Embeddings,
    Generation,
    GenerationOutcome,
    Outcome,
    gather_outcomes,
    parse_params,
    tool_call,
)
from inferpool.workers.ratelimit import RateLimitSpec, SharedRateLimiter, limit_group

_RETRYABLE_STATUS = frozenset({408, 409, 429})


class ApiParams(BaseModel):
    """Registry ``params`` of an API model."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, description="The provider's model name (default: the registry name).")
    base_url: str | None = Field(default=None, description="Default: the SDK's (OPENAI_BASE_URL / ANTHROPIC_BASE_URL).")
    api_key_env: str | None = Field(default=None, description="Variable holding the key (default per provider).")
    api_key_file: Path | None = Field(default=None, description="A secrets file holding the key, instead.")
    no_api_key: bool = Field(default=False, description="For local OpenAI-compatible servers that need none.")
    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    max_concurrency: int = Field(default=64, ge=1, description="Requests in flight per worker process.")
    rate_limit: RateLimitSpec | None = None
    stream: bool = Field(
        default=False,
        description="Call the provider with streaming, to record time to first token (the answer is the same).",
    )


@dataclass(frozen=True)
class ApiFailure(Exception):
    """A provider call that failed; ``retryable`` decides whether it is tried again."""

    message: str
    retryable: bool
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ProviderReply:
    generation: Generation | Embeddings
    headers: Mapping[str, str]


#: The longest ``Retry-After`` honoured: a provider (or a broken proxy) asking for more, or for ``inf``,
#: is retried after this long instead (the attempts still run out, and the request moves on or fails).
MAX_RETRY_AFTER_S = 120.0
_DURATION_PART = re.compile(r"([0-9.]+)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``Retry-After`` (or ``retry-after-ms``) if the provider sent a usable one, capped at
    ``MAX_RETRY_AFTER_S``; values that are not finite numbers are ignored."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return min(MAX_RETRY_AFTER_S, max(0.0, seconds))
    return None


def exhausted_limit_seconds(headers: Mapping[str, str]) -> float | None:
    """If ``x-ratelimit-remaining-requests`` says 0, how long until the reset (OpenAI's ``6m0s`` form),
    at most ``MAX_RETRY_AFTER_S``; an unreadable reset counts as one second."""
    if headers.get("x-ratelimit-remaining-requests") != "0":
        return None
    seconds = 0.0
    for number, unit in _DURATION_PART.findall(headers.get("x-ratelimit-reset-requests", "1s")):
        try:
            seconds += float(number) * _DURATION_UNITS[unit]
        except ValueError:
            continue
    return min(MAX_RETRY_AFTER_S, seconds) if math.isfinite(seconds) and seconds > 0 else 1.0


class ApiBackend(ABC):
    """Base of the API-proxy backends. Subclasses translate requests and call their SDK."""

    name = "api"
    provider = "api"
    default_key_env = ""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.params = parse_params(ApiParams, spec, self.name)
        self.provider_model = self.params.model or spec.name
        self._api_key = read_api_key(self.params, self.default_key_env)
        self._redis_url = settings.redis_url
        self._limiter: SharedRateLimiter | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._rng = random.Random()

    # -- what a provider implements --------------------------------------------------------------------

    @abstractmethod
    def translate(self, request: ChatRequest) -> dict[str, Any]:
        """The SDK call's arguments for ``request``; raise ``RequestError`` for what the provider cannot do."""

    @abstractmethod
    async def call(self, arguments: dict[str, Any]) -> ProviderReply:
        """Send one request; raise ``ApiFailure`` on failure."""

    @abstractmethod
    async def close_client(self) -> None: ...

    # -- the shared machinery --------------------------------------------------------------------------

    def _ensure_loop_state(self) -> tuple[asyncio.Semaphore, SharedRateLimiter | None]:
        """Event-loop bound objects, made on first use inside the worker's backend loop."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.params.max_concurrency)
            if self.params.rate_limit is not None and self._redis_url:
                self._redis = async_redis_from_url(self._redis_url)
                group = limit_group(self.provider, self.params.base_url, self._api_key)
                self._limiter = SharedRateLimiter(self._redis, group, self.params.rate_limit)
        return self._semaphore, self._limiter

    async def call_kind(self, kind: str, arguments: dict[str, Any]) -> ProviderReply:
        """Send one request of ``kind`` (chat: ``call``); a provider serving more kinds overrides this."""
        if kind != "chat":
            raise ApiFailure(f"{self.provider} does not serve {kind}", retryable=False)
        return await self.call(arguments)

    def translate_any(self, request: AnyRequest) -> dict[str, Any]:
        """The SDK call's arguments for any kind (chat: ``translate``); a provider serving more kinds overrides it."""
        if not isinstance(request, ChatRequest):
            raise ProviderError(f"{self.provider} does not serve {request.kind}")
        return self.translate(request)

    async def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationOutcome]:
        return cast(list[GenerationOutcome], await self.serve_all(requests))

    async def serve_all(self, requests: Sequence[AnyRequest]) -> list[Outcome]:
        """Every request through ``_serve``, together (a request's kind decides its answer's type: a chat or
        completion request gets a ``Generation``, an embeddings request ``Embeddings``)."""
        return await gather_outcomes(self.name, (self._serve(request) for request in requests))

    async def _serve(self, request: AnyRequest) -> Outcome:
        try:
            arguments = self.translate_any(request)
        except RequestError as exc:
            return exc
        semaphore, limiter = self._ensure_loop_state()
        default = self.spec.capabilities.default_max_tokens if isinstance(request, ChatRequest) else 0
        estimate = len(request.prompt_text()) // 4 + (request.output_limit() or default)
        sink = current_delta_sink()
        async with semaphore:
            attempt = 0
            while True:
                if sink is not None and sink.cancelled:  # its reader hung up while it waited: never sent again
                    return RequestError("the client stopped reading the stream; generation was stopped",
                                        code=STREAM_CANCELLED_CODE, attempts=max(1, attempt))  # fmt: skip
                attempt += 1
                if limiter is not None:
                    await limiter.acquire(estimate)
                try:
                    reply = await self.call_kind(request.kind, arguments)
                except ApiFailure as failure:
                    if failure.retry_after_s and limiter is not None:
                        await limiter.pause(failure.retry_after_s)
                    if not failure.retryable or attempt >= self.params.max_attempts:
                        tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                        return ProviderError(f"{self.provider}: {failure.message} (after {tries})", attempts=attempt)
                    await asyncio.sleep(self._backoff(attempt, failure.retry_after_s))
                    continue
                pause = exhausted_limit_seconds(reply.headers)
                if pause is not None and limiter is not None:
                    await limiter.pause(pause)
                return replace(reply.generation, attempts=attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, never shorter than the provider's ``Retry-After``."""
        ceiling = min(self.params.backoff_max_s, self.params.backoff_base_s * 2 ** (attempt - 1))
        delay = self._rng.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)

    async def aclose(self) -> None:
        await self.close_client()
        if self._redis is not None:
            await self._redis.aclose()


def streamed_generation(
    parts: list[str], finish_reason: FinishReason | None, prompt_tokens: int, completion_tokens: int,
    first_token_at: float | None, *, missing: str, tool_calls: Sequence[dict[str, Any]] = (),
) -> Generation:  # fmt: skip
    """The answer a provider streamed; a stream that ended without its ``missing`` field is retried."""
    if finish_reason is None:
        raise ApiFailure(f"the stream ended before the answer did (no {missing})", retryable=True)
    return Generation(text="".join(parts), finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, first_token_at=first_token_at,
                      tool_calls=tuple(tool_calls))  # fmt: skip


def stopped_generation(parts: list[str], first_token_at: float | None) -> Generation:
    """What a provider streamed before its reader hung up and the stream was closed (the worker turns it into
    ``request_cancelled``); the provider reports no usage for a stream cut short."""
    return Generation(text="".join(parts), finish_reason="stop", prompt_tokens=0, completion_tokens=0,
                      first_token_at=first_token_at)  # fmt: skip


class StreamedToolCalls:
    """Tool calls a provider streams in pieces, put back together by their index: a call's first piece
    names it (id, function name), later pieces add to its arguments' JSON text. ``empty_arguments`` is
    what a call whose arguments never came is given."""

    def __init__(self, empty_arguments: str = "") -> None:
        self._calls: dict[int, dict[str, str]] = {}
        self._empty = empty_arguments

    def piece(self, index: int, *, call_id: str | None = None, name: str | None = None, arguments: str = "") -> None:
        call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        call["id"] = call_id or call["id"]
        call["name"] = name or call["name"]
        call["arguments"] += arguments

    def calls(self) -> list[dict[str, Any]]:
        return [tool_call(c["id"], c["name"], c["arguments"] or self._empty) for _, c in sorted(self._calls.items())]


async def maybe_await(value: Any) -> Any:
    """``value``, awaited if it is awaitable (SDK response helpers differ between versions)."""
    return await value if inspect.isawaitable(value) else value


def classify_sdk_error(exc: Exception, sdk: Any) -> ApiFailure:
    """Turn an openai/anthropic SDK exception (same Stainless shapes) into an ``ApiFailure``."""
    if isinstance(exc, sdk.APIStatusError):
        status = int(exc.status_code)
        headers = dict(exc.response.headers) if exc.response is not None else {}
        retryable = status in _RETRYABLE_STATUS or status >= 500
        return ApiFailure(f"HTTP {status}: {exc.message}", retryable, retry_after_seconds(headers))
    if isinstance(exc, sdk.APITimeoutError):
        return ApiFailure("the request timed out", True)
    if isinstance(exc, sdk.APIConnectionError):
        return ApiFailure(f"connection error: {exc}", True)
    if isinstance(exc, sdk.APIResponseValidationError | ValueError):
        return ApiFailure(f"malformed response body: {exc}", True)
    raise exc
