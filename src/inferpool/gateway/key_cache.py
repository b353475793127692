"""The gateway's cache of API keys, exact: a change made with ``inferpool keys`` (revoke, new limits) applies at once.

Looking a key up cost every request an ``HGET``. Keys change rarely, so each gateway process keeps what it read,
and ``ApiKeys`` announces every change on a channel (``API_KEYS_CHANGED_CHANNEL``) that a listener here hears
and drops the cache for. Nothing is cached while the listener is not subscribed (at start, and from a lost
connection until it is back, when the cache starts empty), and a lookup that an announcement overtook is not
cached (the generation it read under is gone): so no request is served with a key as it was before a change
that had been announced when the request arrived. Unknown keys are never cached (a spray of made-up keys costs
Redis lookups, as before, not memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio

from inferpool.constants import API_KEYS_CHANGED_CHANNEL
from inferpool.state.api_keys import ApiKeyInfo, key_info

log = logging.getLogger(__name__)

#: Most keys held; past it the cache starts again (a gateway serves far fewer keys than this).
MAX_KEYS = 100_000
_RETRY_S = 1.0


class KeyCache:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._keys: dict[str, ApiKeyInfo] = {}
        self._generation = 0
        self._listening = False
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[ApiKeyInfo | None]] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def lookup(self, key: str) -> ApiKeyInfo | None:
        """``key_info``, from memory when it can be exact; one read at a time per key (a burst of requests with a
        key not yet read waits for one lookup, not one connection each)."""
        cached = self._keys.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._read(key))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _read(self, key: str) -> ApiKeyInfo | None:
        generation, listening = self._generation, self._listening
        info = await key_info(self._redis, key)
        if info is not None and listening and self._listening and generation == self._generation:
            if len(self._keys) >= MAX_KEYS:
                self._keys.clear()
            self._keys[key] = info
        return info

    def _invalidate(self) -> None:
        self._generation += 1
        self._keys.clear()

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(API_KEYS_CHANGED_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "subscribe":
                        # Confirmed: every change announced from now on is heard. What was read before it may
                        # have missed one.
                        self._invalidate()
                        self._listening = True
                    elif message.get("type") == "message":
                        self._invalidate()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("API key cache: change announcements unreachable (%s); looking keys up meanwhile", exc)
            finally:
                self._listening = False
                self._invalidate()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(_RETRY_S)
