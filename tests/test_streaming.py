"""Streamed answers through Redis: deltas as the worker makes them, replay from any process, hang-ups."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from inferpool import AsyncClient, Client, Settings
from inferpool.constants import stream_key
from inferpool.state import streams
from inferpool.wire import ChatCompletionChunk, new_id

pytestmark = pytest.mark.usefixtures("echo_worker", "echo_trickle_worker")

WORDS = " ".join(f"w{i}" for i in range(40))


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_stream_yields_deltas_then_the_finish_reason_then_usage(client: Client) -> None:
    chunks = list(client.stream("echo", ask(WORDS), timeout=30))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.text for c in chunks if c.text]
    assert len(deltas) > 1, "the answer came in one piece: it was not streamed"
    assert "".join(deltas) == "echo: " + WORDS
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 41
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == "echo" for c in chunks)


def test_chat_with_stream_true_is_the_same_stream_and_max_tokens_applies(client: Client) -> None:
    chunks = list(client.chat("echo", ask(WORDS), stream=True, max_tokens=5, timeout=30))
    assert "".join(c.text for c in chunks) == "echo: w0 w1 w2 w3"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_a_late_reader_in_another_process_replays_the_whole_stream(client: Client, settings: Settings) -> None:
    handle = client.submit({"model": "echo", "messages": ask(WORDS), "stream": True})
    first = handle.completion(timeout=30)  # finished before anyone reads the stream
    with Client(settings=settings) as other:
        replayed = list(other.handle(handle.request_id).stream(timeout=30))
    assert "".join(c.text for c in replayed) == first.text
    assert len([c for c in replayed if c.text]) > 1


def test_the_stream_is_capped_and_expires(client: Client, redis_client: redis.Redis,
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    handle = client.submit({"model": "echo", "messages": ask("short"), "stream": True})
    handle.completion(timeout=30)
    ttl = redis_client.ttl(stream_key(handle.request_id))
    assert 0 < ttl <= client.settings.result_ttl_s
    # The cap: a worker's sink trims its stream (approximately: Redis trims whole nodes of ~100 entries).
    monkeypatch.setattr(streams, "STREAM_MAX_ENTRIES", 200)
    request_id = new_id("req")

    async def publish() -> None:
        sink = streams.DeltaSink(redis_client, request_id, 60)
        for n in range(2000):
            sink.emit(f" w{n}")
            await sink.drain()  # one entry per piece

    asyncio.run(publish())
    assert 200 <= redis_client.xlen(stream_key(request_id)) <= 400


def test_a_request_without_stream_still_streams_its_whole_answer_at_the_end(client: Client) -> None:
    handle = client.submit({"model": "echo", "messages": ask(WORDS)})
    chunks = list(handle.stream(timeout=30))
    assert [c.text for c in chunks if c.text] == ["echo: " + WORDS]
    assert chunks[-1].usage is not None


def test_first_delta_arrives_long_before_the_answer_ends(client: Client) -> None:
    started = time.monotonic()
    stream = client.stream("echo-trickle", ask(WORDS), timeout=30)
    first_text = next(c for c in stream if c.text)
    first_at = time.monotonic() - started
    rest = list(stream)
    ended_at = time.monotonic() - started
    assert first_text.text == "echo:"
    assert first_at < ended_at / 2  # a ratio of the same run, not a wall-clock threshold
    assert rest[-1].usage is not None


def test_stop_ends_generation_and_the_request_with_request_cancelled(client: Client, redis_client: redis.Redis) -> None:
    handle = client.submit({"model": "echo-trickle", "messages": ask(WORDS), "stream": True})
    stream = handle.stream(timeout=30)
    seen = [next(c for c in stream if c.text)]
    handle.stop()
    result = handle.result(timeout=30)
    assert result.error is not None
    assert result.error.code == "request_cancelled"
    published = "".join(f[b"t"].decode() for _, f in redis_client.xrange(stream_key(handle.request_id)) if b"t" in f)
    full = "echo: " + WORDS
    assert full.startswith(published)
    assert len(published) < len(full)  # the worker stopped before the answer's last word
    assert seen[0].text == "echo:"


def test_a_streamed_error_is_raised_after_the_chunks(client: Client) -> None:
    from inferpool import ContextLengthExceeded

    long_prompt = " ".join(["x"] * 5000)
    with pytest.raises(ContextLengthExceeded):
        list(client.stream("echo-trickle", ask(long_prompt), timeout=30))


async def test_async_stream(async_client: AsyncClient) -> None:
    chunks: list[ChatCompletionChunk] = [c async for c in await async_client.stream("echo", ask(WORDS), timeout=30)]
    assert "".join(c.text for c in chunks) == "echo: " + WORDS
    assert chunks[-1].usage is not None
    also = await async_client.chat("echo", ask("hi"), stream=True, timeout=30)
    assert "".join([c.text async for c in also]) == "echo: hi"


@pytest.mark.usefixtures("scheduler")
def test_batch_lines_refuse_stream(client: Client) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo", "messages": ask("x"), "stream": True}}  # fmt: skip
    job = client.batches.create([line])
    job = client.batches.wait(job.id, timeout=30)
    [out] = list(client.batches.results(job.id))
    assert out.error is not None
    assert "stream is not supported in batch jobs" in out.error.message
