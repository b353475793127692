"""The dynamic batcher on its own: real threads and an event loop, a batch function that records calls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from inferpool.workers.batcher import DynamicBatcher


class Recorder:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def run(self, items: list[tuple[str, int]]) -> list[str]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return [f"{key}:{value}" for key, value in items]


async def test_concurrent_requests_share_batches_of_their_own_key() -> None:
    recorder = Recorder(delay_s=0.05)
    batcher: DynamicBatcher[tuple[str, int], str] = DynamicBatcher(
        recorder.run, key=lambda item: item[0], max_batch_size=4, max_wait_s=0.05, name="test-batcher"
    )
    items = [("greedy" if i % 3 else "sampled", i) for i in range(20)]
    results = await asyncio.gather(*(batcher.submit(item) for item in items))
    batcher.close()
    assert results == [f"{key}:{value}" for key, value in items]  # each caller gets its own answer
    assert all(len({key for key, _ in batch}) == 1 for batch in recorder.batches)  # one key per batch
    assert all(len(batch) <= 4 for batch in recorder.batches)
    assert sorted(v for batch in recorder.batches for _, v in batch) == list(range(20))  # each item once
    assert len(recorder.batches) < 20  # they were batched, not run one by one
    assert recorder.threads == {"test-batcher"}
    assert (batcher.batches_run, batcher.items_run) == (len(recorder.batches), 20)


async def test_a_failing_batch_fails_only_its_own_items() -> None:
    def run(items: list[int]) -> list[int]:
        if any(item < 0 for item in items):
            raise ValueError("negative input")
        return [item * 2 for item in items]

    batcher: DynamicBatcher[int, int] = DynamicBatcher(
        run, key=lambda item: item < 0, max_batch_size=8, max_wait_s=0.02
    )
    good, bad = await asyncio.gather(batcher.submit(21), batcher.submit(-1), return_exceptions=True)
    assert good == 42
    assert isinstance(bad, ValueError)
    assert await batcher.submit(5) == 10  # the thread survived
    batcher.close()


async def test_close_finishes_queued_work_then_refuses_more() -> None:
    recorder = Recorder(delay_s=0.02)
    batcher: DynamicBatcher[tuple[str, int], str] = DynamicBatcher(
        recorder.run, key=lambda item: item[0], max_batch_size=2, max_wait_s=0.0
    )
    pending = [asyncio.ensure_future(batcher.submit(("k", i))) for i in range(6)]
    await asyncio.sleep(0)  # let every submit enqueue
    await asyncio.to_thread(batcher.close)
    assert [await p for p in pending] == [f"k:{i}" for i in range(6)]
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(("k", 99))
