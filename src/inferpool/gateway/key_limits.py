"""A key's limits, applied to each request the gateway serves: the models it may use (others are OpenAI's
404 ``model_not_found``, as if they did not exist), requests and tokens per minute and requests in flight
(OpenAI's 429 ``rate_limit_exceeded`` with ``Retry-After`` from the limiter, ``inferpool.state.key_limits``).

Tokens are counted at admission as OpenAI counts them against a TPM limit: the prompt's estimated tokens
(a token per 4 characters) plus the most the answer may take (``max_tokens``, else the model's default), times
``n``. A key with no limits costs nothing here: no Redis call.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from inferpool.gateway.errors import HTTPError
from inferpool.gateway.keys import ApiKeyInfo, KeyLimits
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.key_limits import KeyLimitStore, Refusal
from inferpool.wire import AnyRequest, ChatRequest, CompletionRequest, new_id

#: Characters per token when estimating a prompt's tokens for a TPM limit (OpenAI's rule of thumb).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant, and the key (None when the gateway runs without keys)."""

    tenant: str
    key: ApiKeyInfo | None = None

    @property
    def limits(self) -> KeyLimits | None:
        return self.key.limits if self.key is not None else None

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key is not None else None


@dataclass(frozen=True)
class Ticket:
    """An admitted request's slot, given back when it ends."""

    key_id: str
    member: str


def allowed_models(registry: Registry, limits: KeyLimits | None) -> frozenset[str] | None:
    """The registry names a key may use (its list with aliases resolved); None: every model."""
    if limits is None or limits.models is None:
        return None
    return frozenset(registry.get(name).name if name in registry else name for name in limits.models)


def model_not_found(name: str) -> HTTPError:
    return HTTPError(404, f"The model `{name}` does not exist or you do not have access to it.",
                     code="model_not_found", param="model")  # fmt: skip


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


class KeyLimiter:
    """Checks a request against its key's limits; ``admit`` returns the ticket to ``release`` when it ends."""

    def __init__(self, store: KeyLimitStore, registry: Registry, slot_s: float) -> None:
        self._store = store
        self._registry = registry
        self._slot_s = slot_s  # an open request's slot lapses after this (its gateway died holding it)

    def check_model(self, caller: Caller, requested: str, served: str) -> None:
        """404 unless the key may use ``served`` (the model a request was routed to)."""
        allowed = allowed_models(self._registry, caller.limits)
        if allowed is not None and served not in allowed:
            raise model_not_found(requested if requested in self._registry or requested == served else served)

    def allowed(self, caller: Caller) -> Collection[str] | None:
        return allowed_models(self._registry, caller.limits)

    async def admit(self, caller: Caller, request: AnyRequest, spec: ModelSpec) -> Ticket | None:
        """Admit ``request`` under its key's rates and in-flight cap, or raise the 429."""
        limits = caller.limits
        if caller.key is None or limits is None or not (limits.rpm or limits.tpm or limits.max_in_flight):
            return None
        member = new_id("lim")
        refusal = await self._store.admit(caller.key.key_id, rpm=limits.rpm, tpm=limits.tpm,
                                          max_in_flight=limits.max_in_flight, tokens=estimate_tokens(request, spec),
                                          member=member, slot_s=self._slot_s)  # fmt: skip
        if refusal is not None:
            raise _too_many(refusal, limits, estimate_tokens(request, spec))
        return Ticket(caller.key.key_id, member) if limits.max_in_flight else None

    async def release(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            await self._store.release(ticket.key_id, ticket.member)


def _too_many(refusal: Refusal, limits: KeyLimits, tokens: int) -> HTTPError:
    wait_s = max(1, math.ceil(refusal.retry_after_ms / 1000))
    headers = {"retry-after": str(wait_s)}
    if refusal.limit == "rpm":
        message, kind = f"Rate limit reached for requests per minute on this key: limit {limits.rpm}", "requests"
    elif refusal.limit == "tpm":
        message = f"Rate limit reached for tokens per minute on this key: limit {limits.tpm}, requested {tokens}"
        kind = "tokens"
    elif refusal.limit == "tpm_request":
        return HTTPError(429, f"Request too large for this key's tokens per minute: limit {limits.tpm}, requested "
                         f"{tokens} (prompt estimate plus max_tokens); lower max_tokens or shorten the prompt.",
                         type_="tokens", code="rate_limit_exceeded")  # fmt: skip
    else:
        message, kind = f"This key has {limits.max_in_flight} requests open, its limit", "requests"
    return HTTPError(429, f"{message}. Please try again in {wait_s} s.", type_=kind, code="rate_limit_exceeded",
                     headers=headers)  # fmt: skip
