"""Single requests that arrive together travel together: ``AsyncClient.submit``'s publishing.

Group commit, with no timer: the first request for a queue (model, priority) is published at once (one ``LPUSH``
on the client's asyncio connection); requests for the same queue that arrive while that publish is under way wait
for it and then go together, as one chunk task of up to the model's ``chunk_size`` items. A lone request therefore
waits for nothing (no window to fill), and under load one Celery message, one worker task and one result script
carry many requests. Each request keeps its own id, its own exactly-once result and its own wake-up
(``inferpool.client.replies``); ``submit`` returns once its own chunk was handed to the broker, or raises what
publishing it raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from inferpool.constants import Priority
from inferpool.wire import TaskChunk

#: Publishes one chunk: ``ChunkPublisher.publish_async``.
Publish = Callable[[TaskChunk], Awaitable[None]]


@dataclass
class _Queue:
    waiting: list[tuple[TaskChunk, asyncio.Future[None]]] = field(default_factory=list)
    # The task publishing this queue's chunks: held here, as the event loop keeps only weak references to tasks.
    publishing: asyncio.Task[None] | None = None


class Coalescer:
    """Publishes single-request chunks, several of one queue together when they arrive while one is sent."""

    def __init__(self, publish: Publish, chunk_size: Callable[[str], int]) -> None:
        self._publish = publish
        self._chunk_size = chunk_size
        self._queues: dict[tuple[str, Priority], _Queue] = {}

    async def publish(self, chunk: TaskChunk) -> None:
        """Hand ``chunk`` (one request) to the broker, alone or with others for its queue."""
        key = (chunk.model, chunk.priority)
        queue = self._queues.setdefault(key, _Queue())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiting.append((chunk, done))
        if queue.publishing is None:
            queue.publishing = asyncio.get_running_loop().create_task(self._drain(key, queue))
        await done

    async def _drain(self, key: tuple[str, Priority], queue: _Queue) -> None:
        try:
            while queue.waiting:
                size = max(1, self._chunk_size(key[0]))
                taken, queue.waiting[:size] = queue.waiting[:size], []
                merged = taken[0][0] if len(taken) == 1 else _merge([chunk for chunk, _ in taken])
                try:
                    await self._publish(merged)
                except BaseException as exc:  # each request of the chunk gets its publish's error
                    for _, done in taken:
                        if not done.done():
                            done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for _, done in taken:
                        if not done.done():
                            done.set_result(None)
        finally:
            queue.publishing = None
            for _, done in queue.waiting:  # only if the loop itself was cancelled: nothing may wait for ever
                if not done.done():
                    done.set_exception(asyncio.CancelledError())
            queue.waiting.clear()
            if self._queues.get(key) is queue:
                del self._queues[key]


def _merge(chunks: list[TaskChunk]) -> TaskChunk:
    first = chunks[0]
    return TaskChunk(model=first.model, items=[item for chunk in chunks for item in chunk.items],
                     result_ttl_s=first.result_ttl_s, priority=first.priority)  # fmt: skip
