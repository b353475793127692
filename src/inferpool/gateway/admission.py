"""How many chat requests a gateway process holds open at once, in all and per tenant.

Each open request holds a Redis connection and a waiter until its answer comes; without a cap, a backed-up
queue lets them pile up until the pool's connections run out and every tenant gets 503. Past a cap a request
is answered at once with OpenAI's 429 (``rate_limit_exceeded``) and ``Retry-After``, which the SDKs honour.
The caps are per process (each gateway behind a load balancer keeps its own); they count requests, not
tokens: spend budgets are the tenants' own concern.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from inferpool.gateway.errors import HTTPError

#: Seconds a refused client is told to wait: open requests end within seconds on a pool that keeps up.
RETRY_AFTER_S = 1


class Admission:
    """Counts open requests; ``admit`` raises the 429 or holds a slot until its block ends."""

    def __init__(self, most: int, most_per_tenant: int) -> None:
        self.most = most
        self.most_per_tenant = most_per_tenant
        self.open = 0
        self._by_tenant: dict[str, int] = {}

    def acquire(self, tenant: str) -> None:
        """Take a slot for ``tenant``, or raise the 429 (the event loop is the only thread: no lock)."""
        held = self._by_tenant.get(tenant, 0)
        if self.open >= self.most:
            raise _too_many(f"This gateway is serving its limit of {self.most} requests at once "
                            "(INFERPOOL_GATEWAY_MAX_IN_FLIGHT)")  # fmt: skip
        if held >= self.most_per_tenant:
            raise _too_many(f"Your key's tenant has {held} requests open on this gateway, its limit "
                            "(INFERPOOL_GATEWAY_MAX_IN_FLIGHT_PER_TENANT)")  # fmt: skip
        self.open += 1
        self._by_tenant[tenant] = held + 1

    def release(self, tenant: str) -> None:
        self.open -= 1
        left = self._by_tenant[tenant] - 1
        if left:
            self._by_tenant[tenant] = left
        else:
            del self._by_tenant[tenant]

    @contextlib.contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)


def _too_many(why: str) -> HTTPError:
    return HTTPError(429, f"{why}; retry after {RETRY_AFTER_S} s, or send fewer requests at once.",
                     type_="requests", code="rate_limit_exceeded",
                     headers={"retry-after": str(RETRY_AFTER_S)})  # fmt: skip
