"""An API key's limits applied to a request, where the gateway and the client library share them: the models
the key may use (others do not exist for it: ``ModelNotFound``), and what a request counts against a tokens-per-
minute limit. ``KeyGate`` applies a key to the client library (``Client(api_key=...)``): its tenant, its models,
its requests and tokens per minute and its spend budget; requests in flight are capped by the gateway only (a
library call does not hold a connection open for its answer).

Tokens are counted at admission as OpenAI counts them against a TPM limit: the prompt's estimated tokens
(a token per 4 characters) plus the most the answer may take (``max_tokens``, else the model's default), times
``n``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection

import redis

from inferpool._exceptions import ConfigurationError, ModelNotFound, RateLimited
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.api_keys import ApiKeyInfo, KeyLimits, key_info_sync
from inferpool.state.key_limits import Refusal, SyncKeyLimitStore
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest, new_id

#: Characters per token when estimating a prompt's tokens for a TPM limit (OpenAI's rule of thumb).
CHARS_PER_TOKEN = 4
#: Seconds the client library trusts a key's limits before reading them again (``keys set`` applies within this).
REFRESH_S = 2.0


def allowed_models(registry: Registry, limits: KeyLimits | None) -> frozenset[str] | None:
    """The registry names a key may use (its list with aliases resolved); None: every model."""
    if limits is None or limits.models is None:
        return None
    return frozenset(registry.get(name).name if name in registry else name for name in limits.models)


def check_model(registry: Registry, limits: KeyLimits | None, requested: str, served: str) -> None:
    """``ModelNotFound`` (as OpenAI words it) unless the key may use ``served``, the model a request was routed to."""
    allowed = allowed_models(registry, limits)
    if allowed is not None and served not in allowed:
        name = requested if requested in registry or requested == served else served
        raise ModelNotFound(f"The model `{name}` does not exist or you do not have access to it.")


def estimate_tokens(request: AnyRequest, spec: ModelSpec) -> int:
    """What a request counts against a tokens-per-minute limit (see the module's docstring)."""
    if isinstance(request, ChatRequest):
        chars = sum(len(message.text()) for message in request.messages)
    elif isinstance(request, CompletionRequest):
        chars = sum(len(prompt) for prompt in request.prompts())
    else:
        chars = sum(len(item) if isinstance(item, str) else len(item) * CHARS_PER_TOKEN for item in request.inputs())
    output = 0 if request.kind == "embeddings" else (request.output_limit() or spec.capabilities.default_max_tokens)
    choices = getattr(request, "n", 1) or 1
    return math.ceil(chars / CHARS_PER_TOKEN) + output * choices


def rate_limited(refusal: Refusal, limits: KeyLimits, tokens: int) -> RateLimited:
    """The error for a refusal of the key's limiter, with when to retry."""
    wait_s = max(1, math.ceil(refusal.retry_after_ms / 1000))
    if refusal.limit == "rpm":
        return RateLimited(f"Rate limit reached for requests per minute on this key: limit {limits.rpm}. Please try "
                           f"again in {wait_s} s.", retry_after_s=wait_s)  # fmt: skip
    if refusal.limit == "tpm":
        message = f"Rate limit reached for tokens per minute on this key: limit {limits.tpm}, requested {tokens}."
        return RateLimited(f"{message} Please try again in {wait_s} s.", retry_after_s=wait_s, limit="tokens")
    if refusal.limit == "tpm_request":
        message = f"Request too large for this key's tokens per minute: limit {limits.tpm}, requested {tokens}"
        return RateLimited(f"{message} (prompt estimate plus max_tokens); lower max_tokens or shorten the prompt.",
                           retry_after_s=0, limit="tokens")  # fmt: skip
    return RateLimited(f"This key has {limits.max_in_flight} requests open, its limit. Please try again in {wait_s} s.",
                       retry_after_s=wait_s)  # fmt: skip


class KeyGate:
    """The client library's view of its API key: tenant, models, rates (read again every ``REFRESH_S``)."""

    def __init__(self, registry: Registry, client: redis.Redis, key: str) -> None:
        self._registry = registry
        self._redis = client
        self._key = key
        self._store = SyncKeyLimitStore(client)
        self._info = self._read()
        self._read_at = time.monotonic()

    def _read(self) -> ApiKeyInfo:
        info = key_info_sync(self._redis, self._key)
        if info is None:
            raise ConfigurationError("the API key is unknown or revoked (an operator creates keys with `inferpool keys "
                                     "create --tenant NAME`)")  # fmt: skip
        return info

    @property
    def info(self) -> ApiKeyInfo:
        if time.monotonic() - self._read_at > REFRESH_S:
            self._info, self._read_at = self._read(), time.monotonic()
        return self._info

    def allowed(self) -> Collection[str] | None:
        return allowed_models(self._registry, self.info.limits)

    def admit(self, request: AnyRequest, spec: ModelSpec) -> None:
        """``ModelNotFound`` for a model the key may not use, ``RateLimited`` past its rates; else recorded."""
        info = self.info
        limits = info.limits
        check_model(self._registry, limits, request.model, spec.name)
        if not (limits.rpm or limits.tpm):
            return
        tokens = estimate_tokens(request, spec)
        refusal = self._store.admit(info.key_id, rpm=limits.rpm, tpm=limits.tpm, tokens=tokens, member=new_id("lim"))
        if refusal is not None:
            raise rate_limited(refusal, limits, tokens)
