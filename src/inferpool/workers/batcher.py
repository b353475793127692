"""A dynamic batcher: requests submitted by many coroutines run together, in batches, on one thread.

A model that is not safe to call from several threads (transformers) gets one ``DynamicBatcher``. While
it has fewer than ``max_batch_size`` compatible requests it keeps collecting, for as long as requests keep
arriving (each within ``gap_s`` of the last) and at most ``max_wait_s`` in all; then it runs one batch of
requests that share a key (the same sampling settings and adapter). A lone request therefore waits only
``gap_s``, while a burst (the chunks of a batch job reaching a worker one after another) is gathered into
full batches. While a batch runs, new requests queue up, so a busy worker starts its next batch at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(eq=False)
class _Waiting(Generic[ItemT, ResultT]):
    item: ItemT
    key: Hashable
    future: asyncio.Future[ResultT]
    loop: asyncio.AbstractEventLoop


_STOP = object()


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Runs ``run_batch`` on batches of submitted items, on one dedicated thread.

    ``run_batch`` gets items that share ``key(item)`` and returns one result per item, in order; if it
    raises, every item of that batch gets the exception.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        key: Callable[[ItemT], Hashable],
        max_batch_size: int,
        max_wait_s: float,
        gap_s: float | None = None,
        name: str = "batcher",
    ) -> None:
        self._run_batch = run_batch
        self._key = key
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.gap_s = max_wait_s if gap_s is None else min(gap_s, max_wait_s)
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._waiting: list[_Waiting[ItemT, ResultT]] = []
        self._closed = False
        self.batches_run = 0
        self.items_run = 0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its result."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultT] = loop.create_future()
        self._inbox.put(_Waiting(item, self._key(item), future, loop))
        return await future

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._inbox.put(_STOP)
            self._thread.join()

    # -- the batching thread ---------------------------------------------------------------------------

    def _serve(self) -> None:
        stopping = False
        while not (stopping and not self._waiting):
            if not self._waiting:
                stopping = bool(self._receive(block=True, timeout=None)) or stopping
                continue
            stopping = self._collect() or stopping
            batch = self._take_batch()
            self._run(batch)

    def _receive(self, *, block: bool, timeout: float | None) -> bool | None:
        """Move one message from the inbox to the waiting list. True if it was the stop signal, None if
        nothing came."""
        try:
            message = self._inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return None
        if message is _STOP:
            return True
        assert isinstance(message, _Waiting)
        self._waiting.append(message)
        return False

    def _collect(self) -> bool:
        """Take in everything already queued, then, while the head's batch is not full, keep taking
        requests as long as each comes within ``gap_s`` and ``max_wait_s`` has not passed. True if the
        stop signal arrived."""
        stopping = False
        while not self._inbox.empty():
            stopping = bool(self._receive(block=False, timeout=None)) or stopping
        deadline = time.monotonic() + self.max_wait_s
        head = self._waiting[0].key
        while not stopping and sum(1 for w in self._waiting if w.key == head) < self.max_batch_size:
            remaining = min(deadline - time.monotonic(), self.gap_s)
            if remaining <= 0:
                break
            received = self._receive(block=True, timeout=remaining)
            if received is None:  # a quiet gap: the burst is over
                break
            stopping = received
        return stopping

    def _take_batch(self) -> list[_Waiting[ItemT, ResultT]]:
        """The oldest request and up to ``max_batch_size - 1`` more with its key, in arrival order."""
        head = self._waiting[0].key
        batch: list[_Waiting[ItemT, ResultT]] = []
        rest: list[_Waiting[ItemT, ResultT]] = []
        for waiting in self._waiting:
            (batch if waiting.key == head and len(batch) < self.max_batch_size else rest).append(waiting)
        self._waiting = rest
        return batch

    def _run(self, batch: list[_Waiting[ItemT, ResultT]]) -> None:
        try:
            results = list(self._run_batch([w.item for w in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            log.exception("a batch of %d failed", len(batch))
            for waiting in batch:
                waiting.loop.call_soon_threadsafe(_set_exception, waiting.future, exc)
            return
        self.batches_run += 1
        self.items_run += len(batch)
        for waiting, result in zip(batch, results, strict=True):
            waiting.loop.call_soon_threadsafe(_set_result, waiting.future, result)


def _set_result(future: asyncio.Future[ResultT], result: ResultT) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[ResultT], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
