"""A key's limits, applied to each request the gateway serves: the models it may use (others are OpenAI's
404 ``model_not_found``, as if they did not exist), requests and tokens per minute and requests in flight
(OpenAI's 429 ``rate_limit_exceeded`` with ``Retry-After`` from the limiter, ``inferpool.state.key_limits``).
What the client library shares with it (the model list, the token estimate, the errors) is in
``inferpool.client.keys``. A key with no limits costs nothing here: no Redis call.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from inferpool.client.keys import allowed_models, check_model, estimate_tokens, rate_limited
from inferpool.model_registry.registry import Registry
from inferpool.model_registry.spec import ModelSpec
from inferpool.state.api_keys import ApiKeyInfo, KeyLimits
from inferpool.state.key_limits import KeyLimitStore
from inferpool.wire import AnyRequest, new_id


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
    """An admitted request's in-flight slot, given back when it ends."""

    key_id: str
    member: str


class KeyLimiter:
    """Checks a request against its key's limits; ``admit`` returns the ticket to ``release`` when it ends."""

    def __init__(self, store: KeyLimitStore, registry: Registry, slot_s: float) -> None:
        self._store = store
        self._registry = registry
        self._slot_s = slot_s  # an open request's slot lapses after this (its gateway died holding it)

    def check_model(self, caller: Caller, requested: str, served: str) -> None:
        """``ModelNotFound`` (404) unless the key may use ``served`` (the model a request was routed to)."""
        check_model(self._registry, caller.limits, requested, served)

    def allowed(self, caller: Caller) -> Collection[str] | None:
        return allowed_models(self._registry, caller.limits)

    async def admit(self, caller: Caller, request: AnyRequest, spec: ModelSpec) -> Ticket | None:
        """Admit ``request`` under its key's rates and in-flight cap, or raise ``RateLimited`` (429)."""
        limits = caller.limits
        if caller.key is None or limits is None or not (limits.rpm or limits.tpm or limits.max_in_flight):
            return None
        member = new_id("lim")
        tokens = estimate_tokens(request, spec)
        refusal = await self._store.admit(caller.key.key_id, rpm=limits.rpm, tpm=limits.tpm, tokens=tokens,
                                          max_in_flight=limits.max_in_flight, member=member,
                                          slot_s=self._slot_s)  # fmt: skip
        if refusal is not None:
            raise rate_limited(refusal, limits, tokens)
        return Ticket(caller.key.key_id, member) if limits.max_in_flight else None

    async def release(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            await self._store.release(ticket.key_id, ticket.member)
