"""Single requests from an ``AsyncClient``: those that arrive together travel as one chunk, each result comes back
on the client's reply list to its own waiter, and a lost wake-up or a late waiter still gets its result."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
import redis

from inferpool import AsyncClient, ResultTimeout, Settings
from inferpool.client.coalesce import Coalescer
from inferpool.constants import Priority, queue_name, reply_list_key, result_notify_key
from inferpool.plumbing.celery_app import create_celery_app, publish_chunk_json
from inferpool.plumbing.publisher import ChunkPublisher
from inferpool.wire import TaskChunk

pytestmark = pytest.mark.usefixtures("echo_worker", "echo_trickle_worker")


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_concurrent_requests_ride_together_and_each_gets_its_own_answer(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async with AsyncClient(settings=settings) as client:
        sizes: list[int] = []
        publish = client.coalescer._publish

        async def counted(chunk: TaskChunk) -> None:  # the real publish, counted
            sizes.append(len(chunk.items))
            await publish(chunk)

        client.coalescer._publish = counted
        answers = await asyncio.gather(*(client.chat("echo", _ask(f"question {i}"), timeout=60) for i in range(300)))
        assert [a.text for a in answers] == [f"echo: question {i}" for i in range(300)]
        assert sum(sizes) == 300
        assert len(sizes) < 300 / 4  # together, not one message each
        assert max(sizes) <= client.registry.get("echo").serving.chunk_size
        lone = await client.chat("echo", _ask("alone"), timeout=60)  # nothing else in flight: sent at once, alone
        assert lone.text == "echo: alone"
        assert sizes[-1] == 1
        # Woken through the client's reply list: no per-request notify key, and the list is drained.
        handle = await client.submit({"model": "echo", "messages": _ask("one more")})
        await handle.result(timeout=60)
        assert redis_client.exists(result_notify_key(handle.request_id)) == 0
        assert redis_client.llen(reply_list_key(client.replies.client_id)) == 0


async def test_a_lost_wake_up_a_late_waiter_and_a_timeout_still_end_with_the_result(settings: Settings) -> None:
    async with AsyncClient(settings=settings) as client, AsyncClient(settings=settings) as other:
        listening = client.replies.key
        client.replies.client_id = "nobody-listens-here"  # results are pushed where this listener never looks
        try:
            handle = await client.submit({"model": "echo", "messages": _ask("lost push")})
            result = await handle.result(timeout=30)  # found by the listener's look-up of stale waiters
        finally:
            client.replies.client_id = listening.rsplit(":", 1)[1]
        assert result.response is not None
        # A waiter that starts after the result came (or in another client) reads it from its key.
        early = await client.submit({"model": "echo", "messages": _ask("early")})
        await asyncio.sleep(0.5)
        assert (await other.handle(early.request_id).result(timeout=30)).response is not None
        assert (await early.result(timeout=30)).response is not None
        # A timeout ends that wait only: waiting again gets the answer.
        slow = await client.submit({"model": "echo-trickle", "messages": _ask("slow one")})
        with pytest.raises(ResultTimeout):
            await slow.result(timeout=0.2)
        again = await slow.result(timeout=60)
        assert again.response is not None


async def test_a_failed_publish_fails_every_request_it_carried_and_the_next_ones_go() -> None:
    calls: list[int] = []
    gate = asyncio.Event()

    async def publish(chunk: TaskChunk) -> None:
        calls.append(len(chunk.items))
        await asyncio.wait_for(gate.wait(), 5)
        if len(calls) == 2:
            raise ConnectionError("broker down")

    coalescer = Coalescer(publish, lambda model: 8)

    def chunk(i: int) -> TaskChunk:
        return TaskChunk.model_validate({"model": "echo", "result_ttl_s": 60, "items": [
            {"request_id": f"req_{i}", "request": {"model": "echo", "messages": _ask(str(i))}}]})  # fmt: skip

    first = asyncio.ensure_future(coalescer.publish(chunk(0)))
    await asyncio.sleep(0.05)  # the first is being sent: the next 20 wait and go together, 8 at a time
    rest = [asyncio.ensure_future(coalescer.publish(chunk(i))) for i in range(1, 21)]
    gate.set()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert calls == [1, 8, 8, 4]
    assert outcomes[0] is None
    assert all(isinstance(o, ConnectionError) for o in outcomes[1:9])  # the chunk that failed: all its requests
    assert all(o is None for o in outcomes[9:])


def test_the_published_message_is_the_one_celery_makes(settings: Settings, redis_client: redis.Redis) -> None:
    """Single requests are published without Celery's per-message machinery: the message must stay the one its
    ``send_task`` makes for the installed Celery and kombu, or workers would not read it."""
    app = create_celery_app(settings)
    try:
        queue = queue_name("publish-check", Priority.NORMAL)
        publish_chunk_json(app, '{"model": "publish-check"}', model="publish-check", description="chunk x",
                           expires_s=600)  # fmt: skip
        theirs = json.loads(redis_client.rpop(queue) or b"{}")
    finally:
        app.close()
    ours = json.loads(ChunkPublisher(redis_client).message('{"model": "publish-check"}', queue=queue,
                                                           description="chunk x", expires_s=600))  # fmt: skip
    varying = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin", "expires"}
    for part in ("headers", "properties"):
        assert set(ours[part]) == set(theirs[part])
        assert {k: v for k, v in ours[part].items() if k not in varying} == {
            k: v for k, v in theirs[part].items() if k not in varying}  # fmt: skip
    assert {k: v for k, v in ours.items() if k not in ("headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("headers", "properties")
    }  # the same body, encoded the same
    ours_expires = dt.datetime.fromisoformat(ours["headers"]["expires"])
    assert abs(ours_expires - dt.datetime.fromisoformat(theirs["headers"]["expires"])) < dt.timedelta(seconds=30)
    assert ours["headers"]["root_id"] == ours["headers"]["id"] == ours["properties"]["correlation_id"]
