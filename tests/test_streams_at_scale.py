"""Hundreds of streamed chats through one gateway at once, a quarter of the clients hanging up mid-stream: the
rest get whole streams, every abandoned request is stopped (an API provider's stream included), the clients'
connections are let go and no transient key is left in Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from inferpool.emulators import EmulatorConfig, ProviderEmulator
from inferpool.plumbing.local_pool import WorkerProcess
from inferpool.state.api_keys import ApiKeys
from tests.conftest import (
    ANTHROPIC_TEST_KEY,
    OPENAI_TEST_KEY,
    _start_workers,
    _stop_workers,
    start_gateway,
    stop_gateway,
    wait_until,
)

STREAMS = 400
WORDS = 24


@pytest.fixture(scope="module")
def slow_emulator() -> Iterator[ProviderEmulator]:
    """An OpenAI emulator that streams a token every 0.1 s: long enough to hang up in the middle."""
    server = ProviderEmulator(EmulatorConfig(api_keys=[OPENAI_TEST_KEY, ANTHROPIC_TEST_KEY], token_latency_s=0.1))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stream_workers(redis_url: str, session_dir: Path, slow_emulator: ProviderEmulator) -> Iterator[list[WorkerProcess]]:
    env = {"OPENAI_BASE_URL": slow_emulator.openai_base_url, "OPENAI_API_KEY": OPENAI_TEST_KEY}
    workers = _start_workers(redis_url, session_dir, "echo-stream-many", "emu-gpt-stream-slow", env=env)
    yield workers
    _stop_workers(workers)


def _transient_keys(client: redis.Redis) -> int:
    """Keys that must not outlive their request: notify lists, stop marks, holds, reply lists, key-limit slots."""
    patterns = ("inferpool:result:*:notify", "inferpool:hold:*", "inferpool:replies:*")
    return sum(len(list(client.scan_iter(pattern, count=10_000))) for pattern in patterns)


async def _one(http: httpx.AsyncClient, url: str, headers: dict[str, str], model: str, index: int,
               hang_up: bool) -> tuple[str, str, bool]:  # fmt: skip
    """(request id, the text received, whether the stream ended with [DONE])."""
    words = " ".join(f"w{index}-{n}" for n in range(WORDS))
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": words}]}
    text, done = "", False
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as reply:
        assert reply.status_code == 200, await reply.aread()
        request_id = reply.headers["x-request-id"]
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choices = json.loads(line[6:]).get("choices") or [{}]
            text += choices[0].get("delta", {}).get("content") or ""
            if hang_up and len(text.split()) >= 3:
                break  # leaving the block closes the connection mid-stream
    return request_id, text, done


@pytest.mark.usefixtures("stream_workers")
def test_hundreds_of_streams_with_a_quarter_hanging_up(redis_url: str, session_dir: Path, redis_client: redis.Redis,
                                                      slow_emulator: ProviderEmulator) -> None:  # fmt: skip
    key = ApiKeys(redis_client).create("streams")[0]
    headers = {"authorization": f"Bearer {key}"}
    log_path = session_dir / "gateway-streams.log"
    proc, url = start_gateway(redis_url, log_path, {"INFERPOOL_GATEWAY_MAX_IN_FLIGHT_PER_TENANT": "1024",
                                                    "INFERPOOL_GATEWAY_IDLE_REDIS_CLOSE_S": "1"})  # fmt: skip
    gateway = psutil.Process(proc.pid)
    redis_port = int(redis_client.connection_pool.connection_kwargs["port"])

    def to_redis() -> int:
        return len([c for c in gateway.net_connections() if c.raddr and c.raddr.port == redis_port])

    try:
        httpx.get(f"{url}/ready", timeout=10)
        port = int(url.rsplit(":", 1)[1])
        transient_before = _transient_keys(redis_client)
        redis_before = to_redis()

        async def run() -> list[tuple[str, str, bool]]:
            limits = httpx.Limits(max_connections=STREAMS + 64, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=120) as http:
                calls = [_one(http, url, headers, "echo-stream-many", i, i % 4 == 0) for i in range(STREAMS)]
                calls += [_one(http, url, headers, "emu-gpt-stream-slow", i, i % 4 == 0) for i in range(40)]
                return list(await asyncio.gather(*calls))

        closed_before = slow_emulator.counts["streams_closed_by_client"]
        outcomes = asyncio.run(run())
        echo, api = outcomes[:STREAMS], outcomes[STREAMS:]
        for index, (_, text, done) in enumerate(echo):
            if index % 4:  # kept reading: the whole answer, then [DONE]
                assert done
                assert text == "echo: " + " ".join(f"w{index}-{n}" for n in range(WORDS))
            else:
                assert not done
        assert all(done for index, (_, _, done) in enumerate(api) if index % 4)
        # Every abandoned request ends stopped (request_cancelled), the provider's streams closed early too.
        abandoned = [rid for i, (rid, _, _) in enumerate(echo) if i % 4 == 0]
        abandoned += [rid for i, (rid, _, _) in enumerate(api) if i % 4 == 0]

        def all_stopped() -> bool:
            raws = redis_client.mget([f"inferpool:result:{rid}" for rid in abandoned])
            return all(raw is not None and json.loads(raw).get("error", {}).get("code") == "request_cancelled"
                       for raw in raws)  # fmt: skip

        wait_until(all_stopped, 60, "every abandoned stream to end as request_cancelled")
        wait_until(lambda: slow_emulator.counts["streams_closed_by_client"] - closed_before >= 10, 30,
                   "the provider's streams of the abandoned requests to be closed")  # fmt: skip
        # The gateway lets go of the clients' connections and of the Redis connections the burst opened (its idle
        # pooled ones are closed every second here); no transient key is left in Redis.
        wait_until(lambda: len([c for c in gateway.net_connections() if c.laddr and c.laddr.port == port]) <= 1, 30,
                   "the clients' connections to the gateway to close")  # fmt: skip
        wait_until(lambda: to_redis() <= redis_before + 1, 30, "the gateway's Redis connections to go back to "
                   f"{redis_before} (+1 for the reply listener a first chat may start)")  # fmt: skip
        wait_until(lambda: _transient_keys(redis_client) <= transient_before, 30, "transient keys to be gone")
    finally:
        stop_gateway(proc, log_path)
