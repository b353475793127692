"""Results of an ``AsyncClient``'s single requests, delivered to the one waiter each concerns.

Each request the client submits (and waits for whole) names the client's reply list (``TaskItem.reply_to``);
the result script pushes the result onto it as it writes it, once (``inferpool.state.results``). One listener
task per client pops them (``BLPOP``, then the rest of the list at once) and resolves the future of each
request: no connection and no poll per waiter, and no waiter is woken for another's result. A result whose
push was lost (a Redis restart without persistence, a list expired while the client was stalled) is still
found: every second the listener reads the result keys of the requests waiting longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis
import redis.asyncio

from inferpool.constants import reply_list_key, result_key
from inferpool.state.results import parse_result
from inferpool.wire import RequestResult, random_hex

log = logging.getLogger(__name__)

#: Seconds a listener blocks at a time; also how often it looks for results whose push it missed.
_SLICE_S = 1.0
_POP_MAX = 1000
_LOOKUP_MAX = 500


class Replies:
    """The reply list of one client and the futures of the requests waiting on it."""

    def __init__(self, connect: Callable[[], Coroutine[Any, Any, redis.asyncio.Redis]]) -> None:
        self.client_id = random_hex()
        self.key = reply_list_key(self.client_id)
        self._connect = connect
        self._waiting: dict[str, tuple[asyncio.Future[RequestResult], float]] = {}
        self._task: asyncio.Task[None] | None = None

    def expect(self, request_id: str) -> None:
        """Register a request before it is published (its result may come back at once)."""
        loop = asyncio.get_running_loop()
        self._waiting[request_id] = (loop.create_future(), time.monotonic())
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._listen())

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def expects(self, request_id: str) -> bool:
        return request_id in self._waiting

    async def wait(self, request_id: str, timeout: float | None) -> RequestResult:
        """The request's result; ``TimeoutError`` after ``timeout`` (it is then forgotten here: a later wait
        reads its result key)."""
        future, _ = self._waiting[request_id]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._waiting.pop(request_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for future, _ in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    async def _listen(self) -> None:
        client = await self._connect()
        looked = time.monotonic()
        while self._waiting:
            try:
                popped: Any = await client.blpop([self.key], timeout=_SLICE_S)
                raws = [popped[1]] if popped else []
                if popped:
                    raws += await client.lpop(self.key, _POP_MAX) or []
                for raw in raws:
                    self._resolve(parse_result(raw))
                if time.monotonic() - looked >= _SLICE_S:
                    looked = time.monotonic()
                    await self._look_up(client)
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # waited out; waiters have their timeouts
                log.warning("results listener: Redis unreachable (%s); retrying", exc)
                await asyncio.sleep(_SLICE_S)
            except ValueError:  # a foreign or corrupt entry: skip it, never stop delivering the others
                log.exception("results listener: an unreadable reply was skipped")

    def _resolve(self, result: RequestResult) -> None:
        # Out of the table at once: whoever awaits it holds the future; a wait that starts later reads the
        # result key (a request nobody waits for must not stay here).
        entry = self._waiting.pop(result.request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(result)

    async def _look_up(self, client: redis.asyncio.Redis) -> None:
        """Results of requests waiting for over a second whose push never came (read from their keys)."""
        now = time.monotonic()
        stale = [rid for rid, (future, since) in self._waiting.items() if now - since > _SLICE_S
                 and not future.done()][:_LOOKUP_MAX]  # fmt: skip
        if not stale:
            return
        raws: Any = await client.mget([result_key(rid) for rid in stale])
        for raw in raws:
            if raw is not None:
                self._resolve(parse_result(raw))
