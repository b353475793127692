"""A single request's spend budget, reserved by the client before the request is published.

Only scopes that have a budget cost a round trip: which scopes have one is read at most every
``REFRESH_S`` (a budget set just now applies within that). The reservation's hold is settled by the
result's own write (``inferpool.state.budgets``); a request that cannot be published gives it back at once.
"""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio

from inferpool._exceptions import BudgetExceeded
from inferpool.constants import BUDGETS_KEY, DEFAULT_TENANT
from inferpool.model_registry.costs import max_cost_nanos
from inferpool.model_registry.registry import Registry
from inferpool.plumbing.redis_connection import decode_text
from inferpool.state.budgets import AsyncBudgets, Budgets, Refused, release_single, scopes_of, single_hold
from inferpool.wire import TaskChunk

#: Seconds the set of budgeted scopes is trusted before it is read again.
REFRESH_S = 2.0

Wanted = tuple[list[str], int, str]


class BudgetGate:
    """Reserves single requests against their tenant's (and gateway key's) budgets."""

    def __init__(self, registry: Registry, client: redis.Redis, hold_ttl_s: int) -> None:
        self._registry = registry
        self._redis = client
        self._budgets = Budgets(client)
        self._async: AsyncBudgets | None = None
        self._hold_ttl_s = hold_ttl_s
        self._scopes: set[str] = set()
        self._read_at = float("-inf")
        self._reading: asyncio.Future[None] | None = None

    def _budgeted(self) -> set[str]:
        if time.monotonic() - self._read_at > REFRESH_S:
            self._scopes = {decode_text(scope) for scope in self._redis.hkeys(BUDGETS_KEY)}
            self._read_at = time.monotonic()
        return self._scopes

    async def _budgeted_async(self, client: redis.asyncio.Redis) -> set[str]:
        """One read at a time, however many requests come while it is under way: before the first read they all
        wait for it; after it, they use the scopes known (at most ``REFRESH_S`` and a read old)."""
        if time.monotonic() - self._read_at > REFRESH_S:
            reading = self._reading
            if reading is None or reading.done() or reading.get_loop() is not asyncio.get_running_loop():
                reading = self._reading = asyncio.ensure_future(self._read_async(client))
                # A refresh nobody awaits may fail (Redis down): the next request tries again; no stray warning.
                reading.add_done_callback(lambda done: done.cancelled() or done.exception())
            if self._read_at == float("-inf"):
                await asyncio.shield(reading)
        return self._scopes

    async def _read_async(self, client: redis.asyncio.Redis) -> None:
        self._scopes = {decode_text(scope) for scope in await client.hkeys(BUDGETS_KEY)}
        self._read_at = time.monotonic()

    def wanted(self, chunk: TaskChunk, key_id: str | None, budgeted: set[str]) -> Wanted | None:
        """What the chunk's request reserves (None: none of its scopes has a budget)."""
        item = chunk.items[0]
        scopes = [scope for scope in scopes_of(item.tenant or DEFAULT_TENANT, key_id) if scope in budgeted]
        if not scopes:
            return None
        return scopes, max_cost_nanos(self._registry.get(chunk.model), item.request), single_hold(item.request_id)

    def reserve(self, chunk: TaskChunk, key_id: str | None) -> None:
        wanted = self.wanted(chunk, key_id, self._budgeted())
        if wanted is not None:
            _check(self._budgets.reserve([wanted], self._hold_ttl_s)[0])

    async def reserve_async(self, chunk: TaskChunk, key_id: str | None, client: redis.asyncio.Redis) -> None:
        wanted = self.wanted(chunk, key_id, await self._budgeted_async(client))
        if wanted is not None:
            self._async = self._async or AsyncBudgets(client)
            _check((await self._async.reserve([wanted], self._hold_ttl_s))[0])

    def release(self, chunk: TaskChunk) -> None:
        """Give back what the chunk's request holds (it was never published)."""
        release_single(self._redis, chunk.items[0].request_id)


def _check(answer: str | Refused) -> None:
    if isinstance(answer, Refused):
        raise BudgetExceeded(answer.message())
